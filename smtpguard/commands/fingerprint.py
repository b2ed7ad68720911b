"""`smtpguard fingerprint`: what OS does a SYN say it came from?

Two modes:
  smtpguard fingerprint HEX
      classify the IP + TCP header bytes of one SYN, given as hex (what
      TCP_SAVED_SYN returns, or the first bytes of `tcpdump -x` for a SYN)
      and print one JSON object.
  smtpguard fingerprint --listen HOST:PORT [--count N]
      accept connections with TCP_SAVE_SYN on the listener and print one
      JSON line per client; each connection is closed at once. The bound
      address is announced on stderr ("listening on HOST:PORT"), so port 0
      works.

Output: {"os", "os_name", "os_distance", "os_match", "status", "label",
"signature", "fields": {...}}; in --listen mode also "client" and
"client_port". `fields.signature` is the SYN as a p0f v3 `sig` line, ready
to paste into a signatures file. Bytes that are not a SYN still print a
result (os "unknown", fields null) and exit 0; bad flags print one line
naming the flag and exit 2.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import string
import sys
from typing import Any

from smtpguard.core.fingerprint import SignatureSet, classify
from smtpguard.errors import ConfigError
from smtpguard.sources.fingerprint import default_signatures, enable_save_syn, load_signature_file, read_saved_syn

PROG = "smtpguard fingerprint"
LISTEN_BACKLOG = 64  # a diagnostic tool: a handful of test clients at a time

_EPILOG = """\
examples:
  smtpguard fingerprint 4500003c...0103030a
  smtpguard fingerprint --listen 0.0.0.0:2525 --count 5
  smtpguard fingerprint --signatures /etc/p0f/p0f.fp --listen [::]:2525
"""


def add_parser(subparsers: Any) -> None:
    """Add the `fingerprint` subcommand to the CLI's subparsers."""
    p = subparsers.add_parser(
        "fingerprint",
        help="passive OS fingerprint of a SYN (hex) or of live clients",
        description="Classify a client's TCP SYN into an OS family the way the "
                    "connect stage does (p0f v3 signatures), from hex bytes or from "
                    "live connections.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("hex", nargs="?", metavar="HEX",
                   help="IP + TCP header bytes of one SYN as hex; spaces and colons are ignored")
    p.add_argument("--listen", metavar="HOST:PORT",
                   help="accept connections on this numeric address ([v6]:port for IPv6) "
                        "and print each client's fingerprint as a JSON line")
    p.add_argument("--count", metavar="N", default="0",
                   help="with --listen: stop after N clients (default 0: until interrupted)")
    p.add_argument("--signatures", metavar="FILE",
                   help="p0f v3 signature file (default: the shipped smtpguard.fp)")
    p.set_defaults(func=run)


def _fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return 2


def _parse_hex(text: str) -> bytes | None:
    cleaned = "".join(ch for ch in text if ch not in string.whitespace and ch != ":")
    if cleaned.lower().startswith("0x"):
        cleaned = cleaned[2:]
    try:
        return bytes.fromhex(cleaned)
    except ValueError:
        return None


def _parse_address(text: str) -> tuple[str, int] | None:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except OSError:
        return None
    return host, int(port)


def run(args: argparse.Namespace) -> int:
    """Run the command; 0 on success, 2 for bad input, 1 if listening failed."""
    try:
        return _run(args)
    except BrokenPipeError:
        # The reader went away (`... | head -n 3`): stop quietly like other
        # Unix tools, and keep the interpreter's final flush from failing too.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, io.UnsupportedOperation):
            pass
        return 0


def _run(args: argparse.Namespace) -> int:
    if args.hex is not None and args.listen is not None:
        return _fail("HEX and --listen: give one of them, not both")
    if args.hex is None and args.listen is None:
        return _fail("HEX: give the SYN bytes as hex, or --listen HOST:PORT")
    count_text = str(args.count)
    if not count_text.isdigit():
        return _fail(f"--count: expected a whole number of clients (0 = no limit), got {count_text!r}")

    sigs: SignatureSet
    if args.signatures:
        try:
            sigs = load_signature_file(args.signatures, key="--signatures")
        except ConfigError as exc:
            return _fail(str(exc))
    else:
        sigs = default_signatures()

    if args.hex is not None:
        data = _parse_hex(args.hex)
        if data is None:
            return _fail(f"HEX: not hexadecimal bytes: {args.hex[:60]!r}")
        print(json.dumps(classify(data, sigs).as_dict()))
        return 0

    address = _parse_address(args.listen)
    if address is None:
        return _fail(f"--listen: expected a numeric HOST:PORT such as 127.0.0.1:2525 or [::1]:2525, got {args.listen!r}")
    return _listen(address, int(count_text), sigs)


def _listen(address: tuple[str, int], count: int, sigs: SignatureSet) -> int:
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        listener = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        print(f"{PROG}: --listen: {exc.strerror or exc}", file=sys.stderr)
        return 1
    with listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if not enable_save_syn(listener):
            print(f"{PROG}: --listen: TCP_SAVE_SYN is not available here (needs Linux 4.2 or newer)",
                  file=sys.stderr)
            return 1
        try:
            listener.bind((host, port))
            listener.listen(LISTEN_BACKLOG)
        except OSError as exc:
            print(f"{PROG}: --listen: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        bound = listener.getsockname()
        shown = f"[{bound[0]}]:{bound[1]}" if family == socket.AF_INET6 else f"{bound[0]}:{bound[1]}"
        print(f"listening on {shown}", file=sys.stderr, flush=True)
        seen = 0
        try:
            while count == 0 or seen < count:
                conn, peer = listener.accept()
                with conn:
                    fact = classify(read_saved_syn(conn), sigs)
                out: dict[str, object] = {"client": peer[0], "client_port": peer[1]}
                out.update(fact.as_dict())
                print(json.dumps(out), flush=True)
                seen += 1
        except KeyboardInterrupt:
            pass
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m smtpguard.commands.fingerprint ...`)."""
    parser = argparse.ArgumentParser(prog="smtpguard")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["fingerprint", *(sys.argv[1:] if argv is None else argv)])
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
