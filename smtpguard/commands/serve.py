"""`smtpguard serve`: run the proxy."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from smtpguard import config as cfg
from smtpguard.observe import log


def add_common_config_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by `serve` and `check`; each has a key in the TOML file."""
    p.add_argument("--config", metavar="FILE", help="TOML configuration file; every flag has a key there, and a flag overrides it")
    p.add_argument("--domain", action="append", metavar="DOMAIN",
                   help="a domain accepted for delivery (repeatable); .example.com also accepts subdomains [server.domains]")
    p.add_argument("--hostname", metavar="NAME", help="banner and EHLO name (default: this machine's FQDN) [server.hostname]")
    p.add_argument("--resolution-url", metavar="TEMPLATE",
                   help="URL in every refusal; placeholders {code} {ip} {helo} {sender} {rcpt} {session}, "
                        "URL-encoded when filled [server.resolution_url]")
    p.add_argument("--dns-server", action="append", metavar="IP[:PORT]",
                   help="resolver for every lookup smtpguard makes (repeatable; default the system's) [dns.servers]")
    p.add_argument("--state", metavar="URL",
                   help="state store: sqlite:///path, redis://host:port/db or memory:// [state.url]")
    p.add_argument("--zones", metavar="DIR", help="directory of ipdeny-style *.zone country files [geo.zones]")
    p.add_argument("--allow-country", metavar="CC,CC", help="default-deny geoblocking: only these countries [geo.allow]")
    p.add_argument("--log-format", choices=cfg.LOG_FORMATS, help="text or json, one line per event [log.format]")
    p.add_argument("--log-level", choices=cfg.LOG_LEVELS, help="debug, info, warning or error [log.level]")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve", help="run the proxy",
        description="Listen for SMTP clients, decide about each from facts, and relay accepted mail "
        "to the real MTA (--upstream) in real time. Durations accept seconds or 30s/5m/2h/35d; "
        "sizes accept bytes or 35MB. SIGTERM/SIGINT stop gracefully; SIGHUP reloads.")
    add_common_config_flags(p)
    p.add_argument("--listen", action="append", metavar="HOST:PORT",
                   help="address to listen on (repeatable; IPv6 as [::1]:2525; default 0.0.0.0:25) [server.listen]")
    p.add_argument("--upstream", metavar="HOST:PORT", help="the real MTA (required unless in the config) [upstream.address]")
    p.add_argument("--max-message-size", metavar="BYTES", help="advertised with SIZE (default 35MB) [server.max_message_size]")
    p.add_argument("--max-recipients", metavar="N", help="recipients per message (default 100) [server.max_recipients]")
    p.add_argument("--tls-cert", metavar="FILE", help="certificate for STARTTLS (with --tls-key) [server.tls_cert]")
    p.add_argument("--tls-key", metavar="FILE", help="private key for STARTTLS (with --tls-cert) [server.tls_key]")
    p.add_argument("--workers", metavar="N",
                   help="processes serving the same addresses (SO_REUSEPORT); default 1 [server.workers]")
    p.set_defaults(func=run)


def load_config(args: argparse.Namespace) -> cfg.Config:
    return cfg.load(args.config, vars(args))


def run(args: argparse.Namespace) -> int:
    config = load_config(args)          # raises ConfigError: exit 2, nothing started
    from smtpguard.services import build_services

    log.setup(config.log.format, config.log.level)
    services = build_services(config, vars(args))  # raises ConfigError too, before any socket
    if config.server.workers > 1:
        from smtpguard.workers import supervise
        return supervise(config, vars(args))   # each worker builds its own after the fork
    return serve_one(config, vars(args), services)


def serve_one(config: cfg.Config, flags: dict[str, Any], services: Any = None) -> int:
    """One process serving until SIGTERM/SIGINT: the exit code."""
    from smtpguard.server import serve
    from smtpguard.services import build_services

    try:
        asyncio.run(serve(config, services or build_services(config, flags)))
    except OSError as e:
        # e.g. the port is taken or needs privileges: one line, not a traceback
        log.event("listen.error", 40, error=str(e))
        print(f"smtpguard: cannot listen: {e}", file=sys.stderr)
        return 1
    return 0
