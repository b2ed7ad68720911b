"""`smtpguard sink`: a small upstream that stores each message in a Maildir.

So that the project can be tried without an MTA (`make run`). It accepts
every recipient and writes each message, with a Return-Path and an
X-Original-To header, into DIR/new atomically (Maildir's tmp → new rename).
It is not a filter and not an MTA: it listens on loopback by default.
"""

from __future__ import annotations

import argparse
import asyncio
import mailbox
import os
import signal
import sys
from typing import Any

from smtpguard.config import parse_hostport
from smtpguard.errors import ConfigError


class MaildirHandler:
    def __init__(self, path: str) -> None:
        # Maildir(create=True) makes tmp/new/cur only when DIR itself is new.
        for sub in ("tmp", "new", "cur"):
            os.makedirs(os.path.join(path, sub), exist_ok=True)
        self.maildir = mailbox.Maildir(path, create=False)

    async def handle_exception(self, error: Exception) -> str:
        print(f"smtpguard sink: cannot store a message: {error}", file=sys.stderr, flush=True)
        return "451 4.3.0 the sink could not store the message"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        head = (f"Return-Path: <{envelope.mail_from if envelope.mail_from != '<>' else ''}>\r\n"
                f"X-Original-To: {', '.join(envelope.rcpt_tos)}\r\n").encode("ascii", "replace")
        data = head + (envelope.original_content or b"")
        # mailbox writes synchronously: off the event loop (STYLE.md §7).
        key = await asyncio.to_thread(self.maildir.add, data)
        return f"250 2.0.0 Ok: queued as {key}"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("sink", help="a Maildir-storing upstream for trying smtpguard without an MTA",
                       description="Accept SMTP on --listen and store each message in the Maildir --maildir.")
    p.add_argument("--listen", default="127.0.0.1:2526", metavar="HOST:PORT", help="default 127.0.0.1:2526")
    p.add_argument("--maildir", required=True, metavar="DIR", help="Maildir to store messages in (created if missing)")
    p.add_argument("--hostname", default="sink.localhost", metavar="NAME", help="banner name")
    p.set_defaults(func=run)


async def _serve(host: str, port: int, handler: MaildirHandler, hostname: str) -> None:
    from aiosmtpd.smtp import SMTP

    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname=hostname, ident="smtpguard-sink", data_size_limit=None),
        host=host, port=port)
    print(f"smtpguard sink: listening on {host}:{port}, storing into {handler.maildir._path}",  # noqa: SLF001
          file=sys.stderr, flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


def run(args: argparse.Namespace) -> int:
    host, port = parse_hostport("--listen", args.listen)
    try:
        handler = MaildirHandler(args.maildir)
    except OSError as e:
        raise ConfigError("--maildir", f"cannot use {args.maildir}: {e.strerror}") from None
    try:
        asyncio.run(_serve(host, port, handler, args.hostname))
    except OSError as e:
        print(f"smtpguard sink: cannot listen on {args.listen}: {e}", file=sys.stderr)
        return 1
    return 0
