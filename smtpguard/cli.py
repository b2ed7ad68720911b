"""`smtpguard` and `python -m smtpguard`: one subcommand per module in smtpguard/commands.

A configuration or flag error prints one line naming the key and exits 2,
having started nothing; never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Sequence

from smtpguard import __version__
from smtpguard.errors import ConfigError

# subcommand modules, in the order `--help` lists them
COMMANDS = ("serve", "check", "sink", "fingerprint", "zones", "graylist", "health", "report", "firewall", "page",
            "config_check")


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="smtpguard",
        description="A filtering SMTP front-end proxy: it decides about each client on connect, "
        "HELO, MAIL and RCPT from facts (country, OS fingerprint, reverse DNS, HELO, DNS lists, "
        "graylist state), refuses early with a reason code and a resolution URL, and relays "
        "accepted mail to the real MTA in real time.",
    )
    parser.add_argument("--version", action="version", version=f"smtpguard {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    for name in COMMANDS:
        importlib.import_module(f"smtpguard.commands.{name}").add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    env_origin: dict[str, str] = {}
    try:
        if hasattr(args, "config"):
            # The commands that read the configuration also read SMTPGUARD_*
            # variables: flags > environment > file (commands/serve.py).
            from smtpguard.commands.serve import apply_env

            env_origin = apply_env(args, parser, os.environ)
        return int(args.func(args) or 0)
    except ConfigError as e:
        if e.key in env_origin:   # the value came from a variable: name the variable
            e = ConfigError(env_origin[e.key], e.message)
        print(f"smtpguard: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
