# smtpguard: a filtering SMTP front-end proxy, as a container image.
#
#   docker build -t smtpguard .
#   docker run -d --name smtpguard --network=host \
#       -e SMTPGUARD_HOSTNAME=mx.example.com -e SMTPGUARD_DOMAIN=example.com \
#       -v smtpguard-state:/var/lib/smtpguard \
#       smtpguard --upstream 127.0.0.1:10025
#
# Arguments after the image name are `smtpguard serve` flags. Every flag also
# has an SMTPGUARD_* environment variable (SMTPGUARD_UPSTREAM=mta:25, lists
# comma-separated; a flag wins over the variable, the variable over the file);
# a TOML file can be mounted and named with --config. No file is needed.
# Host networking: Docker's userland proxy (-p 25:25) can replace every
# client's address with the bridge gateway's, which ruins the country, the OS
# fingerprint and the per-client limits (README "Deploy").
# Built and run for real by scripts/image-test.sh (`make image-test`).

FROM debian:bookworm-slim AS build
ARG DEBIAN_FRONTEND=noninteractive
# Debian's own Python 3.11 (bookworm's only one). Pinned metapackages
# (hadolint DL3008); they depend on python3.11 (>= 3.11.2), so Debian's
# security updates of the interpreter still install.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3=3.11.2-1+b1 python3-venv=3.11.2-1+b1 \
 && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md /src/
COPY smtpguard /src/smtpguard
# The project and its dependencies (their minimum versions are in
# pyproject.toml) in a virtual environment that the runtime stage copies.
# pip and setuptools leave the venv once done: nothing installs at run time.
RUN python3 -m venv /opt/smtpguard \
 && /opt/smtpguard/bin/pip install --no-cache-dir --no-compile '/src[mmdb]' \
 && /opt/smtpguard/bin/pip uninstall --yes --quiet pip setuptools \
 && /opt/smtpguard/bin/python -m compileall -q /opt/smtpguard/lib

FROM debian:bookworm-slim
ARG DEBIAN_FRONTEND=noninteractive
LABEL org.opencontainers.image.title="smtpguard" \
      org.opencontainers.image.description="A filtering SMTP front-end proxy: decides on connect, HELO, MAIL and RCPT from facts and relays accepted mail to the real MTA in real time" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim"
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3=3.11.2-1+b1 \
 && rm -rf /var/lib/apt/lists/* \
 # A fixed numeric uid/gid (hadolint DL3066): volumes and the host agree on
 # who owns the state. No file capabilities: port 25 needs none in a container
 # (Docker >= 20.10 sets net.ipv4.ip_unprivileged_port_start=0; older engines:
 # --sysctl net.ipv4.ip_unprivileged_port_start=25), and a setcap'd
 # interpreter cannot even start under --cap-drop=ALL.
 && groupadd --system --gid 10025 smtpguard \
 && useradd --system --uid 10025 --gid 10025 --no-create-home \
        --home-dir /var/lib/smtpguard --shell /usr/sbin/nologin smtpguard \
 && mkdir -p /var/lib/smtpguard/zones /etc/smtpguard \
 && chown -R 10025:10025 /var/lib/smtpguard
COPY --from=build /opt/smtpguard /opt/smtpguard
ENV PATH=/opt/smtpguard/bin:$PATH \
    PYTHONUNBUFFERED=1
WORKDIR /var/lib/smtpguard
USER 10025:10025
EXPOSE 25
# The default state store (sqlite:///var/lib/smtpguard/state.db) and the
# country zones that `smtpguard zones update --dest /var/lib/smtpguard/zones` refreshes.
VOLUME ["/var/lib/smtpguard"]
# `smtpguard health`: GET /healthz of the HTTP server when one is configured
# (SMTPGUARD_HTTP or [http] listen), else read the SMTP listener's 220
# greeting (SMTPGUARD_LISTEN or server.listen, default 0.0.0.0:25). It sees
# the variables and SMTPGUARD_CONFIG, not the serve flags after the image name.
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["smtpguard", "health"]
# SIGTERM stops listening, lets sessions in DATA finish (server.grace_period,
# 30 s) and answers the rest 421: give `docker stop -t 40` / stop_grace_period 40s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["smtpguard", "serve"]
