#!/usr/bin/env bash
# `make run`: smtpguard on 127.0.0.1:2525 in front of `smtpguard sink` on
# 127.0.0.1:2526, which stores each message in run/maildir.
#   swaks --to postmaster@example.test --server 127.0.0.1:2525
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
mkdir -p run/maildir
"$BIN/smtpguard" sink --listen 127.0.0.1:2526 --maildir run/maildir &
sink=$!
trap 'kill $sink 2>/dev/null || true' EXIT
echo "make run: try  swaks --to postmaster@example.test --server 127.0.0.1:2525  (messages land in run/maildir/new)" >&2
"$BIN/smtpguard" serve --config examples/smtpguard.toml "$@"
