#!/usr/bin/env bash
# Debian packages the tests and benchmarks use as real parts: Postfix's
# smtp-sink/smtp-source (upstream and load generator), swaks (a real SMTP
# client), redis-server (the shared store), p0f (its p0f.fp signature file),
# and the tools that check the deployment examples.
# Installs only what is missing; never starts an MTA.
set -euo pipefail

need=()
command -v smtp-sink >/dev/null 2>&1 || [ -x /usr/sbin/smtp-sink ] || need+=(postfix)
command -v swaks >/dev/null 2>&1 || need+=(swaks)
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
[ -f /etc/p0f/p0f.fp ] || need+=(p0f)
# systemd: `systemd-analyze verify` checks examples/systemd (tests/test_deploy_files.py)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
# nftables: `nft -c -f` checks the output of `smtpguard firewall export`
command -v nft >/dev/null 2>&1 || [ -x /usr/sbin/nft ] || need+=(nftables)
# podman: `podman-compose config` checks examples/compose and asks `podman
# version` first (scripts/image-test.sh adds runc and the rest for its builds)
command -v podman >/dev/null 2>&1 || need+=(podman)
# chromium: the resolution page and the HTML report opened in a real headless browser
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: missing ${need[*]} and no apt-get here: install them by hand" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "system-deps: missing ${need[*]}; run as root or install them by hand" >&2; exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
# Postfix asks what kind of mail server this is: "No configuration" means
# it installs its tools without configuring or starting an MTA.
echo "postfix postfix/main_mailer_type select No configuration" | $SUDO debconf-set-selections
echo "system-deps: installing ${need[*]}" >&2
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts redis-server as a service on install; the tests start their own.
$SUDO systemctl stop redis-server >/dev/null 2>&1 || $SUDO service redis-server stop >/dev/null 2>&1 || true
