"""`smtpguard graylist`: look at and change the graylist state.

  graylist list  [--json] [--limit N] [--trapped | --allowed]
  graylist allow CIDR|DOMAIN [--ttl 35d]
  graylist deny  CIDR|DOMAIN
  graylist untrap IP|NETWORK
  graylist purge
  graylist stats [--json]

All act on the store named by `--state URL`, else by `[state] url` of
`--config FILE` (only the [state] and [graylist] tables are read), else the
default sqlite file. Exit codes: 0 done, 1 the store could not answer,
2 bad input (one line naming the flag).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
import tomllib
from collections import Counter
from typing import Any, AsyncIterator, Callable

from smtpguard.adapters.store import DEFAULT_URL, Item, Store, open_store
from smtpguard.core import graylist as g
from smtpguard.core.units import parse_duration
from smtpguard.errors import ConfigError, StoreError
from smtpguard.sources import graylist as source
from smtpguard.sources.graylist import GraylistSettings, StateSettings

DEFAULT_LIMIT = 50  # a screenful; --limit asks for more


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "graylist", help="list, allow, deny, purge and count graylist entries",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # SUPPRESS: an absent flag must not overwrite a value the top-level
    # parser (e.g. a global --config) already set.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--state", metavar="URL", default=argparse.SUPPRESS,
                        help=f"state store URL (default: [state] url of --config, else {DEFAULT_URL})")
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="smtpguard TOML file; only [state] and [graylist] are read")
    actions = parser.add_subparsers(dest="graylist_action", metavar="ACTION", required=True)

    p = actions.add_parser("list", parents=[common], help="show entries (triplets by default)",
                           description="Show graylist entries, at most --limit of them.")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--trapped", action="store_true", help="show trapped networks instead of triplets")
    which.add_argument("--allowed", action="store_true", help="show admin allow entries instead of triplets")
    p.add_argument("--limit", metavar="N", default=str(DEFAULT_LIMIT),
                   help=f"show at most N entries (default {DEFAULT_LIMIT})")
    p.add_argument("--json", action="store_true", help="print a JSON array instead of a table")

    p = actions.add_parser("allow", parents=[common], help="skip graylisting for a network or domain",
                           description="Add an admin allow entry: a CIDR network (an address is its "
                                       "/32 or /128) or the registrable domain of a client's confirmed rDNS.")
    p.add_argument("target", metavar="CIDR|DOMAIN")
    p.add_argument("--ttl", metavar="DURATION", default=None,
                   help="remove the entry after this long, e.g. 35d (default: never)")

    p = actions.add_parser("deny", parents=[common], help="remove an admin allow entry",
                           description="Remove the admin allow entry for a CIDR network or domain.")
    p.add_argument("target", metavar="CIDR|DOMAIN")

    p = actions.add_parser("untrap", parents=[common], help="lift a spamtrap from a network",
                           description="Remove the trap on the network of an address (its /24 or /64, "
                                       "as `list --trapped` shows it), before trap_ttl ends it.")
    p.add_argument("target", metavar="IP|NETWORK")

    actions.add_parser("purge", parents=[common], help="delete expired entries now",
                       description="Delete expired entries (redis expires keys itself).")

    p = actions.add_parser("stats", parents=[common], help="count entries by kind",
                           description="Count triplets, clients, traps and allow entries.")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    parser.set_defaults(func=run)


class BadInput(Exception):
    """One line for stderr, naming the flag; exit code 2."""


def run(args: argparse.Namespace) -> int:
    # A bad URL given as --state is reported against the flag, not the TOML key.
    url_from = "--state" if getattr(args, "state", None) is not None else "state.url"
    try:
        state, settings = _settings(args)
        store = open_store(state.url, timeout=state.timeout)
        handler = _ACTIONS[args.graylist_action]
        return asyncio.run(_with_store(store, handler, args, settings))
    except ConfigError as exc:
        key = url_from if exc.key == "state.url" else exc.key
        print(f"graylist: {key}: {exc.message}", file=sys.stderr)
        return 2
    except BadInput as exc:
        print(f"graylist: {exc}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"graylist: the state store could not answer: {exc}", file=sys.stderr)
        return 1


async def _with_store(store: Store, handler: Any, args: argparse.Namespace, settings: GraylistSettings) -> int:
    try:
        await store.ping()  # a store that cannot answer says so, whatever the action
        result: int = await handler(store, args, settings, time.time())
        return result
    finally:
        try:
            await store.close()
        except StoreError:
            pass


def _settings(args: argparse.Namespace) -> tuple[StateSettings, GraylistSettings]:
    state: dict[str, Any] = {}
    graylist: dict[str, Any] = {}
    config = getattr(args, "config", None)
    if config is not None:
        try:
            with open(config, "rb") as f:
                doc = tomllib.load(f)
        except OSError as exc:
            raise BadInput(f"--config {config}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise BadInput(f"--config {config}: {exc}") from None
        state = doc.get("state", {})
        graylist = doc.get("graylist", {})
    if getattr(args, "state", None) is not None:
        state = {**state, "url": args.state}
    return StateSettings.from_mapping(state), GraylistSettings.from_mapping(graylist)


def _when(t: float) -> str:
    if math.isinf(t):
        return "never"
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _limit(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise BadInput(f"--limit: expected a whole number of at least 1, got {text!r}")
    return n


def _triplet_row(item: Item) -> dict[str, Any] | None:
    parts = g.split_triplet_key(item.key)
    entry = g.decode_triplet(item.value)
    if parts is None or entry is None:
        return None
    state = "passed" if entry.state is g.TripletState.PASSED else "deferred"
    return {"client": parts[0], "sender": parts[1], "rcpt": parts[2], "state": state,
            "first_seen": _when(entry.first_seen), "last_seen": _when(entry.last_seen),
            "attempts": entry.attempts, "expires": _when(item.expires_at)}


async def _triplets(store: Store, now: float) -> AsyncIterator[dict[str, Any]]:
    async for item in store.scan(g.TRIPLET_PREFIX, now=now):
        row = _triplet_row(item)
        if row is not None:
            yield row


async def _trapped(store: Store, now: float) -> AsyncIterator[dict[str, Any]]:
    async for item in store.scan(g.TRAP_PREFIX, now=now):
        yield {"network": item.key[len(g.TRAP_PREFIX):], "trap": item.value, "expires": _when(item.expires_at)}


async def _allowed(store: Store, now: float) -> AsyncIterator[dict[str, Any]]:
    async for target, expires_at, added in source.allowed(store, now=now):
        yield {"target": target, "added": _when(added), "expires": _when(expires_at)}


_LISTS: dict[str, tuple[Callable[[Store, float], AsyncIterator[dict[str, Any]]], tuple[str, ...], str]] = {
    # what: (rows, table columns, message when empty)
    "triplets": (_triplets, ("state", "attempts", "first_seen", "expires", "client", "sender", "rcpt"),
                 "no triplets"),
    "trapped": (_trapped, ("network", "trap", "expires"), "no trapped networks"),
    "allowed": (_allowed, ("target", "added", "expires"), "no allow entries"),
}


async def _list(store: Store, args: argparse.Namespace, settings: GraylistSettings, now: float) -> int:
    limit = _limit(args.limit)
    kind = "trapped" if args.trapped else "allowed" if args.allowed else "triplets"
    produce, columns, empty = _LISTS[kind]
    rows: list[dict[str, Any]] = []
    more = False
    async for row in produce(store, now):
        if len(rows) == limit:
            more = True  # stop reading: never fetch more than asked for
            break
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=1))
    elif rows:
        widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
        print("  ".join(c.upper().ljust(widths[c]) for c in columns).rstrip())
        for r in rows:
            print("  ".join(str(r[c]).ljust(widths[c]) for c in columns).rstrip())
    else:
        print(empty)
    if more:
        print(f"graylist: more entries not shown; --limit {limit} in effect", file=sys.stderr)
    return 0


async def _allow(store: Store, args: argparse.Namespace, settings: GraylistSettings, now: float) -> int:
    ttl = math.inf
    if args.ttl is not None:
        try:
            ttl = parse_duration(args.ttl)
        except ValueError as exc:
            raise BadInput(f"--ttl: {exc}") from None
        if ttl <= 0:
            raise BadInput("--ttl: must be more than 0 s")
    try:
        target = await source.allow(store, args.target, ttl=ttl, now=now)
    except ValueError as exc:
        raise BadInput(f"CIDR|DOMAIN: {exc}") from None
    print(f"allowed {target} until {_when(now + ttl)}")
    return 0


async def _deny(store: Store, args: argparse.Namespace, settings: GraylistSettings, now: float) -> int:
    try:
        target, existed = await source.deny(store, args.target, now=now)
    except ValueError as exc:
        raise BadInput(f"CIDR|DOMAIN: {exc}") from None
    print(f"removed the allow entry for {target}" if existed else f"no allow entry for {target}")
    return 0


async def _untrap(store: Store, args: argparse.Namespace, settings: GraylistSettings, now: float) -> int:
    try:
        network = g.network_of(args.target.partition("/")[0].strip(), settings.policy)
    except ValueError:
        raise BadInput(f"IP|NETWORK: {args.target!r} is not an IP address or network") from None
    existed = await store.delete(g.trap_key(network))
    print(f"lifted the trap on {network}" if existed else f"no trap on {network}")
    return 0


async def _purge(store: Store, args: argparse.Namespace, settings: GraylistSettings, now: float) -> int:
    removed = await store.purge(now=now)
    print(f"purged {removed} expired entries")
    return 0


async def _stats(store: Store, args: argparse.Namespace, settings: GraylistSettings, now: float) -> int:
    counts: Counter[str] = Counter()
    kinds = {g.TRIPLET_PREFIX: "triplet", g.CLIENT_PREFIX: "client", g.TRAP_PREFIX: "trapped",
             g.ALLOW_PREFIX: "allowed", g.ALLOW_NET_PREFIX: "networks"}
    async for item in store.scan(g.KEY_PREFIX, now=now):
        kind = next((k for p, k in kinds.items() if item.key.startswith(p)), None)
        if kind == "triplet":
            entry = g.decode_triplet(item.value)
            if entry is not None:
                counts["passed" if entry.state is g.TripletState.PASSED else "deferred"] += 1
        elif kind == "client":
            client = g.decode_client(item.value)
            if client is not None:
                counts["clients"] += 1
                if g.auto_allowed(client, strict=False, policy=settings.policy):
                    counts["auto_allowed"] += 1
        elif kind == "networks":
            counts["allowed"] += sum(1 for e in g.decode_bucket(item.value) if e.expires_at > now)
        elif kind is not None:
            counts[kind] += 1
    names = ("deferred", "passed", "clients", "auto_allowed", "trapped", "allowed")
    report = {n: counts[n] for n in names}
    if args.json:
        print(json.dumps(report))
    else:
        for n in names:
            print(f"{n.replace('_', '-')}: {report[n]}")
    return 0


_ACTIONS = {"list": _list, "allow": _allow, "deny": _deny, "untrap": _untrap, "purge": _purge, "stats": _stats}
