#!/usr/bin/env bash
# `make image-test` (issue 17): build the Dockerfile with podman and run the
# image for real, on this machine, without a Docker engine or a registry.
#
#   1. install podman, runc and debootstrap if missing (Debian packages);
#   2. containers.conf: runc, and ulimits this kind of VM needs;
#   3. the base image: if docker.io/library/debian:bookworm-slim is absent,
#      debootstrap --variant=minbase bookworm from the mirror apt uses here,
#      with the host's CA bundle and pip configuration (so pip in the build
#      reaches the package index as the host does), imported under that name;
#   4. podman build (docker format: HEALTHCHECK is not part of OCI's format);
#   5. the image with flags and SMTPGUARD_* variables only (no file), under
#      --cap-drop=ALL and --read-only, host network, in front of `smtpguard sink`;
#      then swaks through it (one message delivered, one relay refused with
#      reason and URL), the health check turning healthy, and `podman stop`
#      letting a session in DATA finish within the grace period;
#   6. examples/compose started with podman-compose (Postfix built from its
#      directory, Debian's redis-server standing in for the Redis image,
#      the zones served from loopback): a message through smtpguard into
#      Postfix by XCLIENT, an unknown user's 550 from Postfix passed on, the
#      SIGHUP of zones-refresh reaching smtpguard, a clean stop.
#
# Skipped with a visible reason (exit 0, "image-test: SKIPPED: ...") only where
# podman cannot be installed or cannot run containers here; once a container
# runs, every failure is a failure (exit 1). Ports are free loopback ports.
# Timings are printed: the base, the build, the run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT_DIR=$(pwd)
IMAGE=${IMAGE:-localhost/smtpguard:image-test}
BASE=docker.io/library/debian:bookworm-slim
PY=${PY:-$ROOT_DIR/.venv/bin/python}
SMTPGUARD=${SMTPGUARD:-$ROOT_DIR/.venv/bin/smtpguard}
NAME=smtpguard-image-test-$$
WORK=$(mktemp -d /tmp/smtpguard-image-test.XXXXXX)
SINK_PID=""
SUDO=""
t0=$(date +%s)

say() { echo "image-test: $*" >&2; }
skip() { echo "image-test: SKIPPED: $*" >&2; exit 0; }
fail() { echo "image-test: FAILED: $*" >&2; exit 1; }
elapsed() { echo $(( $(date +%s) - $1 )); }

cleanup() {
  set +e
  if $SUDO podman container exists "$NAME" 2>/dev/null; then
    $SUDO podman rm -f -v "$NAME" >/dev/null 2>&1
  fi
  # Volumes this run left (anonymous ones of the image's VOLUME): removed
  # unless a container still uses them.
  if [ -f "$WORK/volumes.before" ]; then
    $SUDO podman volume ls -q | sort | comm -13 "$WORK/volumes.before" - | while read -r v; do
      $SUDO podman volume rm "$v" >/dev/null 2>&1
    done
  fi
  # Untagged images that earlier runs left (build stages of replaced
  # images): removed, so that storage does not grow run after run; this
  # run's stay as the next run's build cache.
  if [ -f "$WORK/dangling.before" ]; then
    while read -r i; do $SUDO podman rmi "$i" >/dev/null 2>&1; done <"$WORK/dangling.before"
  fi
  [ -n "$SINK_PID" ] && kill "$SINK_PID" 2>/dev/null && wait "$SINK_PID" 2>/dev/null
  rm -rf "$WORK"
}
trap cleanup EXIT

[ "$(uname -s)" = Linux ] || skip "podman builds need Linux"
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null || skip "not root and no password-less sudo: podman, debootstrap and containers.conf need root"
  SUDO="sudo -n"
fi
[ -x "$PY" ] && [ -x "$SMTPGUARD" ] || fail "no virtualenv at .venv: run make venv first"

# --- 1. packages --------------------------------------------------------------
need=()
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v runc >/dev/null 2>&1 || [ -x /usr/sbin/runc ] || need+=(runc)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || need+=(debootstrap)
[ -x /usr/libexec/podman/catatonit ] || need+=(catatonit)      # podman run --init
command -v swaks >/dev/null 2>&1 || need+=(swaks)
if [ ${#need[@]} -gt 0 ]; then
  command -v apt-get >/dev/null 2>&1 || skip "podman is not installed and there is no apt-get to install ${need[*]}"
  ts=$(date +%s)
  say "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq || skip "apt-get update failed: cannot install ${need[*]}"
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
    || skip "apt-get cannot install ${need[*]} here"
  say "packages installed in $(elapsed "$ts") s"
fi
export PATH=$PATH:/usr/sbin:/sbin

# --- 2. containers.conf ---------------------------------------------------------
# runc: this VM's cgroups (v1, cgroupfs) are what runc handles here; the
# ulimits: podman's defaults exceed this VM's hard limits and runs fail.
conf_body='[containers]
default_ulimits = ["nofile=20000:20000", "nproc=4096:4096"]

[engine]
runtime = "runc"
'
if [ ! -e /etc/containers/containers.conf ]; then
  $SUDO mkdir -p /etc/containers
  printf '# written by smtpguard scripts/image-test.sh (issue 17)\n%s' "$conf_body" | $SUDO tee /etc/containers/containers.conf >/dev/null
elif ! grep -q 'default_ulimits' /etc/containers/containers.conf || ! grep -q '^runtime *= *"runc"' /etc/containers/containers.conf; then
  # An existing file of someone else's is left alone; a drop-in adds ours.
  $SUDO mkdir -p /etc/containers/containers.conf.d
  printf '%s' "$conf_body" | $SUDO tee /etc/containers/containers.conf.d/50-smtpguard-image-test.conf >/dev/null
fi
$SUDO podman info >/dev/null 2>"$WORK/info.err" || skip "podman cannot run here: $(tail -1 "$WORK/info.err")"

$SUDO podman volume ls -q | sort >"$WORK/volumes.before"
$SUDO podman images -q --filter dangling=true >"$WORK/dangling.before"

# --- 3. the base image ------------------------------------------------------------
if ! $SUDO podman image exists "$BASE"; then
  ts=$(date +%s)
  # The mirror apt uses here: the first bookworm source in sources.list(.d).
  mirror=$(
    { cat /etc/apt/sources.list 2>/dev/null | awk '$1=="deb" && $3 ~ /^bookworm$/ {print $2; exit}'
      for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && awk 'BEGIN{RS=""} /Suites:[^\n]*bookworm( |$|\n)/ && /Types:[^\n]*deb( |$|\n)/ && !/Enabled: *no/ {
            if (match($0, /URIs: *[^ \n]+/)) { s=substr($0, RSTART, RLENGTH); sub(/URIs: */, "", s); print s; exit } }' "$f"
      done; } | grep -v -- '-security' | head -1)
  [ -n "$mirror" ] || skip "no bookworm mirror in /etc/apt/sources.list*: cannot debootstrap a base image"
  rootfs="$WORK/rootfs"
  say "no $BASE: debootstrap --variant=minbase bookworm from the mirror apt uses"
  $SUDO debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -5 "$WORK/debootstrap.log" >&2; fail "debootstrap failed"; }
  # pip inside the build reaches the package index as the host's pip does:
  # the host's CA bundle, its local CAs (which update-ca-certificates adds
  # again when the build installs ca-certificates and rewrites the bundle)
  # and every pip configuration file that exists here.
  for f in /etc/ssl/certs/ca-certificates.crt /usr/local/share/ca-certificates \
           /etc/pip.conf /etc/xdg/pip /root/.config/pip "${HOME:-/root}/.config/pip"; do
    [ -e "$f" ] || continue
    $SUDO mkdir -p "$rootfs$(dirname "$f")"
    $SUDO cp -a "$f" "$rootfs$(dirname "$f")/"
  done
  # Slim as Debian's -slim images are: no package caches, lists, docs,
  # manuals or translations, now and after every later apt-get install.
  printf '%s\n' 'Dir::Cache::pkgcache "";' 'Dir::Cache::srcpkgcache "";' \
    'DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb || true"; };' \
    | $SUDO tee "$rootfs/etc/apt/apt.conf.d/docker-clean" >/dev/null
  printf 'path-exclude %s\n' '/usr/share/doc/*' '/usr/share/man/*' '/usr/share/info/*' '/usr/share/locale/*' \
    | $SUDO tee "$rootfs/etc/dpkg/dpkg.cfg.d/docker-slim" >/dev/null
  $SUDO rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* \
               "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/*
  # The host's PIP_* variables, as the image's environment (values never printed).
  changes=(--change 'CMD ["bash"]')
  while IFS= read -r var; do
    changes+=(--change "ENV $var=${!var}")
  done < <(compgen -e | grep '^PIP_' || true)
  $SUDO tar -C "$rootfs" -c . | $SUDO podman import "${changes[@]}" - "$BASE" >/dev/null
  $SUDO rm -rf "$rootfs"
  say "base image $BASE made in $(elapsed "$ts") s"
fi

# --- 4. build -----------------------------------------------------------------------
# build IMAGE DIR LOG: podman build; the image it replaces under that name is removed.
build() {
  local old
  old=$($SUDO podman image inspect --format '{{.Id}}' "$1" 2>/dev/null || true)
  $SUDO podman build --network=host --format docker --pull=never -t "$1" "$2" >"$3" 2>&1 || return 1
  if [ -n "$old" ] && [ "$old" != "$($SUDO podman image inspect --format '{{.Id}}' "$1")" ]; then
    $SUDO podman rmi "$old" >/dev/null 2>&1 || true
  fi
}
ts=$(date +%s)
build "$IMAGE" . "$WORK/build.log" || { tail -20 "$WORK/build.log" >&2; fail "podman build failed"; }
build_s=$(elapsed "$ts")
size=$($SUDO podman image inspect --format '{{.Size}}' "$IMAGE")
say "image $IMAGE built in ${build_s} s, $(( size / 1000000 )) MB"

# The image as shipped: numeric user, health check, stop signal, entrypoint.
inspect() { $SUDO podman image inspect --format "$1" "$IMAGE"; }
[ "$(inspect '{{.Config.User}}')" = "10025:10025" ] || fail "image user is not numeric 10025:10025"
inspect '{{json .Config.Healthcheck}}' | grep -q 'smtpguard' || fail "no HEALTHCHECK running smtpguard health"
[ "$(inspect '{{.Config.StopSignal}}')" = "SIGTERM" ] || fail "STOPSIGNAL is not SIGTERM"
[ "$(inspect '{{json .Config.Entrypoint}}')" = '["smtpguard","serve"]' ] || fail "ENTRYPOINT is not smtpguard serve"
inspect '{{index .Config.Labels "org.opencontainers.image.title"}}' | grep -qx smtpguard || fail "no OCI title label"

# No file in the image carries capabilities (a setcap'd interpreter fails under --cap-drop=ALL).
caps=$($SUDO podman run --rm --network=none --entrypoint python3 "$IMAGE" -c '
import os
for top in ("/usr", "/opt", "/bin", "/sbin"):
    for d, _, files in os.walk(top):
        for n in files:
            p = os.path.join(d, n)
            try:
                os.getxattr(p, "security.capability", follow_symlinks=False)
                print(p)
            except OSError:
                pass
') || fail "cannot scan the image for file capabilities"
[ -z "$caps" ] || fail "files with capabilities in the image: $caps"

# No configuration at all: one line naming what is missing, exit 2.
set +e
$SUDO podman run --rm --network=none "$IMAGE" >"$WORK/noconf.out" 2>&1
code=$?
set -e
[ "$code" -eq 2 ] && grep -q -- '--upstream' "$WORK/noconf.out" || fail "without configuration: exit $code, $(cat "$WORK/noconf.out")"
# A bad variable is named: exit 2.
set +e
$SUDO podman run --rm --network=none -e SMTPGUARD_UPSTREAM=mta:99999 -e SMTPGUARD_DOMAIN=example.test "$IMAGE" >"$WORK/badenv.out" 2>&1
code=$?
set -e
[ "$code" -eq 2 ] && grep -q 'SMTPGUARD_UPSTREAM' "$WORK/badenv.out" || fail "bad SMTPGUARD_UPSTREAM: exit $code, $(cat "$WORK/badenv.out")"

# --- 5. run it ------------------------------------------------------------------------
read -r SINK_PORT GUARD_PORT HTTP_PORT < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
"$SMTPGUARD" sink --listen "127.0.0.1:$SINK_PORT" --maildir "$WORK/maildir" >"$WORK/sink.log" 2>&1 &
SINK_PID=$!

ts=$(date +%s)
$SUDO podman run -d --init --name "$NAME" --network=host --cap-drop=ALL --read-only \
  -e SMTPGUARD_LISTEN="127.0.0.1:$GUARD_PORT" \
  -e SMTPGUARD_HTTP="127.0.0.1:$HTTP_PORT" \
  -e SMTPGUARD_DOMAIN=example.test \
  -e SMTPGUARD_LOG_FORMAT=json \
  "$IMAGE" \
  --upstream "127.0.0.1:$SINK_PORT" --hostname mx.example.test \
  --resolution-url 'https://example.test/smtp?code={code}&ip={ip}' >/dev/null

# The health check turns healthy (each run is the image's own HEALTHCHECK command).
healthy=""
for _ in $(seq 1 60); do
  if $SUDO podman healthcheck run "$NAME" >/dev/null 2>&1; then healthy=yes; break; fi
  [ "$($SUDO podman inspect --format '{{.State.Running}}' "$NAME")" = true ] || break
  "$PY" -c 'import select; select.select([], [], [], 0.5)'   # poll interval, not a synchronisation
done
if [ -z "$healthy" ]; then
  $SUDO podman logs "$NAME" >&2 || true
  fail "the container never turned healthy"
fi
status=$($SUDO podman inspect --format '{{.State.Health.Status}}' "$NAME" 2>/dev/null || $SUDO podman inspect --format '{{.State.Healthcheck.Status}}' "$NAME")
[ "$status" = healthy ] || fail "health status is $status"
# With SMTPGUARD_HTTP the image's check asks /healthz; compose's (below) reads the greeting.
$SUDO podman exec "$NAME" smtpguard health >"$WORK/health.txt" 2>&1 || true
grep -qx "healthy: http://127.0.0.1:$HTTP_PORT/healthz: HTTP 200" "$WORK/health.txt" \
  || fail "the health check did not ask /healthz: $(cat "$WORK/health.txt")"
say "container healthy after $(elapsed "$ts") s"

# One message delivered, through the container, to the sink.
swaks --server "127.0.0.1:$GUARD_PORT" --helo client.example.net --from sender@example.net \
      --to postmaster@example.test --header 'Subject: image-test' >"$WORK/swaks-ok.txt" 2>&1 \
  || { cat "$WORK/swaks-ok.txt" >&2; fail "swaks could not deliver through the container"; }
grep -q '^<-  250 .*[Qq]ueued' "$WORK/swaks-ok.txt" || fail "no 250 queued at the end of DATA"
"$PY" -c 'import os,sys; sys.exit(0 if len(os.listdir(sys.argv[1])) == 1 else 1)' "$WORK/maildir/new" \
  || fail "the sink did not store exactly one message"
grep -q '^Subject: image-test' "$WORK"/maildir/new/* || fail "the stored message is not the one sent"

# One relay refused, with the reason code and the resolution URL.
set +e
swaks --server "127.0.0.1:$GUARD_PORT" --helo client.example.net --from sender@example.net \
      --to someone@elsewhere.example >"$WORK/swaks-relay.txt" 2>&1
set -e
grep -q '^<\*\* 550 5\.7\.1 \[RELAY\] .*https://example\.test/smtp?code=RELAY&ip=127\.0\.0\.1' "$WORK/swaks-relay.txt" \
  || { cat "$WORK/swaks-relay.txt" >&2; fail "the relay attempt was not refused with [RELAY] and the URL"; }

# podman stop: a session in DATA finishes within the grace period; the
# listener closes at once; the container exits 0.
"$PY" - "$GUARD_PORT" "$NAME" "$SUDO" >"$WORK/stop.txt" 2>&1 <<'EOF' || { cat "$WORK/stop.txt" >&2; fail "stop with a session in DATA"; }
import smtplib, socket, subprocess, sys, time
port, name, sudo = int(sys.argv[1]), sys.argv[2], sys.argv[3].split()
s = smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.net", timeout=30)
s.ehlo()
assert s.mail("sender@example.net")[0] == 250
assert s.rcpt("postmaster@example.test")[0] == 250
assert s.docmd("DATA")[0] == 354
s.send(b"Subject: in flight during stop\r\n\r\nfirst half\r\n")
t = time.monotonic()
stop = subprocess.Popen(sudo + ["podman", "stop", "-t", "40", name], stdout=subprocess.DEVNULL)
# Stopping has begun when the listener refuses new connections.
deadline = time.monotonic() + 20
while True:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        break
    if time.monotonic() > deadline:
        sys.exit("the listener still accepts 20 s after podman stop")
    time.sleep(0.1)
s.send(b"second half\r\n.\r\n")
code, text = s.getreply()
print(f"end of DATA during stop: {code} {text.decode()}")
assert code == 250, (code, text)
s.quit()
assert stop.wait(60) == 0
took = time.monotonic() - t
print(f"podman stop returned after {took:.1f} s")
assert took < 30, took   # within server.grace_period (30 s): the session ended it, not the timeout
EOF
cat "$WORK/stop.txt" >&2
[ "$($SUDO podman inspect --format '{{.State.ExitCode}}' "$NAME")" = 0 ] || fail "the container did not exit 0 after SIGTERM"
"$PY" -c 'import os,sys; sys.exit(0 if len(os.listdir(sys.argv[1])) == 2 else 1)' "$WORK/maildir/new" \
  || fail "the message sent during stop was not delivered"

# --- 6. the compose example, started for real -------------------------------------------
# examples/compose as shipped, with an override for what this machine lacks:
# no Internet (zones-init fetches from a loopback HTTP server, with the real
# `zones update`), no registry (Debian's redis-server under the image name
# the file uses, as for the base image), and other engineers' ports (free
# loopback ports for smtpguard, Postfix (POSTFIX_LISTEN, a variable of the
# file) and Redis). Then: swaks through compose's smtpguard into
# compose's Postfix by XCLIENT, the message in Postfix's Maildir; a SIGHUP
# from zones-refresh reaches smtpguard; `down` within the grace period.
COMPOSE_BIN=${COMPOSE_BIN:-$ROOT_DIR/.venv/bin/podman-compose}
compose_note=""
if [ ! -x "$COMPOSE_BIN" ]; then
  compose_note="SKIPPED: podman-compose is not installed (pip package, in the test extra)"
fi
if [ -n "$compose_note" ]; then
  say "compose: $compose_note"
else
  ts=$(date +%s)
  PROJECT=sgit$$
  $SUDO podman tag "$IMAGE" localhost/smtpguard:latest
  build localhost/smtpguard-postfix:latest examples/compose/postfix "$WORK/build-postfix.log" \
    || { tail -20 "$WORK/build-postfix.log" >&2; fail "the compose Postfix image does not build"; }
  REDIS_IMAGE=docker.io/library/redis:7-bookworm
  if ! $SUDO podman image exists "$REDIS_IMAGE"; then
    mkdir -p "$WORK/redis"
    printf '%s\n' 'FROM docker.io/library/debian:bookworm-slim' \
      'RUN apt-get update && apt-get install -y --no-install-recommends redis-server && rm -rf /var/lib/apt/lists/*' \
      'WORKDIR /data' >"$WORK/redis/Containerfile"
    $SUDO podman build --network=host --pull=never -t "$REDIS_IMAGE" "$WORK/redis" >"$WORK/build-redis.log" 2>&1 \
      || { tail -20 "$WORK/build-redis.log" >&2; fail "no stand-in Redis image"; }
  fi
  read -r ZONE_PORT GUARD2_PORT REDIS_PORT POSTFIX_PORT < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(4)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
  mkdir -p "$WORK/zonesrc/ipv4" "$WORK/zonesrc/ipv6"
  i=0
  for cc in us ca mx; do
    i=$((i + 1))
    echo "198.51.$((100 + i)).0/24" >"$WORK/zonesrc/ipv4/$cc.zone"
    echo "2001:db8:$i::/48" >"$WORK/zonesrc/ipv6/$cc.zone"
  done
  "$PY" -m http.server --bind 127.0.0.1 --directory "$WORK/zonesrc" "$ZONE_PORT" >"$WORK/zonesrv.log" 2>&1 &
  ZONE_PID=$!
  cat >"$WORK/override.yaml" <<YAML
services:
  smtpguard:
    container_name: $PROJECT-smtpguard
    environment:
      SMTPGUARD_LISTEN: "127.0.0.1:$GUARD2_PORT"
      SMTPGUARD_STATE: "redis://127.0.0.1:$REDIS_PORT/0"
  zones-init:
    network_mode: host
    entrypoint: ["smtpguard", "zones", "update", "--dest", "/var/lib/smtpguard/zones/ipdeny", "--countries", "us,ca,mx",
                 "--base-url", "http://127.0.0.1:$ZONE_PORT/ipv4/{cc}.zone",
                 "--ipv6-base-url", "http://127.0.0.1:$ZONE_PORT/ipv6/{cc}.zone"]
  zones-refresh:
    pid: "container:$PROJECT-smtpguard"
  redis:
    command: ["redis-server", "--bind", "127.0.0.1", "--port", "$REDIS_PORT", "--appendonly", "yes"]
YAML
  pc() { $SUDO "$COMPOSE_BIN" -p "$PROJECT" -f examples/compose/compose.yaml -f "$WORK/override.yaml" "$@"; }
  compose_down() {
    # rm -v: the containers' anonymous volumes (the image's VOLUME) go too.
    for c in $($SUDO podman ps -aq --filter "label=io.podman.compose.project=$PROJECT"); do
      $SUDO podman rm -f -v -t 40 "$c" >>"$WORK/compose.log" 2>&1 || true
    done
    pc down -v -t 40 >>"$WORK/compose.log" 2>&1 || true
  }
  trap 'compose_down; kill $ZONE_PID 2>/dev/null || true; cleanup' EXIT
  MX_HOSTNAME=mx.example.com MAIL_DOMAINS=example.com POSTFIX_LISTEN="127.0.0.1:$POSTFIX_PORT" pc up -d >"$WORK/compose.log" 2>&1 \
    || { tail -30 "$WORK/compose.log" >&2; fail "podman-compose up failed"; }
  cid() { $SUDO podman ps -a --filter "label=io.podman.compose.project=$PROJECT" \
            --filter "label=com.docker.compose.service=$1" --format '{{.ID}}' | head -1; }
  SG=$(cid smtpguard)
  [ -n "$SG" ] || { tail -30 "$WORK/compose.log" >&2; fail "compose started no smtpguard container"; }
  healthy=""
  for _ in $(seq 1 60); do
    if $SUDO podman healthcheck run "$SG" >/dev/null 2>&1; then healthy=yes; break; fi
    "$PY" -c 'import select; select.select([], [], [], 0.5)'
  done
  [ -n "$healthy" ] || { $SUDO podman logs "$SG" >&2; fail "compose's smtpguard never turned healthy"; }
  $SUDO podman exec "$SG" smtpguard health >>"$WORK/health.txt" 2>&1 || true
  grep -q "^healthy: 127.0.0.1:$GUARD2_PORT greets: 220" "$WORK/health.txt" \
    || fail "compose's health check did not read the greeting: $(cat "$WORK/health.txt")"
  [ "$($SUDO podman inspect --format '{{.State.ExitCode}}' "$(cid zones-init)")" = 0 ] || fail "zones-init failed"
  swaks --server "127.0.0.1:$GUARD2_PORT" --local-interface 127.0.0.5 --helo client.example.net \
        --from sender@example.net --to postmaster@example.com --header 'Subject: compose-test' \
        >"$WORK/swaks-compose.txt" 2>&1 \
    || { cat "$WORK/swaks-compose.txt" >&2; $SUDO podman logs "$(cid postfix)" >&2; fail "no delivery through compose"; }
  PF=$(cid postfix)
  delivered=""
  for _ in $(seq 1 40); do
    delivered=$($SUDO podman exec "$PF" sh -c 'cat /var/mail/vhosts/example.com/postmaster/new/* 2>/dev/null' || true)
    [ -n "$delivered" ] && break
    "$PY" -c 'import select; select.select([], [], [], 0.5)'
  done
  [ -n "$delivered" ] || { $SUDO podman logs "$PF" >&2; fail "Postfix did not deliver the message into its Maildir"; }
  # XCLIENT: Postfix's Received header names the real client, not smtpguard.
  echo "$delivered" | grep -q '^Subject: compose-test' || fail "the delivered message is not the one sent"
  echo "$delivered" | grep -A1 '^Received: from client.example.net' | grep -q '\[127\.0\.0\.5\]' \
    || { echo "$delivered" >&2; fail "Postfix's Received header does not show the real client (XCLIENT)"; }
  # An unknown user: Postfix's 550 at RCPT, passed on by smtpguard unchanged.
  set +e
  swaks --server "127.0.0.1:$GUARD2_PORT" --local-interface 127.0.0.5 --helo client.example.net \
        --from sender@example.net --to nobody@example.com >"$WORK/swaks-compose-unknown.txt" 2>&1
  set -e
  grep -q '^<\*\* 550 5\.1\.1 <nobody@example\.com>: Recipient address rejected' "$WORK/swaks-compose-unknown.txt" \
    || { cat "$WORK/swaks-compose-unknown.txt" >&2; fail "Postfix's 550 for an unknown user did not come back"; }
  if $SUDO podman logs "$SG" 2>&1 | grep -q '"event": "store.unreachable"'; then
    fail "compose's smtpguard could not reach Redis"
  fi
  # zones-refresh shares smtpguard's PID namespace: its SIGHUP reaches smtpguard.
  $SUDO podman exec "$(cid zones-refresh)" sh -c 'kill -HUP 1'   # as its loop does (a shell builtin)
  reloaded=""
  for _ in $(seq 1 40); do
    $SUDO podman logs "$SG" 2>&1 | grep -q '"event": "reload' && { reloaded=yes; break; }
    "$PY" -c 'import select; select.select([], [], [], 0.5)'
  done
  [ -n "$reloaded" ] || { $SUDO podman logs "$SG" >&2; fail "SIGHUP from zones-refresh did not reach smtpguard"; }
  $SUDO podman logs "$SG" 2>&1 | grep '"event": "reload' | tail -1 >"$WORK/reload.txt"
  pc stop -t 40 >>"$WORK/compose.log" 2>&1 || fail "podman-compose stop failed"
  [ "$($SUDO podman inspect --format '{{.State.ExitCode}}' "$SG")" = 0 ] || fail "compose's smtpguard did not exit 0 on SIGTERM"
  compose_down
  kill "$ZONE_PID" 2>/dev/null || true
  say "compose: smtpguard -> Postfix (XCLIENT) -> Maildir, SIGHUP from zones-refresh, in $(elapsed "$ts") s"
fi

echo "--- swaks through the container: delivered ---"
cat "$WORK/swaks-ok.txt"
echo "--- swaks through the container: relay refused ---"
cat "$WORK/swaks-relay.txt"
if [ -z "$compose_note" ]; then
  echo "--- swaks through compose's smtpguard into compose's Postfix ---"
  cat "$WORK/swaks-compose.txt"
  echo "--- an unknown user, refused by Postfix through smtpguard ---"
  grep -E '^(<\*\*| -> RCPT)' "$WORK/swaks-compose-unknown.txt"
  echo "--- smtpguard's reload after zones-refresh's SIGHUP ---"
  cat "$WORK/reload.txt"
fi
echo "--- smtpguard health in the containers ---"
cat "$WORK/health.txt"
echo "--- container log (last lines) ---"
$SUDO podman logs "$NAME" 2>&1 | tail -8
say "image size $(( size / 1000000 )) MB; build ${build_s} s; all $(elapsed "$t0") s"
say "PASSED"
