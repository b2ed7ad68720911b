"""The graylist fact, asked at RCPT: has this client earned this (sender, recipient)?

Decides: nothing about the reply; reports the fact `graylist` = new |
  deferred | passed | allowed | trapped | unknown, with the seconds still to
  wait, the client identity and (for unknown) the store's error text.
Inputs: a Store, GraylistSettings, the client address, its forward-confirmed
  registrable rDNS domain (None when rDNS is not confirmed), MAIL FROM, RCPT
  TO, `strict` (the session's judgement that the client is suspicious, e.g.
  a Windows fingerprint) and `now`.
Output: GraylistFact; `as_facts()` gives {"graylist": ...}. The session maps
  it to a reply through the policy (the usual ones: 451 4.7.1 GRAYLIST,
  550 5.7.1 TRAP, 451 4.3.0 GRAYLIST-STORE).
Failure modes: a StoreError, or a transaction that takes longer than two
  of the store's timeouts ([state] timeout), becomes status UNKNOWN, graylist "unknown" and
  the error text; `graylist.on_error` says what the session should do with it
  ("tempfail": 451 GRAYLIST-STORE, or "accept"). Nothing else is raised.
Defaults and why: see GraylistPolicy in core/graylist.py for the numbers; no
  traps unless the admin names them; on_error "tempfail" because a store
  outage must not turn the graylist off for every bot at once, and real MTAs
  retry a 451.

Order of the questions (one batched read, which answers a known triplet;
then at most two atomic updates):
  1. an admin allow entry covers the client's address or domain -> allowed;
  2. the identity is auto-allowed (non-strict only) -> allowed;
  3. the recipient is a spamtrap -> trap the client's network, trapped;
  4. the network is trapped -> trapped;
  5. the triplet's transition (core.graylist.triplet_step).
  Admin- and auto-allowed clients are not trapped, as in spamd, whose
  whitelisted hosts never reach spamd's greytrapping: a proven MTA's one mail to a
  trap (a typo, a forwarded list) must not cost its network a day of mail.

Auto-allow counts triplets that passed a retry, at RCPT, like postgrey's
--auto-whitelist-clients: the end of DATA is the upstream's business, and a
count at RCPT needs no second call from the session. Strict passes do not
count: suspicious traffic earns no trust.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from smtpguard.adapters.store import DEFAULT_TIMEOUT, DEFAULT_URL, Put, Store, Update
from smtpguard.core import graylist as g
from smtpguard.core.facts import OK, UNKNOWN, FactValue
from smtpguard.core.settings import reject_unknown_keys
from smtpguard.core.units import parse_duration
from smtpguard.errors import ConfigError, StoreError
from smtpguard.core.facts import FactSpec, Kind, SourceSpec
from smtpguard.sources import table

# The source's declaration (sources/registry.py; docs/adding-a-fact.md):
# settings GraylistSettings from [graylist] (read_settings). Asked by the
# session per recipient (services.graylist, on_demand), not by the stage loop.
SOURCE = SourceSpec(
    name="graylist",
    stage="rcpt",
    area="graylist",
    facts=(
        FactSpec("graylist", Kind.TEXT, values=frozenset({"new", "deferred", "passed", "allowed", "trapped"})),
    ),
    on_demand=True,
)

ON_ERROR = ("tempfail", "accept")
DEFAULT_ON_ERROR = "tempfail"  # see GraylistSettings.on_error
STATE_SCHEMES = ("sqlite", "redis", "rediss", "redis+sentinel", "memory")


# ---------------------------------------------------------------------------
# Settings


@dataclass(frozen=True, slots=True)
class StateSettings:
    """[state]: where graylist, rate-limit and pregreet state lives."""

    # Durable on one host with no daemon to run; Redis for several MX hosts.
    url: str = DEFAULT_URL
    # Per store operation; a round trip is under a millisecond, so 2 s only
    # bounds a hung backend, inside any RCPT deadline.
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], prefix: str = "state") -> StateSettings:
        reject_unknown_keys(table, prefix, ("url", "timeout"), wording="unknown setting; allowed")
        url = table.get("url", DEFAULT_URL)
        if not isinstance(url, str) or url.split(":", 1)[0].lower() not in STATE_SCHEMES or ":" not in url:
            raise ConfigError(f"{prefix}.url", f"{url!r}: expected sqlite:///path, redis://host:port/db, "
                              "rediss://…, redis+sentinel://host:port,host:port/service/db or memory://")
        timeout = _duration(table, prefix, "timeout", DEFAULT_TIMEOUT)
        if timeout <= 0:
            raise ConfigError(f"{prefix}.timeout", "must be more than 0 s")
        return cls(url=url, timeout=timeout)


@dataclass(frozen=True, slots=True)
class GraylistSettings:
    """[graylist]: the numbers (GraylistPolicy), the spamtraps and on_error."""

    policy: g.GraylistPolicy = field(default_factory=g.GraylistPolicy)
    # Spamtraps (spamd's greytrapping): addresses that never receive real
    # mail. None by default: only the admin knows which addresses are unused.
    traps: frozenset[str] = frozenset()
    # A store outage must not switch graylisting off for every bot at once;
    # real MTAs retry a 451. "accept" favours delivery over filtering.
    on_error: str = DEFAULT_ON_ERROR

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], prefix: str = "graylist") -> GraylistSettings:
        durations = ("delay", "retry_window", "max_age", "strict_max_age", "trap_ttl")
        reject_unknown_keys(table, prefix, (*durations, "auto_allow_after", "traps", "on_error",
                                            "ipv4_prefix", "ipv6_prefix"), wording="unknown setting; allowed")
        base = g.GraylistPolicy()
        values: dict[str, Any] = {name: _duration(table, prefix, name, getattr(base, name))
                                  for name in durations}
        values["auto_allow_after"] = _integer(table, prefix, "auto_allow_after", base.auto_allow_after, 0, 1_000_000)
        values["ipv4_prefix"] = _integer(table, prefix, "ipv4_prefix", base.ipv4_prefix, 8, 32)
        values["ipv6_prefix"] = _integer(table, prefix, "ipv6_prefix", base.ipv6_prefix, 16, 128)
        if values["delay"] >= values["retry_window"]:
            raise ConfigError(f"{prefix}.delay", f"{values['delay']:.0f} s must be shorter than "
                              f"retry_window ({values['retry_window']:.0f} s), or nothing could pass")
        for name in ("max_age", "strict_max_age", "trap_ttl"):
            if values[name] <= 0:
                raise ConfigError(f"{prefix}.{name}", "must be more than 0 s")
        policy = g.GraylistPolicy(**values, refresh_every=base.refresh_every)

        traps_raw = table.get("traps", [])
        if not isinstance(traps_raw, list) or not all(isinstance(t, str) for t in traps_raw):
            raise ConfigError(f"{prefix}.traps", 'expected a list of addresses like ["trap@example.com"]')
        traps = frozenset(g.normalise_rcpt(t) for t in traps_raw)
        for trap in traps:
            local, at, domain = trap.rpartition("@")
            if not (local and at and "." in domain):
                raise ConfigError(f"{prefix}.traps", f"{trap!r} is not an address like trap@example.com")

        on_error = table.get("on_error", DEFAULT_ON_ERROR)
        if on_error not in ON_ERROR:
            raise ConfigError(f"{prefix}.on_error", f"{on_error!r}: expected one of {', '.join(ON_ERROR)}")
        return cls(policy=policy, traps=traps, on_error=on_error)


def _duration(table: Mapping[str, Any], prefix: str, name: str, default: float) -> float:
    if name not in table:
        return default
    try:
        return parse_duration(table[name])
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{prefix}.{name}", str(exc)) from None


def _integer(table: Mapping[str, Any], prefix: str, name: str, default: int, low: int, high: int) -> int:
    value = table.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{prefix}.{name}", f"{value!r}: expected a whole number from {low} to {high}")
    return value


# ---------------------------------------------------------------------------
# The fact


@dataclass(frozen=True, slots=True)
class GraylistFact:
    status: str                 # OK, or UNKNOWN when the store could not answer
    graylist: str               # new deferred passed allowed trapped unknown
    wait: int = 0               # seconds until a retry passes (new, deferred)
    identity: str = ""          # the client identity the triplet is keyed on
    via: str = ""               # allowed: "admin" or "auto"; trapped: "trap" (this RCPT) or "network"
    error: str = ""             # the store's error, for the log

    def as_facts(self) -> dict[str, FactValue]:
        return {"graylist": self.graylist}


def _fact(decision: g.Decision, identity: str, *, wait: float = 0.0, via: str = "") -> GraylistFact:
    return GraylistFact(OK, decision.value, math.ceil(wait), identity, via)


async def check(store: Store, settings: GraylistSettings, *, ip: str, rdns_confirmed_domain: str | None,
                sender: str, rcpt: str, strict: bool, now: float) -> GraylistFact:
    """The graylist fact for one RCPT (see the module docstring for the order),
    within two store timeouts ([state] timeout) for the whole transaction: a
    slow store costs a RCPT at most that, then `unknown` (issue 19 item 8)."""
    fact = await _bounded(store, settings, ip=ip, rdns_confirmed_domain=rdns_confirmed_domain,
                          sender=sender, rcpt=rcpt, strict=strict, now=now)
    assert fact is not None  # with a sender, the triplet always answers
    return fact


async def trap(store: Store, settings: GraylistSettings, *, ip: str, rdns_confirmed_domain: str | None,
               rcpt: str, now: float) -> GraylistFact | None:
    """Spamtraps for a client that no graylist rule covers: TRAPPED, or None.

    The same path as `check` without the triplet (questions 1-4 of the module
    docstring, not strict: no graylist rule judged the client suspicious), so
    the two cannot disagree: admin- and auto-allowed clients are never
    trapped, and the trap keys are shared by every node. A store that cannot
    answer gives an UNKNOWN fact with the error.
    """
    if not settings.traps:
        return None
    fact = await _bounded(store, settings, ip=ip, rdns_confirmed_domain=rdns_confirmed_domain,
                          sender=None, rcpt=rcpt, strict=False, now=now)
    if fact is None or fact.graylist == g.Decision.ALLOWED.value:
        return None
    return fact


def _transaction_limit(store: Store) -> float:
    """One graylist transaction's bound: two of the store's operation
    timeouts ([state] timeout, 2 s by default). Two, so that an operation
    that times out ends by itself first (the store then fails fast for a
    while, see adapters/store.py) rather than being cancelled here."""
    return 2 * float(getattr(store, "timeout", DEFAULT_TIMEOUT) or DEFAULT_TIMEOUT)


async def _bounded(store: Store, settings: GraylistSettings, *, ip: str, rdns_confirmed_domain: str | None,
                   sender: str | None, rcpt: str, strict: bool, now: float) -> GraylistFact | None:
    """`_decide` within the transaction limit; `unknown` when it runs out."""
    limit = _transaction_limit(store)
    try:
        return await asyncio.wait_for(_decide(store, settings, ip=ip, rdns_confirmed_domain=rdns_confirmed_domain,
                                              sender=sender, rcpt=rcpt, strict=strict, now=now), limit)
    except asyncio.TimeoutError:
        identity = g.client_identity(ip, rdns_confirmed_domain, settings.policy)
        return GraylistFact(UNKNOWN, UNKNOWN, 0, identity, "", f"store: no answer within {limit:g} s")


async def _decide(store: Store, settings: GraylistSettings, *, ip: str, rdns_confirmed_domain: str | None,
                  sender: str | None, rcpt: str, strict: bool, now: float) -> GraylistFact | None:
    """The questions of the module docstring, in order. With `sender` None
    (spamtraps only) the triplet is not asked: None when questions 1-4 have
    no answer."""
    policy = settings.policy
    identity = g.client_identity(ip, rdns_confirmed_domain, policy)
    network = g.network_of(ip, policy)
    recipient = g.normalise_rcpt(rcpt)
    ckey = g.client_key(identity)
    try:
        tkey = None if sender is None else g.triplet_key(identity, g.normalise_sender(sender), recipient)
        keys = [g.trap_key(network), ckey, g.bucket_key(ip)]
        if rdns_confirmed_domain:
            keys.append(g.allow_key(identity))  # the identity is that domain
        if tkey is not None:
            keys.append(tkey)
        trapped, client_raw, bucket, *rest = await store.get_many(keys, now=now)
        domain = rest[0] if rdns_confirmed_domain else None
        triplet = rest[-1] if tkey is not None else None
        if domain is not None or g.bucket_covers(g.decode_bucket(bucket), ip, now=now):
            return _fact(g.Decision.ALLOWED, identity, via="admin")

        client = g.decode_client(client_raw)
        if client is not None and g.auto_allowed(client, strict=strict, policy=policy):
            if g.client_seen(client, now=now, policy=policy).write is not None:
                await store.update(ckey, _refresh(now, policy), now=now)
            return _fact(g.Decision.ALLOWED, identity, via="auto")

        if recipient in settings.traps:
            await store.set(g.trap_key(network), recipient, expires_at=now + policy.trap_ttl, now=now)
            return _fact(g.Decision.TRAPPED, identity, via="trap")
        if trapped is not None:
            return _fact(g.Decision.TRAPPED, identity, via="network")
        if tkey is None:
            return None

        def transition(current: str | None) -> tuple[Put | None, g.TripletStep]:
            step = g.triplet_step(g.decode_triplet(current), now=now, strict=strict, policy=policy)
            put = None if step.write is None else Put(g.encode_triplet(step.write), step.expires_at)
            return put, step

        # A known triplet that needs no write (the common case) is answered
        # from the batched read; anything to write goes through the atomic
        # update, which reads again and decides on what it read.
        put, step = transition(triplet)
        if put is not None:
            step = await store.update(tkey, transition, now=now)
        if step.newly_passed and not strict:
            await store.update(ckey, _count_pass(now, policy), now=now)
        return _fact(step.decision, identity, wait=step.wait)
    except StoreError as exc:
        return GraylistFact(UNKNOWN, UNKNOWN, 0, identity, "", str(exc))


def _client_put(step: g.ClientStep) -> Put | None:
    return None if step.write is None else Put(g.encode_client(step.write), step.expires_at)


def _count_pass(now: float, policy: g.GraylistPolicy) -> Update[None]:
    """One more passed triplet for the identity (read-modify-write)."""
    def fn(current: str | None) -> tuple[Put | None, None]:
        return _client_put(g.client_passed(g.decode_client(current), now=now, policy=policy)), None
    return fn


def _refresh(now: float, policy: g.GraylistPolicy) -> Update[None]:
    """Keep an auto-allowed identity alive for max_age after its last use."""
    def fn(current: str | None) -> tuple[Put | None, None]:
        entry = g.decode_client(current)
        if entry is None:
            return None, None  # expired meanwhile: nothing to refresh
        return _client_put(g.client_seen(entry, now=now, policy=policy)), None
    return fn


# ---------------------------------------------------------------------------
# Admin entries (the CLI's allow/deny; any future control socket alike)


async def allow(store: Store, target: str, *, ttl: float, now: float) -> str:
    """Add an admin allow entry for a CIDR network or a domain; `ttl` may be
    math.inf. Returns the canonical target. ValueError for a bad target."""
    canonical = g.parse_allow_target(target)
    if not g.is_network(canonical):
        await store.set(g.allow_key(canonical), str(int(now)), expires_at=now + ttl, now=now)
        return canonical
    entry = g.AllowEntry(canonical, now + ttl, float(int(now)))

    def add(current: str | None) -> tuple[Put | None, None]:
        entries, expiry = g.bucket_put(g.decode_bucket(current), entry, drop=canonical, now=now)
        return Put(g.encode_bucket(entries), expiry), None
    await store.update(g.bucket_key(canonical), add, now=now)
    return canonical


async def deny(store: Store, target: str, *, now: float) -> tuple[str, bool]:
    """Remove an admin allow entry; (canonical target, whether it existed)."""
    canonical = g.parse_allow_target(target)
    if not g.is_network(canonical):
        return canonical, await store.delete(g.allow_key(canonical))

    def remove(current: str | None) -> tuple[Put | None, bool]:
        entries = g.decode_bucket(current)
        if not any(e.network == canonical and e.expires_at > now for e in entries):
            return None, False
        kept, expiry = g.bucket_put(entries, None, drop=canonical, now=now)
        return Put(g.encode_bucket(kept), expiry), True
    return canonical, await store.update(g.bucket_key(canonical), remove, now=now)


async def allowed(store: Store, *, now: float) -> AsyncIterator[tuple[str, float, float]]:
    """Every live admin allow entry: (target, expires_at, added)."""
    async for item in store.scan(g.ALLOW_PREFIX, now=now):
        try:
            added = float(item.value)
        except ValueError:
            added = 0.0
        yield item.key[len(g.ALLOW_PREFIX):], item.expires_at, added
    async for item in store.scan(g.ALLOW_NET_PREFIX, now=now):
        for entry in g.decode_bucket(item.value):
            if entry.expires_at > now:
                yield entry.network, entry.expires_at, entry.added


# --- the registry's entry point (smtpguard/sources/__init__.py) --------------

def read_settings(raw: Any) -> GraylistSettings:
    """`[graylist]` from the TOML document (None when absent)."""
    return GraylistSettings.from_mapping(table(raw, "graylist"))
