"""The `helo*` facts: what the HELO/EHLO name says, and what DNS says of it.

Decides:
    nothing: core/helo.py reads the syntax; this module adds one A/AAAA
    lookup of the name and the comparison with the rDNS name. RFC 5321
    §4.1.4: a HELO that does not match the client is no reason to refuse by
    itself; rules decide what these facts are worth.
Inputs:
    the HELO/EHLO argument, the client's IP, the rDNS fact already gathered
    (None if it was not), the shared resolver (adapters/dns.py), who we are
    (our hostnames, served domains, our addresses) and optionally the stage's
    remaining budget in seconds.
Output:
    HeloFact (core/helo.py): `helo` (as sent, truncated to 255), `helo_valid`,
    `helo_bare_ip`, `helo_literal_matches`, `helo_is_us` (core/helo.py), and
    * `helo_resolves`: the name has A or AAAA records;
    * `helo_matches_ip`: those contain the client's address;
    * `helo_matches_rdns`: the name equals the rDNS name (case-insensitive).
    An address literal, a bare IP or an invalid name is not looked up: the
    three are then false (core/helo.py says what the literal is worth).
Failure modes:
    a failed lookup (timeout, SERVFAIL, the budget running out) makes
    `helo_resolves` and `helo_matches_ip` `unknown` and the status UNKNOWN;
    when one family answered and the client's family failed (or was cut at
    the resolver's RRset bound), `helo_resolves` is true and
    `helo_matches_ip` is `unknown` unless the address is among those seen
    (issue 19 item 3);
    `helo_matches_rdns` is `unknown` when the PTR lookup failed or rDNS was
    not gathered. Nothing raises.
Defaults and why:
    none of its own; the lookup's timeout is the resolver's ([dns] timeout).
"""

from __future__ import annotations

import asyncio
from typing import Iterable

from smtpguard.core.facts import OK, UNKNOWN
from smtpguard.core.helo import (
    FQDN,
    MAX_HELO_LENGTH,
    HeloFact,
    OurIdentity,
    check,
    fact_status,
    identity,
    matches_rdns,
)
from smtpguard.core.rdns import RdnsFact
from smtpguard.sources.rdns import ResolverLike, address_match
from smtpguard.core.facts import FactSpec, Kind, SourceSpec
from smtpguard.sources import Context

# The source's declaration (sources/registry.py; docs/adding-a-fact.md): no
# settings; it reads the rdns result (needs), and bounds its one lookup by
# the stage budget itself, so that the syntax facts survive a slow DNS.
# The `helo` fact itself (the name as sent) is the session's (core.tables).
SOURCE = SourceSpec(
    name="helo",
    stage="helo",
    facts=tuple(FactSpec(name, Kind.BOOL) for name in (
        "helo_valid", "helo_bare_ip", "helo_literal_matches", "helo_is_us",
        "helo_resolves", "helo_matches_ip", "helo_matches_rdns")),
    needs=("rdns",),
    needed_for=("helo_matches_rdns",),   # the only fact that reads the rdns result
    own_deadline=True,
)

# The facts only the HELO name's A/AAAA lookup tells: without a rule that
# reads one of them, the lookup is not made.
LOOKUP_FACTS = frozenset({"helo_resolves", "helo_matches_ip"})

__all__ = ["HeloFact", "OurIdentity", "gather", "identity"]


async def gather(
    helo: str,
    client_ip: str,
    rdns: RdnsFact | None,
    resolver: ResolverLike,
    *,
    our_names: Iterable[str] = (),
    our_domains: Iterable[str] = (),
    our_ips: Iterable[str] = (),
    us: OurIdentity | None = None,
    budget: float | None = None,
    lookup: bool = True,
) -> HeloFact:
    """The HELO facts of `helo` sent by `client_ip`.

    Pass `us` (built once with `identity()`) instead of the three `our_*`
    lists to skip parsing them per session; `budget` (seconds) bounds the
    lookup; `lookup=False` skips it (no rule reads what it tells: a name
    a stranger chose is not looked up for nothing)."""
    if us is None:
        us = identity(our_names, our_domains, our_ips)
    syntax = check(helo, client_ip, us)
    sent = helo.strip()[:MAX_HELO_LENGTH]
    if rdns is None:
        by_rdns = matches_rdns(syntax, UNKNOWN, "") if syntax.kind == FQDN else False
    else:
        by_rdns = matches_rdns(syntax, rdns.rdns, rdns.name)
    if syntax.kind != FQDN:
        return HeloFact(fact_status(syntax, None), sent, syntax, matches_rdns=by_rdns)
    if not lookup:
        return HeloFact(fact_status(syntax, None), sent, syntax, matches_rdns=by_rdns, looked_up=False)

    try:
        async with asyncio.timeout(None if budget is None else max(0.0, budget)):   # in this task, no task of its own
            answer = await resolver.addresses(syntax.name)
    except TimeoutError:
        return HeloFact(UNKNOWN, sent, syntax, UNKNOWN, UNKNOWN, by_rdns, reason="deadline")
    if answer.status == UNKNOWN:
        return HeloFact(UNKNOWN, sent, syntax, UNKNOWN, UNKNOWN, by_rdns, reason=answer.reason or "unknown")
    resolves = answer.status == OK and bool(answer.values)
    match = address_match(answer, client_ip) if resolves else False
    if match is None:
        return HeloFact(UNKNOWN, sent, syntax, True, UNKNOWN, by_rdns, addresses=answer.values,
                        reason="incomplete answer")
    return HeloFact(fact_status(syntax, answer.status), sent, syntax, resolves, match, by_rdns,
                    addresses=answer.values if resolves else ())


# --- the registry's entry point (smtpguard/sources/__init__.py) --------------

async def gather_facts(ctx: Context) -> HeloFact:
    """The HELO facts of the session's HELO name, against the rdns result
    gathered at connect (revised with the HELO name) and who we are at the
    address the client connected to."""
    return await gather(ctx.helo, ctx.client.ip, ctx.results.get("rdns"), ctx.resolver,
                        us=ctx.us, budget=ctx.budget,
                        lookup=ctx.wanted is None or bool(ctx.wanted & LOOKUP_FACTS))
