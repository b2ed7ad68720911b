"""The one DNS resolver: every lookup in smtpguard goes through here.

Decides:
    nothing about clients. It answers "what does DNS say about (name, type)"
    with three values a rule can use: OK (answered), NONE (NXDOMAIN or
    NODATA: the name or the data is not there) and UNKNOWN (timeout,
    SERVFAIL, REFUSED, a network error: could not tell).
Inputs:
    names and record types; the nameservers ("IP", "IP:PORT", "[v6]:PORT";
    None reads /etc/resolv.conf); a clock (injected for tests).
Output:
    `Answer(status, values, ttl, reason)`, `values` in text form and sorted
    (an RRset has no order, RFC 2181 §5): addresses for A/AAAA, names for
    PTR/CNAME/NS (lower case, no final dot), MX names in preference order,
    strings for TXT. `gather_within(budget, **lookups)` runs a stage's
    lookups concurrently under one deadline: the stage costs its slowest
    lookup, never the sum, and what is unfinished at the deadline is UNKNOWN
    ("deadline"). `stats()` counts lookups, queries, cache hits and joins.
Failure modes:
    none raise. A name that cannot exist in DNS (empty label, over 255
    octets) or an unparsable address answers NONE ("invalid name"); anything
    unexpected from the DNS library answers UNKNOWN ("error: ...") and is
    logged. Only a bad `servers` setting raises, as ConfigError, at start.
Defaults and why:
    * One dnspython asyncio resolver (`dns.asyncresolver`) with our own cache
      (dnspython's reads time.time(), not the injected clock).
    * `timeout` 5 s (issue 4) is the hard deadline of one query, all attempts
      and servers included; within it dnspython tries each server with
      attempts of timeout/2 (glibc's resolv.conf default is `attempts:2`) and
      falls back to TCP on a truncated UDP answer (RFC 7766 §5). EDNS payload
      1232 (DNS Flag Day 2020: no IP fragmentation).
    * A bounded LRU cache honours TTLs: positive answers for the smallest TTL
      of the answer and its CNAME chain, capped at one day (Unbound's
      cache-max-ttl default); negative answers for min(SOA TTL, SOA MINIMUM)
      (RFC 2308 §5), capped at `negative_ttl_max` (1 h, within RFC 2308 §5's
      advice of 1-3 h). A negative answer without an SOA is kept 60 s: RFC
      2308 §5 advises not to cache it, to stop loops between caching servers;
      we serve no one else, and one minute spares a burst from one host.
    * UNKNOWN is never cached. RFC 2308 §7.1 would allow 5 minutes for a
      SERVFAIL, but a client we deferred retries within minutes and must meet
      a repaired zone; and during an outage a failure cache saves nothing,
      since every client address asks a different DNSBL name. Concurrent
      askers of one name already share one query (next point).
    * At most one query per (name, type) is in flight: concurrent callers
      await the same task (postscreen shares concurrent DNSBL queries). A
      caller that gives up (a stage deadline) does not cancel it for the
      others, and its answer still fills the cache.
    * Answers are bounded before they are parsed or cached (issue 19 item 1:
      a client owns its reverse zone and the zones of its EHLO names). A
      message longer than `max_answer_bytes` (4096, the EDNS buffer size
      RFC 6891 §6.2.5 suggests starting from; far above what a mail host's
      answer needs) is refused unread on UDP and TCP alike: UNKNOWN
      ("oversized"). An RRset keeps at most `MAX_RRSET` records (32 addresses,
      10 PTR names: RFC 7208 §4.6.4's limit) and says which types it cut in
      `Answer.partial`, so that a check that did not find the client's
      address among the kept ones answers `unknown`, never `false`.
    * The cache is bounded in entries and in bytes (`cache_bytes`, 16 MiB:
      10,000 ordinary answers take about 2 MB, so only hostile answers ever
      reach it); least recently used first out.
    * Each session may send at most `session_lookups` (50) queries that the
      cache or a query in flight does not answer; then its lookups answer
      UNKNOWN ("budget"). A normal session needs 1 PTR, 2 per PTR name (at
      most 10), 1 per DNS list and 2 per HELO name: about 15; a client that
      makes us ask its own zones over and over gets `unknown` facts, which
      can defer but never reject.
    * Lookup errors are logged as the event `dns.error` with the session id,
      at most once per error kind per minute with the number of lines held
      back (`suppressed=`): a client choosing YXDOMAIN names must not be able
      to write our log.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import dataclasses
import functools
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import dns.asyncquery
import dns.asyncresolver
import dns.exception
import dns.inet
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.reversename

from smtpguard.core.facts import NONE, OK, UNKNOWN
from smtpguard.core.ip import unmapped
from smtpguard.core.settings import reject_unknown_keys
from smtpguard.core.units import parse_duration
from smtpguard.errors import ConfigError
from smtpguard.observe.log import escape, event

log = logging.getLogger("smtpguard.dns")

T = TypeVar("T")

# Defaults, each with its source (STYLE.md §5).
DEFAULT_TIMEOUT = 5.0            # issue 4: per query, all attempts and servers included
DEFAULT_STAGE_BUDGET = 10.0      # see DnsSettings.stage_budget
DEFAULT_CACHE_SIZE = 10_000      # entries; ~2 MB; a busy MX sees a few thousand IPs an hour
DEFAULT_NEGATIVE_TTL_MAX = 3600.0  # RFC 2308 §5: 1-3 hours is the advised maximum
NEGATIVE_TTL_WITHOUT_SOA = 60.0  # RFC 2308 §5 says do not cache; one minute for bursts
POSITIVE_TTL_MAX = 86400.0       # Unbound cache-max-ttl default (1 day)
ATTEMPTS = 2                     # glibc resolv.conf `attempts:2`
EDNS_PAYLOAD = 1232              # DNS Flag Day 2020: avoids IP fragmentation
# RFC 6891 §6.2.5 suggests 4096 as the EDNS buffer size to start from; a mail
# host's answers (32 addresses, 10 PTR names, one 4096-bit DKIM key) fit in
# well under it, and dnspython parses 4 KiB in about 10 ms (65 KiB: 200 ms).
DEFAULT_MAX_ANSWER_BYTES = 4096
MAX_ANSWER_BYTES_LIMIT = 65535   # RFC 1035 §4.2.2: the TCP length field's maximum
# Records kept per RRset; more are cut (and the answer marked partial).
# RFC 7208 §4.6.4 looks at 10 PTR names at most and bounds an SPF check to
# 10 lookups; 32 addresses are more than any mail host publishes for a name.
MAX_RRSET: dict[str, int] = {"PTR": 10}
MAX_RRSET_DEFAULT = 32
# 16 MiB: 10,000 ordinary entries take about 2 MB; see the module docstring.
DEFAULT_CACHE_BYTES = 16 << 20
# Uncached queries per session; see the module docstring.
DEFAULT_SESSION_LOOKUPS = 50
# One dns.error line per error kind per minute (issue 19 item 2).
ERROR_LOG_INTERVAL = 60.0

# Why an answer is what it is: fixed words for logs and the decision record.
REASON_NXDOMAIN = "nxdomain"
REASON_NODATA = "nodata"
REASON_TIMEOUT = "timeout"
REASON_DEADLINE = "deadline"     # the stage budget ran out first
REASON_INVALID = "invalid name"
REASON_OVERSIZED = "oversized"   # longer than max_answer_bytes: not parsed
REASON_BUDGET = "budget"         # the session's lookups are spent

# RCODE text from dnspython -> reason (UNKNOWN answers).
_RCODE_REASONS: dict[str, str] = {
    "SERVFAIL": "servfail",
    "REFUSED": "refused",
    "FORMERR": "formerr",
    "NOTIMP": "notimp",
}

_NAME_TYPES = frozenset({"PTR", "CNAME", "NS", "DNAME"})


@dataclass(frozen=True, slots=True)
class Answer:
    """What DNS said about one (name, type)."""

    status: str                       # OK, NONE or UNKNOWN (core/facts.py)
    values: tuple[str, ...] = ()      # text form; empty unless OK
    ttl: int = 0                      # seconds this answer stays valid (0: not cached)
    reason: str = ""                  # "" for OK; nxdomain nodata timeout servfail refused deadline ...
    # Record types whose records may be missing from `values`: cut at
    # MAX_RRSET, or (for `addresses`) the family whose lookup failed. A check
    # that does not find what it looks for in a partial answer cannot say no.
    partial: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == OK


UNKNOWN_DEADLINE = Answer(UNKNOWN, reason=REASON_DEADLINE)


@dataclass(frozen=True, slots=True)
class ResolverStats:
    """Counters since the resolver was made (for the bench and logs)."""

    lookups: int        # calls of query() (ptr/addresses count their parts)
    queries: int        # resolutions actually sent to the nameservers
    cache_hits: int
    inflight_joins: int  # callers that shared a query already in flight
    failures: int       # queries that ended UNKNOWN
    cache_entries: int
    cache_bytes: int = 0     # estimated size of the cached answers
    over_budget: int = 0     # lookups refused because a session's budget was spent

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def parse_server(text: str) -> tuple[str, int]:
    """`IP`, `IP:PORT`, `[v6]` or `[v6]:PORT` (a bare IPv6 has no port) -> (ip, port).

    Raises ValueError naming what is wrong."""
    text = text.strip()
    host, port = text, 53  # RFC 1035 §4.2
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"unclosed '[' in {text!r}")
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"expected [IPv6]:PORT, got {text!r}")
            port = _port(rest[1:], text)
    elif text.count(":") == 1:
        host, port_text = text.split(":")
        port = _port(port_text, text)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"expected an IP address, IP:PORT or [IPv6]:PORT, got {text!r}") from None
    return ip.compressed, port


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"port must be 1-65535 in {whole!r}")
    return int(text)


def _values(rdtype: str, rrset: Any) -> tuple[tuple[str, ...], bool]:
    """Text form of an answer's records (see module docstring), sorted, at
    most MAX_RRSET of them; and whether some were cut. An RRset has no order
    (RFC 2181 §5), so the sorted order decides which are kept: the same ones
    every time, and logs and tests repeat. (The message is at most
    max_answer_bytes, so a few hundred records at worst are sorted.)"""
    values = _text_values(rdtype, rrset)
    limit = MAX_RRSET.get(rdtype, MAX_RRSET_DEFAULT)
    return values[:limit], len(values) > limit


def _text_values(rdtype: str, rrset: Any) -> tuple[str, ...]:
    if rdtype in ("A", "AAAA"):
        addrs = sorted({ipaddress.ip_address(rd.address) for rd in rrset})
        return tuple(a.compressed for a in addrs)
    if rdtype in _NAME_TYPES:
        return tuple(sorted({rd.target.to_text(omit_final_dot=True).lower() for rd in rrset}))
    if rdtype == "MX":
        # RFC 5321 §5.1: lower preference first.
        pairs = sorted({(rd.preference, rd.exchange.to_text(omit_final_dot=True).lower()) for rd in rrset})
        return tuple(dict.fromkeys(name for _, name in pairs))
    if rdtype == "TXT":
        return tuple(sorted({b"".join(rd.strings).decode("utf-8", "replace") for rd in rrset}))
    return tuple(sorted({rd.to_text() for rd in rrset}))


def _negative_ttl(response: dns.message.Message | None) -> float | None:
    """RFC 2308 §5: min(SOA TTL, SOA MINIMUM) from the authority section."""
    if response is None:
        return None
    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return float(min(rrset.ttl, rrset[0].minimum))
    return None


class OversizedAnswer(dns.exception.FormError):
    """A DNS message longer than the resolver accepts (refused unparsed).

    A FormError, so that dnspython drops the server for this query: the
    lookup ends UNKNOWN at once instead of being asked again."""


class _CappedSocket:
    """A dnspython socket that refuses, before anything is parsed, a UDP
    datagram or a TCP message longer than `limit` bytes. Everything else is
    the wrapped socket's."""

    def __init__(self, sock: Any, limit: int) -> None:
        self._sock = sock
        self._limit = limit
        self._head = b""        # TCP: the two-byte length prefix (RFC 1035 §4.2.2)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)

    async def recvfrom(self, size: int, timeout: float | None) -> Any:
        wire, address = await self._sock.recvfrom(size, timeout)
        if len(wire) > self._limit:
            raise OversizedAnswer(f"a {len(wire)}-byte UDP answer (at most {self._limit})")
        return wire, address

    async def recv(self, size: int, timeout: float | None) -> bytes:
        data: bytes = await self._sock.recv(size, timeout)
        if len(self._head) < 2:
            self._head += data[: 2 - len(self._head)]
            if len(self._head) == 2:
                length = int.from_bytes(self._head, "big")
                if length > self._limit:
                    raise OversizedAnswer(f"a {length}-byte TCP answer (at most {self._limit})")
        return data


class BoundedNameserver(dns.nameserver.Do53Nameserver):
    """Do53 (UDP, TCP after truncation) through `_CappedSocket`s."""

    def __init__(self, address: str, port: int, max_bytes: int) -> None:
        super().__init__(address, port)
        self.max_bytes = max_bytes

    async def async_query(self, request: dns.message.QueryMessage, timeout: float, source: str | None,
                          source_port: int, max_size: bool, backend: Any,
                          one_rr_per_rrset: bool = False, ignore_trailing: bool = False) -> dns.message.Message:
        af = dns.inet.af_for_address(self.address)
        local = (source, source_port) if source else None
        if max_size:
            sock = await backend.make_socket(af, socket.SOCK_STREAM, 0, local, (self.address, self.port),
                                             timeout)
            async with sock:
                return await dns.asyncquery.tcp(
                    request, self.address, timeout=timeout, port=self.port,
                    one_rr_per_rrset=one_rr_per_rrset, ignore_trailing=ignore_trailing,
                    sock=_CappedSocket(sock, self.max_bytes))  # type: ignore[arg-type]
        peer = (self.address, self.port) if backend.datagram_connection_required() else None
        sock = await backend.make_socket(af, socket.SOCK_DGRAM, 0, local, peer)
        async with sock:
            return await dns.asyncquery.udp(
                request, self.address, timeout=timeout, port=self.port, raise_on_truncation=True,
                one_rr_per_rrset=one_rr_per_rrset, ignore_trailing=ignore_trailing,
                ignore_errors=True, ignore_unexpected=True,
                sock=_CappedSocket(sock, self.max_bytes))  # type: ignore[arg-type]


class LookupBudget:
    """How many more queries one session may cause (see the module docstring)."""

    __slots__ = ("left", "spent")

    def __init__(self, lookups: int = DEFAULT_SESSION_LOOKUPS) -> None:
        self.left = lookups
        self.spent = 0

    def take(self) -> bool:
        if self.left <= 0:
            return False
        self.left -= 1
        self.spent += 1
        return True


class RateLimitedLog:
    """At most one line per key per `interval` seconds; the next line that
    goes out says how many were held back. Keys are a small fixed set
    (error kinds, list labels); the table is bounded all the same."""

    MAX_KEYS = 1024

    def __init__(self, interval: float = ERROR_LOG_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self._clock = clock
        self._last: dict[str, tuple[float, int]] = {}  # key -> (last emitted, suppressed since)

    def event(self, name: str, key: str, /, level: int = logging.INFO, **fields: Any) -> bool:
        """Log `name` with `fields` unless `key` was logged within the
        interval; True when the line went out."""
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.interval:
            self._last[key] = (last[0], last[1] + 1)
            return False
        if last is None and len(self._last) >= self.MAX_KEYS:
            self._last.clear()
        suppressed = last[1] if last is not None else 0
        self._last[key] = (now, 0)
        if suppressed:
            fields["suppressed"] = suppressed
        event(name, level, **{k: v for k, v in fields.items() if v is not None})
        return True


# The session a lookup runs for (set by SessionResolver): a query task
# started for it copies the context, so its error line carries the id.
_SESSION: contextvars.ContextVar[str] = contextvars.ContextVar("smtpguard_dns_session", default="")


class Resolver:
    """One shared asynchronous resolver with a TTL cache and in-flight sharing.

    Use from one event loop at a time (the in-flight table is per loop)."""

    def __init__(
        self,
        nameservers: Sequence[str] | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        cache_size: int = DEFAULT_CACHE_SIZE,
        negative_ttl_max: float = DEFAULT_NEGATIVE_TTL_MAX,
        clock: Callable[[], float] = time.monotonic,
        negative_ttl_default: float = NEGATIVE_TTL_WITHOUT_SOA,
        positive_ttl_max: float = POSITIVE_TTL_MAX,
        max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        session_lookups: int = DEFAULT_SESSION_LOOKUPS,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.timeout = timeout
        self.cache_size = max(0, cache_size)
        self.cache_bytes = max(0, cache_bytes)
        self.max_answer_bytes = max(512, min(max_answer_bytes, MAX_ANSWER_BYTES_LIMIT))
        self.session_lookups = session_lookups
        self.errors = RateLimitedLog(clock=clock)
        self.negative_ttl_max = negative_ttl_max
        self.negative_ttl_default = negative_ttl_default
        self.positive_ttl_max = positive_ttl_max
        self._clock = clock
        try:
            self._resolver = dns.asyncresolver.Resolver(configure=nameservers is None)
        except dns.resolver.NoResolverConfiguration:
            raise ConfigError("dns.servers", "no servers given and /etc/resolv.conf names none") from None
        if nameservers is not None:
            if not nameservers:
                raise ConfigError("dns.servers", "the list of servers is empty")
            servers: list[str | dns.nameserver.Nameserver] = []
            for text in nameservers:
                try:
                    ip, port = parse_server(text)
                except ValueError as exc:
                    raise ConfigError("dns.servers", str(exc)) from None
                servers.append(BoundedNameserver(ip, port, self.max_answer_bytes))
            self._resolver.nameservers = servers
        else:
            # /etc/resolv.conf's servers, bounded alike.
            self._resolver.nameservers = [
                BoundedNameserver(ns.address, ns.port, self.max_answer_bytes)
                if isinstance(ns, dns.nameserver.Do53Nameserver) else ns
                for ns in self._resolver.nameservers
            ]
        self._resolver.cache = None          # ours, on the injected clock
        self._resolver.lifetime = timeout
        self._resolver.timeout = timeout / ATTEMPTS
        self._resolver.retry_servfail = False
        self._resolver.use_edns(0, 0, EDNS_PAYLOAD)
        self._resolver.search = []
        self._cache: collections.OrderedDict[tuple[str, str], tuple[float, Answer, int]] = collections.OrderedDict()
        self._cached_bytes = 0
        self._over_budget = 0
        self._inflight: dict[tuple[str, str], asyncio.Task[Answer]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lookups = self._queries = self._hits = self._joins = self._failures = 0

    @classmethod
    def from_settings(cls, settings: "DnsSettings", clock: Callable[[], float] = time.monotonic) -> "Resolver":
        return cls(settings.servers or None, timeout=settings.timeout, cache_size=settings.cache_size,
                   negative_ttl_max=settings.negative_ttl_max, clock=clock,
                   max_answer_bytes=settings.max_answer_bytes, cache_bytes=settings.cache_bytes,
                   session_lookups=settings.session_lookups)

    def budget(self) -> LookupBudget:
        """A fresh per-session budget of `session_lookups` queries."""
        return LookupBudget(self.session_lookups)

    def for_session(self, budget: LookupBudget, session: str = "") -> "SessionResolver":
        """This resolver as one session sees it: its lookups spend `budget`
        and its error lines carry `session`."""
        return SessionResolver(self, budget, session)

    # -- public lookups ------------------------------------------------------

    async def query(self, name: str, rdtype: str, *, budget: LookupBudget | None = None) -> Answer:
        """One (name, type): from the cache, a query in flight, or the servers
        (the last only while `budget`, if given, lasts)."""
        self._lookups += 1
        parsed = _question(name, rdtype)
        if parsed is None:
            return Answer(NONE, reason=REASON_INVALID)
        qname, key = parsed
        rtype = key[1]

        hit = self._cached(key)
        if hit is not None:
            return hit

        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop, self._inflight = loop, {}
        task = self._inflight.get(key)
        if task is not None:
            self._joins += 1
        elif budget is not None and not budget.take():
            self._over_budget += 1
            return Answer(UNKNOWN, reason=REASON_BUDGET)
        else:
            task = loop.create_task(self._resolve(key, qname, rtype))
            self._inflight[key] = task
            inflight = self._inflight

            def forget(_task: asyncio.Task[Answer]) -> None:
                inflight.pop(key, None)

            task.add_done_callback(forget)
        # shield: a caller that gives up does not cancel the others' query.
        return await asyncio.shield(task)

    async def ptr(self, ip: str, *, budget: LookupBudget | None = None) -> Answer:
        """PTR names of an address (IPv4-mapped IPv6 is asked as IPv4)."""
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            self._lookups += 1
            return Answer(NONE, reason=REASON_INVALID)
        return await self.query(_reverse_name(unmapped(addr).compressed), "PTR", budget=budget)

    def _cached(self, key: tuple[str, str]) -> Answer | None:
        """A live cache entry (with its remaining TTL), counted as a hit; an
        expired one is dropped."""
        cached = self._cache.get(key)
        if cached is None:
            return None
        expires, answer, size = cached
        remaining = expires - self._clock()
        if remaining > 0:
            self._cache.move_to_end(key)
            self._hits += 1
            return dataclasses.replace(answer, ttl=int(remaining))
        del self._cache[key]
        self._cached_bytes -= size
        return None

    async def addresses(self, name: str, *, budget: LookupBudget | None = None) -> Answer:
        """A and AAAA at once, merged: OK if either has data, NONE if both have
        none, else UNKNOWN (one failed and the other had nothing). An OK
        answer names a failed family in `partial`."""
        qa, qaaaa = _question(name, "A"), _question(name, "AAAA")
        if qa is not None and qaaaa is not None and qa[1] in self._cache and qaaaa[1] in self._cache:
            # both cached (a returning client's names): no tasks (issue 15)
            a, aaaa = await self.query(name, "A", budget=budget), await self.query(name, "AAAA", budget=budget)
            return merge_addresses(a, aaaa)
        a, aaaa = await asyncio.gather(self.query(name, "A", budget=budget),
                                       self.query(name, "AAAA", budget=budget))
        return merge_addresses(a, aaaa)

    async def gather_within(self, budget: float, /, **lookups: Awaitable[Answer]) -> dict[str, Answer]:
        """See the module function `gather_within`."""
        return await gather_within(budget, **lookups)

    def stats(self) -> ResolverStats:
        return ResolverStats(self._lookups, self._queries, self._hits, self._joins,
                             self._failures, len(self._cache), self._cached_bytes, self._over_budget)

    # -- the query itself ------------------------------------------------------

    async def _resolve(self, key: tuple[str, str], qname: dns.name.Name, rtype: str) -> Answer:
        self._queries += 1
        try:
            # dnspython's lifetime is checked only between attempts (after a
            # back-off sleep); wait_for makes `timeout` the hard deadline.
            answer = await asyncio.wait_for(self._ask(qname, rtype), self.timeout)
        except asyncio.TimeoutError:
            answer = Answer(UNKNOWN, reason=REASON_TIMEOUT)
        if answer.status == UNKNOWN:
            self._failures += 1
        elif answer.ttl > 0 and self.cache_size:
            size = _entry_size(key, answer)
            if size <= self.cache_bytes:
                old = self._cache.pop(key, None)
                if old is not None:
                    self._cached_bytes -= old[2]
                self._cache[key] = (self._clock() + answer.ttl, answer, size)
                self._cached_bytes += size
                while len(self._cache) > self.cache_size or self._cached_bytes > self.cache_bytes:
                    _, (_, _, dropped) = self._cache.popitem(last=False)
                    self._cached_bytes -= dropped
        return answer

    async def _ask(self, qname: dns.name.Name, rtype: str) -> Answer:
        try:
            result = await self._resolver.resolve(qname, rtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN as exc:
            responses = exc.kwargs.get("responses") or {}
            return Answer(NONE, ttl=self._neg_ttl(next(iter(responses.values()), None)),
                          reason=REASON_NXDOMAIN)
        except dns.exception.Timeout:
            return Answer(UNKNOWN, reason=REASON_TIMEOUT)
        except dns.resolver.NoNameservers as exc:
            reason = _failure_reason(exc)
            if reason == REASON_OVERSIZED:
                self._log_error(qname, rtype, reason)
            return Answer(UNKNOWN, reason=reason)
        except (dns.exception.DNSException, OSError, ValueError) as exc:
            self._log_error(qname, rtype, type(exc).__name__)
            return Answer(UNKNOWN, reason=f"error: {type(exc).__name__}")
        if result.rrset is None:
            return Answer(NONE, ttl=self._neg_ttl(result.response), reason=REASON_NODATA)
        ttl = min(float(result.chaining_result.minimum_ttl), self.positive_ttl_max)
        values, cut = _values(rtype, result.rrset)
        return Answer(OK, values, int(ttl), partial=(rtype,) if cut else ())

    def _log_error(self, qname: dns.name.Name, rtype: str, kind: str) -> None:
        """One `dns.error` line per error kind per minute, with the session
        id (the name is the client's choice: escaped, bounded)."""
        self.errors.event("dns.error", f"dns.error {kind}", session=_SESSION.get() or None,
                          qname=escape(qname.to_text(omit_final_dot=True), 100), type=rtype, error=kind)

    def _neg_ttl(self, response: dns.message.Message | None) -> int:
        ttl = _negative_ttl(response)
        if ttl is None:
            ttl = self.negative_ttl_default
        return int(min(ttl, self.negative_ttl_max))


def _failure_reason(exc: dns.resolver.NoNameservers) -> str:
    """The last server's complaint: servfail, refused, oversized ... or `error`."""
    for error in reversed(exc.kwargs.get("errors") or []):
        what = error[3]
        if isinstance(what, str):
            return _RCODE_REASONS.get(what, what.lower())
        if isinstance(what, OversizedAnswer):
            return REASON_OVERSIZED
        return f"error: {type(what).__name__}"
    return "error"


def _entry_size(key: tuple[str, str], answer: Answer) -> int:
    """A cache entry's memory, estimated: CPython's overhead of the tuple,
    the Answer and each string (about 50 bytes each) plus the text."""
    return 300 + len(key[0]) + sum(60 + len(v) for v in answer.values)


def merge_addresses(a: Answer, aaaa: Answer) -> Answer:
    """The A and AAAA answers of one name as one answer (see `addresses`)."""
    parts = (a, aaaa)
    if any(p.status == OK for p in parts):
        values = a.values + aaaa.values if a.ok and aaaa.ok else (a.values if a.ok else aaaa.values)
        # A family that failed might have held the address someone looks for.
        partial = a.partial + aaaa.partial + tuple(t for t, p in (("A", a), ("AAAA", aaaa))
                                                   if p.status == UNKNOWN)
        return Answer(OK, values, min(p.ttl for p in parts if p.ok), partial=partial)
    if all(p.status == NONE for p in parts):
        return Answer(NONE, ttl=min(a.ttl, aaaa.ttl), reason=a.reason if a.reason == aaaa.reason else REASON_NODATA)
    failed = next(p for p in parts if p.status == UNKNOWN)
    return Answer(UNKNOWN, reason=failed.reason)


class SessionResolver:
    """The shared resolver as one session uses it: each query the cache does
    not answer spends the session's LookupBudget, and error lines name the
    session. Same lookups as Resolver (what the sources call)."""

    __slots__ = ("resolver", "budget", "session")

    def __init__(self, resolver: Resolver, budget: LookupBudget, session: str = "") -> None:
        self.resolver = resolver
        self.budget = budget
        self.session = session

    async def query(self, name: str, rdtype: str) -> Answer:
        _SESSION.set(self.session)  # this task's context only
        return await self.resolver.query(name, rdtype, budget=self.budget)

    async def ptr(self, ip: str) -> Answer:
        _SESSION.set(self.session)
        return await self.resolver.ptr(ip, budget=self.budget)

    async def addresses(self, name: str) -> Answer:
        _SESSION.set(self.session)
        return await self.resolver.addresses(name, budget=self.budget)

    async def gather_within(self, budget: float, /, **lookups: Awaitable[Answer]) -> dict[str, Answer]:
        return await gather_within(budget, **lookups)

    def stats(self) -> ResolverStats:
        return self.resolver.stats()

    @property
    def errors(self) -> RateLimitedLog:
        return self.resolver.errors


# Names and addresses repeat (one client's several sessions, its HELO name):
# their parsed forms are kept, a bounded number (issue 15: parsing showed in
# the per-message profile).
PARSED_NAMES = 4096


@functools.lru_cache(maxsize=PARSED_NAMES)
def _question(name: str, rdtype: str) -> tuple[dns.name.Name, tuple[str, str]] | None:
    """The absolute query name (no search list) and the cache key of a
    (name, type); None when either is invalid."""
    try:
        qname = dns.name.from_text(name)
        rtype = dns.rdatatype.to_text(dns.rdatatype.from_text(rdtype))
    except (dns.exception.DNSException, ValueError):
        return None
    return qname, (qname.to_text().lower(), rtype)


@functools.lru_cache(maxsize=PARSED_NAMES)
def _reverse_name(ip: str) -> str:
    """The PTR owner name of a valid address (in-addr.arpa / ip6.arpa)."""
    return str(dns.reversename.from_address(ip).to_text())


async def within(
    budget: float | Mapping[str, float],
    awaitables: Mapping[str, Awaitable[T]],
    timed_out: Callable[[str], T],
) -> dict[str, T]:
    """Run `awaitables` concurrently, each under its deadline: `budget`
    seconds for all, or `budget[key]` seconds for each key.

    Returns every key: the result, or `timed_out(key)` for what did not finish
    by its deadline (cancelled then) or raised (logged: a bug in a source, not
    a DNS fact). The call costs its slowest awaitable, each capped at its own
    deadline."""
    def deadline(key: str) -> float:
        return max(0.0, budget if isinstance(budget, (int, float)) else budget[key])

    if len(awaitables) == 1:
        # One awaitable (most stages run one source): awaited in this task
        # under a timeout, without a task and a wait of its own (issue 15).
        [(key, aw)] = awaitables.items()
        try:
            async with asyncio.timeout(deadline(key)):
                return {key: await aw}
        except TimeoutError:
            return {key: timed_out(key)}
        except Exception as e:  # a bug in a source, not a DNS fact
            log.error("dns.gather_failed key=%s", key, exc_info=e)
            return {key: timed_out(key)}
    tasks = {key: asyncio.ensure_future(aw) for key, aw in awaitables.items()}
    try:
        # Wait for everything up to the nearest deadline, cut what has that
        # deadline, and go on to the next: one wait per distinct deadline.
        start = asyncio.get_running_loop().time()
        for cut in sorted({deadline(key) for key in tasks}):
            waiting = [t for t in tasks.values() if not t.done()]
            if not waiting:
                break
            await asyncio.wait(waiting, timeout=max(0.0, start + cut - asyncio.get_running_loop().time()))
            for key, task in tasks.items():
                if deadline(key) <= cut and not task.done():
                    task.cancel()
    finally:
        pending = [t for t in tasks.values() if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
    results: dict[str, T] = {}
    for key, task in tasks.items():
        if task.cancelled():
            results[key] = timed_out(key)
        elif task.exception() is not None:
            log.error("dns.gather_failed key=%s", key, exc_info=task.exception())
            results[key] = timed_out(key)
        else:
            results[key] = task.result()
    return results


async def gather_within(budget: float, /, **lookups: Awaitable[Answer]) -> dict[str, Answer]:
    """`within` for DNS answers: unfinished lookups are UNKNOWN ("deadline").

        got = await gather_within(10.0, ptr=r.ptr(ip), a=r.addresses(helo))
    """
    return await within(budget, lookups, lambda _key: UNKNOWN_DEADLINE)


# -- settings ----------------------------------------------------------------

_DNS_KEYS = ("servers", "timeout", "stage_budget", "cache_size", "negative_ttl_max",
             "max_answer_bytes", "cache_bytes", "session_lookups")
STAGE_BUDGET_MAX = 300.0  # RFC 5321 §4.5.3.2: clients give up after 5 minutes


@dataclass(frozen=True, slots=True)
class DnsSettings:
    """`[dns]`: the resolver and the per-stage lookup deadline."""

    # Empty: the system's /etc/resolv.conf. A local caching resolver is what
    # DNSBL operators ask for (Spamhaus refuses queries from public resolvers).
    servers: tuple[str, ...] = ()
    # Issue 4: one query, all retries included, gives up after 5 s.
    timeout: float = DEFAULT_TIMEOUT
    # One stage's lookups (PTR, forward, DNSBLs) share one deadline. 10 s:
    # RFC 5321 §4.5.3.2 lets a client wait 5 minutes for the greeting and for
    # each reply, so the protocol tolerates it, but every second holds a
    # connection slot and real senders give up long before 5 minutes; 10 s is
    # two query timeouts (a lookup chained on another still fits) and is
    # Postfix's postscreen_dnsbl_timeout.
    stage_budget: float = DEFAULT_STAGE_BUDGET
    cache_size: int = DEFAULT_CACHE_SIZE
    negative_ttl_max: float = DEFAULT_NEGATIVE_TTL_MAX
    # Issue 19: answers, the cache and each session's lookups are bounded
    # (the module docstring says why these numbers).
    max_answer_bytes: int = DEFAULT_MAX_ANSWER_BYTES
    cache_bytes: int = DEFAULT_CACHE_BYTES
    session_lookups: int = DEFAULT_SESSION_LOOKUPS

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], prefix: str = "dns") -> "DnsSettings":
        reject_unknown_keys(table, prefix, _DNS_KEYS)
        values: dict[str, Any] = {}
        if "servers" in table:
            servers = table["servers"]
            if isinstance(servers, str):
                servers = [servers]
            if not isinstance(servers, (list, tuple)) or not all(isinstance(s, str) for s in servers):
                raise ConfigError(f"{prefix}.servers", f"expected a list of \"IP\", \"IP:PORT\" or \"[IPv6]:PORT\", got {servers!r}")
            for server in servers:
                try:
                    parse_server(server)
                except ValueError as exc:
                    raise ConfigError(f"{prefix}.servers", str(exc)) from None
            values["servers"] = tuple(servers)
        # (key, lowest allowed, whether the lowest is allowed, highest)
        for key, low, low_ok, high in (("timeout", 0.0, False, 60.0),
                                       ("stage_budget", 0.0, False, STAGE_BUDGET_MAX),
                                       ("negative_ttl_max", 0.0, True, 86400.0)):
            if key in table:
                try:
                    seconds = parse_duration(table[key])
                except ValueError as exc:
                    raise ConfigError(f"{prefix}.{key}", str(exc)) from None
                if not (low <= seconds if low_ok else low < seconds) or seconds > high:
                    floor = f"at least {low:g}s" if low_ok else f"more than {low:g}s"
                    raise ConfigError(f"{prefix}.{key}", f"must be {floor} and at most {high:g}s, got {table[key]!r}")
                values[key] = seconds
        if "cache_size" in table:
            size = table["cache_size"]
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise ConfigError(f"{prefix}.cache_size", f"expected a whole number of entries >= 0 (0 turns the cache off), got {size!r}")
            values["cache_size"] = size
        # (key, lowest, highest, what it counts)
        for key, low, high, unit in (("max_answer_bytes", 512, MAX_ANSWER_BYTES_LIMIT, "bytes"),
                                     ("cache_bytes", 0, 1 << 40, "bytes (0 turns the cache off)"),
                                     ("session_lookups", 1, 100_000, "lookups")):
            if key in table:
                n = table[key]
                if isinstance(n, bool) or not isinstance(n, int) or not low <= n <= high:
                    raise ConfigError(f"{prefix}.{key}", f"expected a whole number of {unit} from {low} "
                                      f"to {high}, got {n!r}")
                values[key] = n
        return cls(**values)
