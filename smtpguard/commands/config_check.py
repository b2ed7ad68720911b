"""`smtpguard config check [--config F]`: is this configuration good to serve with?

Decides: whether `serve` would start with this configuration, as
`postfix check` and `nginx -t` do for theirs.
Inputs: the config file and the same flags and SMTPGUARD_* variables as
`serve` (the file's values, overridden by them).
Output: a one-screen summary of what would run (listeners, upstream, the
policy's rules by stage, country data, DNS lists, the state store) and any
warnings, exit 0; or one line naming the key at fault, exit 2.
Failure modes: everything `serve` validates before it opens a socket is
loaded for real: the config and rules, the zone files or .mmdb, the
fingerprint signatures, the TLS certificate and key, and the state store,
which must answer a ping (an unreachable Redis is an error here, although
`serve` starts without it). Nothing is written: a missing sqlite directory
is reported as one that `serve` will create, and no socket is bound.
Defaults and why: none of its own; it reads what `serve` reads.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from typing import Any

from smtpguard import config as cfg
from smtpguard.commands.serve import add_common_config_flags
from smtpguard.errors import ConfigError, StoreError

# The state store must answer within this (the store's own timeout still applies).
PING_TIMEOUT = 5.0


def add_parser(sub: Any) -> None:
    p = sub.add_parser("config", help="check a configuration (config check)",
                       description="Commands about the configuration file.")
    inner = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND", parser_class=type(p))
    c = inner.add_parser(
        "check", help="load and validate everything serve would, print a summary (exit 0) or the error (exit 2)",
        description="Load the configuration, the rules, the zones or .mmdb, the fingerprint signatures, the "
        "TLS files and the state store as `serve` would, without opening a socket; print a one-screen summary "
        "of the policy. Exit 0 when serve would start, 2 with one line naming the key otherwise.")
    add_common_config_flags(c)
    c.add_argument("--upstream", metavar="HOST:PORT", help="the real MTA [upstream.address]")
    c.add_argument("--listen", action="append", metavar="HOST:PORT", help="address to listen on [server.listen]")
    c.set_defaults(func=run)
    p.set_defaults(func=lambda _args: (p.print_help(), 2)[1])


def run(args: argparse.Namespace) -> int:
    from smtpguard.observe import log
    from smtpguard.services import (
        build_services,
        startup_warnings,
        state_directory,
        store_url,
    )

    config = cfg.load(args.config, vars(args))        # ConfigError: exit 2 (cli.py)
    log.setup(config.log.format, "error")              # the summary is the output, not the log
    services = build_services(config, vars(args), with_store=False)
    lines = summary(config, services)
    url = store_url(config)
    if url:
        directory = state_directory(url)
        if directory is not None and not os.path.isdir(directory):
            lines.append(f"state      {url}: directory {directory} is missing; serve creates it (mode 0750)")
        else:
            asyncio.run(_ping(url, config))
            lines.append(f"state      {_redacted(url)}: answers")
    for name, note in startup_warnings(config):
        lines.append(f"warning    {name}: {note}")
    print("\n".join(lines))
    return 0


async def _ping(url: str, config: cfg.Config) -> None:
    from smtpguard.adapters.store import open_store

    store = open_store(url, timeout=config.state.timeout)
    try:
        async with asyncio.timeout(PING_TIMEOUT):
            await store.ping()
    except (StoreError, TimeoutError) as e:
        raise ConfigError("state.url", f"the state store does not answer: {e or 'timed out'}") from None
    finally:
        await store.close()


def _redacted(url: str) -> str:
    from smtpguard.services import _redacted as redact

    return redact(url)


def summary(config: cfg.Config, services: Any) -> list[str]:
    s, u = config.server, config.upstream
    lines = [f"config     {config.path or '(flags only)'}: ok",
             "listen     " + " ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in s.listen)
             + (f" ({s.workers} workers)" if s.workers > 1 else ""),
             f"hostname   {s.hostname}",
             f"domains    {' '.join(s.domains)}",
             f"upstream   {u.host}:{u.port} xclient={'on' if u.xclient else 'off'} "
             f"xforward={'on' if u.xforward else 'off'} tls={u.tls}",
             f"tls        {'STARTTLS with ' + s.tls_cert if s.tls_cert else 'no STARTTLS (no certificate)'}"]
    geodb = services.geodb
    stats = getattr(geodb, "stats", None)
    if stats is not None:
        lines.append(f"geo        {stats.countries} countries, {stats.ranges4} IPv4 + {stats.ranges6} IPv6 ranges "
                     f"(allow {','.join(config.geo.allow) or '-'}, deny {','.join(config.geo.deny) or '-'})")
    else:
        lines.append("geo        no country data")
    lists = config.dnsbl.lists
    lines.append("dnsbl      " + (" ".join(f"{x.zone}({x.weight:+g})" for x in lists) if lists else "none"))
    policy = config.policy
    lines.append(f"policy     {len(policy.rules)} rules, refusals at {policy.reject_at}"
                 + (", observe only" if policy.observe else "")
                 + (", postmaster@/abuse@ always reachable" if policy.default_postmaster else ""))
    for rule in policy.rules:
        facts = ",".join(sorted(rule.facts)) or "always"
        reason = f" [{rule.reason}]" if rule.reason else ""
        lines.append(f"  {rule.stage:<8} {rule.action:<9} {rule.name}{reason} reads {facts}")
    return lines
