"""The `rdns`, `rdns_name`, `rdns_domain` and `rdns_generic` facts.

Decides:
    nothing of its own: it looks up the client's PTR names and their
    addresses, and hands the chosen name to core/rdns.py's classifier.
Inputs:
    the client's IP (IPv4 or IPv6; IPv4-mapped IPv6 is asked as IPv4), the
    shared resolver (adapters/dns.py), `RdnsSettings` from `[rdns]`, and
    optionally the stage's remaining budget in seconds.
Output:
    RdnsFact (core/rdns.py):
    * `rdns`: `none` (no PTR), `unconfirmed` (no PTR name resolves back to
      the address), `confirmed` (forward-confirmed: the A/AAAA of a PTR name
      contain the address; "FCrDNS", RFC 8601 §3 `iprev`), `unknown` (a
      lookup failed and nothing confirmed);
    * `rdns_name`: the first confirming name, else the first PTR name;
    * `rdns_domain`: its registrable domain by the ICANN section of the Public
      Suffix List that the `publicsuffixlist` package ships (never fetched at
      run time; private entries such as `compute-1.amazonaws.com` are left
      out so that a hoster's default names share one domain);
    * `rdns_generic`: core/rdns.py's verdict; `unknown` when rdns is unknown.
      Gathered at connect, before the client has named itself; at the HELO
      stage `with_helo()` classifies a forward-confirmed name again with the
      HELO name (core/rdns.py: a confirmed name that is also the HELO name
      was chosen by its operator and needs one more piece of evidence), so
      rules at helo, mail and rcpt see the HELO-aware verdict.
Failure modes:
    every failed lookup (timeout, SERVFAIL, the budget running out) is a
    value: `unknown`, with the resolver's reason in `error`; nothing raises.
    A forward answer that lacks the client's address but is partial in the
    client's family (that family's lookup failed, or its RRset was cut at
    the resolver's bound) could have confirmed: `unknown`, never
    `unconfirmed` (issue 19 item 3: a SERVFAIL must not become a 5xx).
    PTR names beyond `max_ptr_names` are ignored, as RFC 7208 §4.6.4 says.
Defaults and why:
    * `max_ptr_names` 10: RFC 7208 §4.6.4 bounds the names an SPF `ptr`
      check may look up to 10 and says to ignore the rest; an address with
      more PTR records than that is not one a mail server would have. All
      forward lookups of those names run concurrently, so the stage costs
      one PTR lookup plus the slowest forward lookup.
    * No extra patterns and no exceptions: the built-in tables stand alone.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import re
from dataclasses import dataclass, replace
from typing import Any, Mapping, Protocol

from publicsuffixlist import PublicSuffixList

from smtpguard.core.facts import OK, UNKNOWN
from smtpguard.core.ip import unmapped
from smtpguard.core.settings import reject_unknown_keys
from smtpguard.core.rdns import (
    RDNS_CONFIRMED,
    RDNS_NONE,
    RDNS_UNCONFIRMED,
    RDNS_UNKNOWN,
    RdnsFact,
    classify,
    compile_rules,
)
from smtpguard.errors import ConfigError
from smtpguard.core.facts import FactSpec, Kind, SourceSpec
from smtpguard.sources import Context, table

# The source's declaration (sources/registry.py; docs/adding-a-fact.md):
# settings RdnsSettings from [rdns] (read_settings), entry point
# gather_facts; at the helo stage `revise` weighs the HELO name (with_helo).
SOURCE = SourceSpec(
    name="rdns",
    stage="connect",
    area="rdns",
    facts=(
        FactSpec("rdns", Kind.TEXT, values=frozenset({"none", "unconfirmed", "confirmed"})),
        FactSpec("rdns_name", Kind.TEXT, domain=True),
        FactSpec("rdns_domain", Kind.TEXT, domain=True),
        FactSpec("rdns_generic", Kind.BOOL),
    ),
    revise_at="helo",
    revises=("rdns_generic",),
)

__all__ = ["RdnsFact", "RdnsSettings", "gather", "identity_domain", "registrable_domain", "with_helo"]

# RFC 7208 §4.6.4: at most 10 PTR names are looked at.
DEFAULT_MAX_PTR_NAMES = 10
MAX_PTR_NAMES_LIMIT = 100  # a sanity ceiling for the setting, not a standard


class AnswerLike(Protocol):
    @property
    def status(self) -> str: ...
    @property
    def values(self) -> tuple[str, ...]: ...
    @property
    def reason(self) -> str: ...
    @property
    def partial(self) -> tuple[str, ...]: ...


class ResolverLike(Protocol):
    """What this source needs of adapters/dns.py's Resolver."""

    async def ptr(self, ip: str) -> AnswerLike: ...
    async def addresses(self, name: str) -> AnswerLike: ...


@dataclass(frozen=True, slots=True)
class RdnsSettings:
    """`[rdns]`: the admin's additions to the generic-name classifier."""

    # Extra regular expressions (searched in the PTR name) that mark a name
    # generic, for a local provider's scheme the tables miss. Empty: the
    # built-in tables stand alone.
    generic_patterns: tuple[re.Pattern[str], ...] = ()
    # Names never generic: `mail.example.com` (that name), `.example.com`
    # (names under it) or a regular expression.
    generic_exceptions: tuple[re.Pattern[str], ...] = ()
    # RFC 7208 §4.6.4: 10.
    max_ptr_names: int = DEFAULT_MAX_PTR_NAMES

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], prefix: str = "rdns") -> "RdnsSettings":
        reject_unknown_keys(table, prefix, ("generic_patterns", "generic_exceptions", "max_ptr_names"))
        values: dict[str, Any] = {}
        for key in ("generic_patterns", "generic_exceptions"):
            if key not in table:
                continue
            entries = table[key]
            if isinstance(entries, str):
                entries = [entries]
            if not isinstance(entries, (list, tuple)) or not all(isinstance(e, str) for e in entries):
                raise ConfigError(f"{prefix}.{key}",
                                  f"expected a list of domains (.example.com for names under it) "
                                  f"or regular expressions, got {entries!r}")
            compiled: list[re.Pattern[str]] = []
            for number, entry in enumerate(entries, 1):
                try:
                    compiled += compile_rules([entry])
                except ValueError as exc:
                    raise ConfigError(f"{prefix}.{key}", f"entry {number}: {exc}") from None
            values[key] = tuple(compiled)
        if "max_ptr_names" in table:
            n = table["max_ptr_names"]
            if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_PTR_NAMES_LIMIT:
                raise ConfigError(f"{prefix}.max_ptr_names",
                                  f"expected a whole number from 1 to {MAX_PTR_NAMES_LIMIT}, got {n!r}")
            values["max_ptr_names"] = n
        return cls(**values)


@functools.lru_cache(maxsize=1)
def _psl() -> PublicSuffixList:
    # The list bundled with the package, ICANN section only (see docstring).
    return PublicSuffixList(only_icann=True)


@functools.lru_cache(maxsize=1)
def _psl_all() -> PublicSuffixList:
    # The same bundled list with its private section (see identity_domain).
    return PublicSuffixList(only_icann=False)


def identity_domain(name: str) -> str:
    """The registrable domain by the whole Public Suffix List, private section
    included ("" for a suffix or a bare label): the graylist identity of a
    forward-confirmed, non-generic name. In the private section hosters and
    dynamic-DNS services list the names their customers control
    (`compute-1.amazonaws.com`, `duckdns.org`): a customer's host is its own
    identity there, never the provider's (issue 19 item 5)."""
    name = name.strip().rstrip(".").lower()
    if not name:
        return ""
    try:
        return _psl_all().privatesuffix(name) or ""
    except (ValueError, UnicodeError):
        return ""


def registrable_domain(name: str) -> str:
    """The registrable domain of a name ("" for a public suffix or a bare label)."""
    name = name.strip().rstrip(".").lower()
    if not name:
        return ""
    try:
        return _psl().privatesuffix(name) or ""
    except (ValueError, UnicodeError):
        return ""


def _address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(ip.strip())
    except ValueError:
        return None
    return unmapped(addr)


def answers_contain(values: tuple[str, ...], client_ip: str) -> bool:
    """Whether an A/AAAA answer holds the client's address (IPv4-mapped as IPv4)."""
    client = _address(client_ip)
    return client is not None and _contains(values, client)


def address_match(answer: AnswerLike, client_ip: str) -> bool | None:
    """Whether an OK A/AAAA answer holds the client's address: True, False,
    or None (unknown) when it does not but its records of the client's
    family may be incomplete (`Answer.partial`)."""
    client = _address(client_ip)
    if client is None:
        return False
    if _contains(answer.values, client):
        return True
    family = "A" if client.version == 4 else "AAAA"
    return None if family in getattr(answer, "partial", ()) else False


def _contains(values: tuple[str, ...], client: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    for value in values:
        try:
            if ipaddress.ip_address(value) == client:
                return True
        except ValueError:
            continue
    return False


async def _bounded(aw: Any, deadline: float | None) -> Any:
    """Await `aw` until the loop-clock `deadline`; None (the budget ran out)
    when it is not done by then."""
    if deadline is None:
        return await aw
    try:
        # in this task, without one of its own (issue 15: a cache hit costs no task)
        async with asyncio.timeout_at(deadline):
            return await aw
    except TimeoutError:
        return None


async def gather(ip: str, resolver: ResolverLike, settings: RdnsSettings = RdnsSettings(),
                 *, budget: float | None = None) -> RdnsFact:
    """Reverse DNS of `ip`: PTR, then every PTR name's A/AAAA concurrently.

    `budget` (seconds) bounds the whole; what is unfinished then is unknown."""
    client = _address(ip)
    if client is None:
        return RdnsFact(RDNS_UNKNOWN, generic=UNKNOWN, error="not an IP address")
    deadline = None if budget is None else asyncio.get_running_loop().time() + budget

    ptr = await _bounded(resolver.ptr(client.compressed), deadline)
    if ptr is None:
        return RdnsFact(RDNS_UNKNOWN, generic=UNKNOWN, error="deadline")
    if ptr.status == UNKNOWN:
        return RdnsFact(RDNS_UNKNOWN, generic=UNKNOWN, error=ptr.reason or "unknown")
    names = tuple(dict.fromkeys(n.strip().rstrip(".").lower() for n in ptr.values
                                if n.strip().rstrip(".")))[: settings.max_ptr_names]
    if ptr.status != OK or not names:
        return RdnsFact(RDNS_NONE)

    if len(names) == 1:   # the usual case: one name, no gather around it
        one = await _bounded(resolver.addresses(names[0]), deadline)
        forward = None if one is None else [one]
    else:
        forward = await _bounded(asyncio.gather(*(resolver.addresses(n) for n in names)), deadline)
    confirmed = unknown = None
    if forward is None:
        unknown = "deadline"
    else:
        for name, answer in zip(names, forward):
            if answer.status == OK:
                match = address_match(answer, client.compressed)
                if match:
                    confirmed = name
                    break
                if match is None and unknown is None:
                    family = "A" if client.version == 4 else "AAAA"
                    unknown = f"{family} of {name[:64]} incomplete"
            if answer.status == UNKNOWN and unknown is None:
                unknown = answer.reason or "unknown"

    name = confirmed or names[0]
    domain = registrable_domain(name)
    if confirmed is None and unknown is not None:
        return RdnsFact(RDNS_UNKNOWN, name, domain, UNKNOWN, names, error=unknown)
    verdict = classify(name, client.compressed, confirmed=confirmed is not None, domain=domain or None,
                       extra_patterns=settings.generic_patterns, exceptions=settings.generic_exceptions)
    state = RDNS_CONFIRMED if confirmed is not None else RDNS_UNCONFIRMED
    return RdnsFact(state, name, domain, verdict.generic, names, verdict.reasons)


def with_helo(fact: RdnsFact, ip: str, helo: str | None, settings: RdnsSettings = RdnsSettings()) -> RdnsFact:
    """The connect-stage fact classified again now that the HELO name is known.

    Pure (no lookups). Only a forward-confirmed name can change: the HELO
    weighs nothing for an unconfirmed name, and `none`/`unknown` facts have
    no verdict to revise. The name is classified from scratch each time, so
    a client that sends EHLO again with another name gets the verdict of
    its latest HELO, never a leftover of an earlier one. `helo` is only
    compared with the name (case and a trailing dot ignored), never stored.
    """
    if fact.rdns != RDNS_CONFIRMED or not fact.name:
        return fact
    client = _address(ip)
    if client is None:
        return fact
    verdict = classify(fact.name, client.compressed, confirmed=True, domain=fact.domain or None,
                       extra_patterns=settings.generic_patterns, exceptions=settings.generic_exceptions,
                       helo=helo or None)
    if verdict.generic == fact.generic and verdict.reasons == fact.reasons:
        return fact
    return replace(fact, generic=verdict.generic, reasons=verdict.reasons)


# --- the registry's entry points (smtpguard/sources/__init__.py) -------------

def read_settings(raw: Any) -> RdnsSettings:
    """`[rdns]` from the TOML document (None when absent)."""
    return RdnsSettings.from_mapping(table(raw, "rdns"))


async def gather_facts(ctx: Context) -> RdnsFact:
    """The client's rDNS fact (gather); the stage loop bounds it by the stage budget."""
    return await gather(ctx.client.ip, ctx.resolver, ctx.settings)


def revise(ctx: Context, fact: RdnsFact) -> RdnsFact:
    """At the helo stage: the fact classified again with the HELO name (with_helo, issue 14)."""
    return with_helo(fact, ctx.client.ip, ctx.helo, ctx.settings)
