"""The `dnsbl_score` and `dnsbl_hits` facts: every DNS list asked at once.

Decides:
    nothing of its own: it asks each configured zone about the client's
    address and hands the answers to core/dnsbl.py, which scores them.
Inputs:
    the client's IP (IPv4 or IPv6), the lists from `[[dnsbl]]`, the shared
    resolver (adapters/dns.py) and the stage's remaining budget in seconds.
Output:
    DnsblFact (core/dnsbl.py): status OK (listed somewhere), NONE (on no
    list) or UNKNOWN (some list failed); `dnsbl_score`, the sum of the weights
    of the lists that answered, "unknown" only when every list failed;
    `dnsbl_hits` ("label=code"); `errors` for the log; `text` for the reply.
Failure modes:
    a list that times out, fails, or answers an error code (127.255.255.x,
    anything outside 127.0.0.0/8) contributes nothing and is named in
    `errors` and in a `dnsbl.error` log line with the session id, at most
    one per list per minute with the count of lines held back (issue 19
    item 2: a list outage must not flood the log); nothing raises.
Defaults and why:
    * No lists: DNS lists are opt-in, since each operator has terms of use
      (Spamhaus's free zones refuse queries from public resolvers and from
      high-volume users).
    * All zones are asked concurrently under one deadline, so the stage costs
      the slowest list, not the sum (postscreen queries its sites in
      parallel); entries sharing a zone share one query.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

from smtpguard.adapters.dns import (
    UNKNOWN_DEADLINE,
    RateLimitedLog,
    Resolver,
    SessionResolver,
    within,
)
from smtpguard.core.dnsbl import (
    DEFAULT_WEIGHT,
    DnsblFact,
    DnsblList,
    ZoneAnswer,
    evaluate,
    parse_code,
    parse_zone,
    query_name,
    zones,
)
from smtpguard.core.facts import NONE, UNKNOWN
from smtpguard.core.settings import reject_unknown_keys
from smtpguard.errors import ConfigError
from smtpguard.observe.log import event
from smtpguard.core.facts import FactSpec, Kind, SourceSpec
from smtpguard.sources import Context

# The source's declaration (sources/registry.py; docs/adding-a-fact.md):
# settings DnsblSettings from the [[dnsbl]] array (read_settings), entry
# point gather_facts.
SOURCE = SourceSpec(
    name="dnsbl",
    stage="connect",
    area="dnsbl",
    facts=(
        FactSpec("dnsbl", Kind.TEXT, values=frozenset({"listed", "none"})),  # unknown: a list could not answer
        FactSpec("dnsbl_score", Kind.NUMBER),
        FactSpec("dnsbl_hits", Kind.LIST),
    ),
)

log = logging.getLogger("smtpguard.dnsbl")

__all__ = ["DnsblFact", "DnsblList", "DnsblSettings", "gather", "parse_lists"]


async def gather(client_ip: str, lists: Sequence[DnsblList], resolver: Resolver | SessionResolver,
                 budget: float) -> DnsblFact:
    """Ask every list about `client_ip` within `budget` seconds and score it."""
    if not lists:
        return DnsblFact(NONE)
    asked = zones(lists)
    try:
        names = {zone: query_name(client_ip, zone) for zone in asked}
    except ValueError:
        return DnsblFact(UNKNOWN, errors=(f"client address {client_ip[:64]!r} is not an IP address",),
                         failed=len(asked))
    got = await within(budget, {zone: resolver.query(name, "A") for zone, name in names.items()},
                       lambda _zone: UNKNOWN_DEADLINE)
    fact = evaluate(lists, {zone: ZoneAnswer(a.status, a.values, a.reason) for zone, a in got.items()})
    limiter: RateLimitedLog | None = getattr(resolver, "errors", None)
    session = getattr(resolver, "session", "") or None
    for error in fact.errors:
        label = error.partition(":")[0]
        if limiter is not None:
            limiter.event("dnsbl.error", f"dnsbl {label}", session=session, ip=client_ip, list=label,
                          error=error)
        else:
            event("dnsbl.error", session=session, ip=client_ip, list=label, error=error)
    return fact


# -- settings ----------------------------------------------------------------

_LIST_KEYS = ("zone", "weight", "codes", "name")


def parse_lists(value: Any, prefix: str = "dnsbl") -> tuple[DnsblList, ...]:
    """`[[dnsbl]]` tables -> lists; ConfigError names `dnsbl[N].key` (N from 1).

        [[dnsbl]]
        zone = "zen.spamhaus.org"
        weight = 3
        codes = ["127.0.0.2-127.0.0.11"]
        [[dnsbl]]
        zone = "list.dnswl.org"
        weight = -2
        codes = ["127.0.0.0/16"]
    """
    if value is None:
        return ()
    if not isinstance(value, (list, tuple)):
        raise ConfigError(prefix, "expected [[dnsbl]] tables, each with zone = \"...\"")
    return tuple(_parse_list(f"{prefix}[{i}]", table) for i, table in enumerate(value, start=1))


def _parse_list(where: str, table: Any) -> DnsblList:
    if not isinstance(table, dict):
        raise ConfigError(where, "expected a table: write [[dnsbl]] then zone = \"zen.spamhaus.org\"")
    reject_unknown_keys(table, where, _LIST_KEYS)
    if "zone" not in table:
        raise ConfigError(f"{where}.zone", "missing; every [[dnsbl]] needs the list's DNS zone")
    if not isinstance(table["zone"], str):
        raise ConfigError(f"{where}.zone", f"expected a DNS zone as text, got {table['zone']!r}")
    try:
        zone = parse_zone(table["zone"])
    except ValueError as exc:
        raise ConfigError(f"{where}.zone", str(exc)) from None

    weight = table.get("weight", DEFAULT_WEIGHT)
    if isinstance(weight, bool) or not isinstance(weight, int) or not -1000 <= weight <= 1000:
        raise ConfigError(f"{where}.weight", "expected a whole number from -1000 to 1000 "
                          f"(negative for an allowlist such as DNSWL), got {weight!r}")

    codes_value = table.get("codes", [])
    if isinstance(codes_value, str):
        codes_value = [codes_value]
    if not isinstance(codes_value, list) or not all(isinstance(c, str) for c in codes_value):
        raise ConfigError(f"{where}.codes", "expected a list of codes like \"127.0.0.2\", "
                          f"\"127.0.0.2-127.0.0.11\" or \"127.0.0.0/24\", got {codes_value!r}")
    try:
        codes = tuple(parse_code(c) for c in codes_value)
    except ValueError as exc:
        raise ConfigError(f"{where}.codes", str(exc)) from None

    name = table.get("name", "")
    if not isinstance(name, str) or len(name) > 100 or any(not c.isprintable() or c.isspace() for c in name):
        raise ConfigError(f"{where}.name", "expected a short label without spaces, shown in logs and "
                          f"replies instead of the zone (to keep a DQS key private), got {name!r}")
    return DnsblList(zone, weight, codes, name)


@dataclass(frozen=True, slots=True)
class DnsblSettings:
    """All `[[dnsbl]]` entries; the stage deadline is `[dns] stage_budget`."""

    lists: tuple[DnsblList, ...] = ()  # none: opt-in, see the module docstring

    @classmethod
    def from_list(cls, value: Any, prefix: str = "dnsbl") -> "DnsblSettings":
        """From the TOML value of `dnsbl` (an array of tables)."""
        return cls(parse_lists(value, prefix))


# --- the registry's entry points (smtpguard/sources/__init__.py) -------------

def read_settings(raw: Any) -> DnsblSettings:
    """The `[[dnsbl]]` array from the TOML document (None when absent)."""
    return DnsblSettings.from_list([] if raw is None else raw)


async def gather_facts(ctx: Context) -> DnsblFact | None:
    """Every configured list asked at once (gather); nothing when no list is configured."""
    if not ctx.settings.lists:
        return None
    return await gather(ctx.client.ip, ctx.settings.lists, ctx.resolver, ctx.budget)
