# smtpguard: a filtering SMTP front-end proxy.
#   docker build -t smtpguard .
#   docker run -p 25:25 -v /etc/smtpguard:/etc/smtpguard:ro -v smtpguard-state:/var/lib/smtpguard smtpguard \
#       --config /etc/smtpguard/smtpguard.toml
FROM python:3.11-slim

RUN useradd --system --home-dir /var/lib/smtpguard --shell /usr/sbin/nologin smtpguard \
 && mkdir -p /var/lib/smtpguard /etc/smtpguard \
 && chown smtpguard:smtpguard /var/lib/smtpguard \
 && apt-get update && apt-get install -y --no-install-recommends libcap2-bin \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/smtpguard
COPY pyproject.toml README.md ./
COPY smtpguard ./smtpguard
RUN pip install --no-cache-dir '.[mmdb]' \
 # Bind port 25 without root: the capability on the interpreter, not a root process.
 && setcap 'cap_net_bind_service=+ep' "$(readlink -f "$(command -v python3)")"

USER smtpguard
EXPOSE 25
VOLUME ["/var/lib/smtpguard"]
ENTRYPOINT ["smtpguard", "serve"]
CMD ["--config", "/etc/smtpguard/smtpguard.toml"]
