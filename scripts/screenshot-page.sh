#!/usr/bin/env bash
# Screenshots of the resolution page, for a person to look at it: for each
# reason code, CODE.html (the page as `smtpguard page CODE --html` prints
# it), CODE-phone.png (412x915) and CODE-desktop.png (1280x800), taken by
# Debian's headless chromium with a throw-away profile.
#
#   scripts/screenshot-page.sh [OUTDIR] [CODE...]
#   default: OUTDIR=run/page-shots, codes GEO RDNS GRAYLIST DNSBL PREGREET
#   SMTPGUARD=/path/to/smtpguard (default .venv/bin/smtpguard), CONFIG=FILE for [http] texts
set -euo pipefail

out="${1:-run/page-shots}"
shift || true
codes=("$@")
[ ${#codes[@]} -eq 0 ] && codes=(GEO RDNS GRAYLIST DNSBL PREGREET)
smtpguard="${SMTPGUARD:-.venv/bin/smtpguard}"
browser="$(command -v chromium || command -v chromium-browser || true)"
if [ -z "$browser" ]; then
  echo "screenshot-page: chromium is not installed (Debian package chromium; scripts/system-deps.sh)" >&2
  exit 1
fi
config=()
[ -n "${CONFIG:-}" ] && config=(--config "$CONFIG")

mkdir -p "$out"
profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
for code in "${codes[@]}"; do
  # an unknown code still prints the generic page (exit 1): keep it
  "$smtpguard" page "$code" --html --ip 192.0.2.7 --session 0a1b2c000001 "${config[@]}" > "$out/$code.html" || true
  for size in phone:412,915 desktop:1280,800; do
    "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
      --disable-background-networking --disable-component-update --disable-sync \
      --user-data-dir="$profile" --hide-scrollbars --window-size="${size#*:}" \
      --screenshot="$out/$code-${size%%:*}.png" "file://$(cd "$out" && pwd)/$code.html" >/dev/null 2>&1
  done
  echo "$out/$code-phone.png $out/$code-desktop.png"
done
