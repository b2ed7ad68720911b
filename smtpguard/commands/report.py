"""`smtpguard report LOG…`: study your traffic before you block it; replay a new policy over it.

Reads the JSON decision log (`--log-format json`; rotated and gzip'ed files
too) in one streaming pass and prints sessions and delivered messages by
country, OS family, rDNS class and outcome, and country x OS, country x
rDNS, with the share of delivered mail in each (observe/report.py).
`--policy NEW.toml` replays the logged facts of every session through the
rules of another configuration and lists what it would have refused,
deferred or let through differently, grouped by rule and reason, with
examples (observe/replay.py).

Exit codes: 0 done; 2 bad input (a flag, an unreadable log, a bad policy
file: one line naming it).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections import Counter
from typing import Any, Callable, Sequence

from smtpguard import config as cfg
from smtpguard.core.policy import Policy
from smtpguard.core.units import parse_duration
from smtpguard.commands.output import write_output
from smtpguard.errors import ConfigError
from smtpguard.observe import report as rep
from smtpguard.observe.replay import Replay

FORMATS = ("text", "json", "html")
# A configuration written only for its rules has no upstream or domains;
# neither is used here.
PLACEHOLDER_UPSTREAM = "127.0.0.1:25"
PLACEHOLDER_DOMAIN = "report.invalid"
PLACEHOLDER_ZONES = "(the countries of the log)"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "report", help="sessions and delivered mail by country, OS and rDNS; replay a new policy",
        description="Read the JSON decision log (rotated and .gz files too) and show sessions and "
        "delivered messages by country, OS family, rDNS class (none, unconfirmed, confirmed, "
        "generic), action and reason, country x OS and country x rDNS. With --policy, replay the "
        "logged facts through another configuration's rules and list what it would do differently.")
    p.add_argument("logs", nargs="+", metavar="LOG", help="decision log files (- for standard input)")
    p.add_argument("--since", metavar="DURATION", help="only sessions of the last DURATION (30d, 12h, 3600)")
    p.add_argument("--format", choices=FORMATS, default="text", help="text (default), json or html")
    p.add_argument("--out", metavar="FILE", help="write to FILE instead of standard output")
    p.add_argument("--policy", metavar="NEW.toml",
                   help="a configuration whose [policy], [lists], [geo] and [[rule]] are replayed")
    p.set_defaults(func=run)


def load_policy(path: str) -> Policy:
    """The policy of a configuration file, validated as `serve` would."""
    try:
        doc = cfg.read_toml(path)
    except ConfigError as e:
        raise ConfigError("--policy", e.message) from None
    # hostname given so that no lookup of this machine's name is made
    flags: dict[str, Any] = {"hostname": "report.invalid"}
    geo = doc.get("geo")
    if geo is None or (isinstance(geo, dict) and not geo.get("zones") and not geo.get("mmdb")):
        # The countries are in the log: a rule on country needs no zone data
        # to be replayed (serve refuses such a rule without it; this value is
        # never opened).
        flags["zones"] = PLACEHOLDER_ZONES
    upstream = doc.get("upstream")
    server = doc.get("server")
    if not (isinstance(upstream, dict) and upstream.get("address")):
        flags["upstream"] = PLACEHOLDER_UPSTREAM
    if not (isinstance(server, dict) and server.get("domains")):
        flags["domain"] = [PLACEHOLDER_DOMAIN]
    return cfg.build(doc, flags, path).policy


def build(paths: Sequence[str], since: float = 0.0, policy: Policy | None = None,
          now: Callable[[], float] = time.time) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """One pass over the logs: the report and, with a policy, the replay."""
    cutoff = now() - since if since else 0.0
    report = rep.Report()
    replay = Replay(policy) if policy is not None else None
    stats: Counter[str] = Counter()
    for path in paths:
        try:
            stream = rep.open_log(path)
        except OSError as e:
            raise ConfigError("LOG", f"cannot read {path}: {e.strerror}") from None
        with stream if path != "-" else contextlib.nullcontext(stream) as lines:
            for record in rep.close_records(lines, cutoff, stats):
                report.add(record)
                if replay is not None:
                    replay.add(record)
    report.stats.update(stats)
    return report.result(), (replay.result() if replay is not None else None)


def render(fmt: str, result: dict[str, Any], replayed: dict[str, Any] | None) -> str:
    if fmt == "json":
        import json
        out: dict[str, Any] = {"report": result}
        if replayed is not None:
            out["replay"] = replayed
        return json.dumps(out, indent=2) + "\n"
    if fmt == "html":
        return rep.html(result, replayed)
    body = rep.text(result)
    if replayed is not None:
        body += "\n" + rep.replay_text(replayed)
    return body


def run(args: argparse.Namespace) -> int:
    since = 0.0
    if args.since:
        try:
            since = parse_duration(args.since)
        except ValueError as e:
            raise ConfigError("--since", str(e)) from None
    if args.format == "html":
        try:
            import matplotlib  # noqa: F401  (the charts; an optional extra)
        except ImportError:
            raise ConfigError("--format", "html needs matplotlib: pip install 'smtpguard[report]'") from None
    policy = load_policy(args.policy) if args.policy else None
    result, replayed = build(args.logs, since, policy)
    if not result["sessions"] and not result["before_since"]:
        print("smtpguard: no sessions in these logs: the report reads the JSON decision log "
              "(serve --log-format json, or [log] format = \"json\")", file=sys.stderr)
    body = render(args.format, result, replayed)
    write_output(body, args.out)
    return 0
