"""The resolver against a real DNS server on loopback (tests/fixtures_dns.py)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from smtpguard.adapters.dns import (
    Answer,
    DnsSettings,
    Resolver,
    gather_within,
    merge_addresses,
    parse_server,
)
from smtpguard.core.facts import NONE, OK, UNKNOWN
from smtpguard.errors import ConfigError
from tests.fixtures_dns import DnsServer, ptr_name


class Clock:
    """An injected clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def resolver(server: DnsServer, **kw: Any) -> Resolver:
    kw.setdefault("timeout", 1.0)
    return Resolver([server.address], **kw)


# -- what each kind of answer becomes ------------------------------------------

def _records(s: DnsServer) -> None:
    s.set("a.example", "A", ["192.0.2.1"], ttl=60)
    s.set("six.example", "AAAA", ["2001:DB8:0:0:0:0:0:1"])
    s.set_ptr("192.0.2.1", ["MAIL.Example.", "smtp.example."])
    s.set("alias.example", "CNAME", ["hop.example."], ttl=30)
    s.set("hop.example", "CNAME", ["a.example."], ttl=40)
    s.set("dangling.example", "CNAME", ["nowhere.example."])
    s.set("mx.example", "MX", ["20 backup.example.", "10 Primary.example."])
    s.set("txt.example", "TXT", ["v=spf1 -all"])
    s.servfail("broken.example")
    s.refuse("private.example")


ANSWERS = [
    pytest.param("a.example", "A", OK, ("192.0.2.1",), "", id="an A record answers ok with its address"),
    pytest.param("six.example", "AAAA", OK, ("2001:db8::1",), "", id="an AAAA record answers in compressed form"),
    pytest.param(ptr_name("192.0.2.1"), "PTR", OK, ("mail.example", "smtp.example"), "",
                 id="two PTR names both come back lower case without the final dot"),
    pytest.param("alias.example", "A", OK, ("192.0.2.1",), "", id="a CNAME chain is followed to the address"),
    pytest.param("alias.example", "CNAME", OK, ("hop.example",), "", id="asking for the CNAME itself gives its target"),
    pytest.param("mx.example", "MX", OK, ("primary.example", "backup.example"), "",
                 id="MX names come in preference order"),
    pytest.param("txt.example", "TXT", OK, ("v=spf1 -all",), "", id="a TXT record gives its text"),
    pytest.param("a.example", "AAAA", NONE, (), "nodata", id="a name without the asked type is NODATA, none"),
    pytest.param("nothing.example", "A", NONE, (), "nxdomain", id="a name that does not exist is NXDOMAIN, none"),
    pytest.param("dangling.example", "A", NONE, (), "nxdomain", id="a CNAME to a missing name is none"),
    pytest.param("broken.example", "A", UNKNOWN, (), "servfail", id="SERVFAIL is unknown, not none"),
    pytest.param("private.example", "A", UNKNOWN, (), "refused", id="REFUSED is unknown, not none"),
    pytest.param("bad..example", "A", NONE, (), "invalid name", id="a name with an empty label cannot exist"),
]


@pytest.mark.parametrize("name, rtype, status, values, reason", ANSWERS)
def test_answer_kinds(dns_server: DnsServer, name: str, rtype: str, status: str,
                      values: tuple[str, ...], reason: str) -> None:
    _records(dns_server)
    got = run(resolver(dns_server).query(name, rtype))
    assert (got.status, got.values, got.reason) == (status, values, reason)


def test_cname_chain_ttl_is_the_smallest_on_the_chain(dns_server: DnsServer) -> None:
    _records(dns_server)
    assert run(resolver(dns_server).query("alias.example", "A")).ttl == 30


def test_silence_is_unknown_within_the_timeout(dns_server: DnsServer) -> None:
    dns_server.silent("quiet.example")
    start = time.monotonic()
    got = run(resolver(dns_server, timeout=0.5).query("quiet.example", "A"))
    elapsed = time.monotonic() - start
    assert (got.status, got.reason) == (UNKNOWN, "timeout")
    assert 0.45 <= elapsed < 0.8
    # Retries are bounded: a few attempts, not a storm.
    assert 1 <= dns_server.queries("quiet.example", "A") <= 3


def test_truncated_udp_answer_is_asked_again_over_tcp(dns_server: DnsServer) -> None:
    dns_server.set("big.example", "A", ["192.0.2.9"])
    dns_server.truncate("big.example")
    got = run(resolver(dns_server).query("big.example", "A"))
    assert got.values == ("192.0.2.9",)
    assert dns_server.queries("big.example", "A", "udp") == 1
    assert dns_server.queries("big.example", "A", "tcp") == 1


def test_an_answer_too_big_for_udp_comes_over_tcp(dns_server: DnsServer) -> None:
    many = [f"10.0.{i // 256}.{i % 256}" for i in range(100)]  # ~1.6 KB: over 1232, under 4096
    dns_server.set("many.example", "A", many)
    got = run(resolver(dns_server).query("many.example", "A"))
    assert len(got.values) == 32 and got.partial == ("A",)  # MAX_RRSET_DEFAULT (issue 19)
    assert dns_server.queries("many.example", "A", "tcp") == 1


@pytest.mark.parametrize("ip, expected", [
    pytest.param("192.0.2.1", "mail.example", id="an IPv4 address is asked under in-addr.arpa"),
    pytest.param("2001:db8::25", "six.example", id="an IPv6 address is asked in nibble form under ip6.arpa"),
    pytest.param("::ffff:192.0.2.1", "mail.example", id="an IPv4-mapped IPv6 address is asked as IPv4"),
])
def test_ptr(dns_server: DnsServer, ip: str, expected: str) -> None:
    dns_server.set_ptr("192.0.2.1", ["mail.example."])
    dns_server.set_ptr("2001:db8::25", ["six.example."])
    got = run(resolver(dns_server).ptr(ip))
    assert got.values == (expected,)


def test_ptr_of_something_that_is_not_an_address_is_none(dns_server: DnsServer) -> None:
    got = run(resolver(dns_server).ptr("not-an-ip"))
    assert (got.status, got.reason) == (NONE, "invalid name")
    assert dns_server.total_queries() == 0


def test_server_on_ipv6_loopback(dns_server6: DnsServer) -> None:
    dns_server6.set("a.example", "A", ["192.0.2.1"])
    assert dns_server6.address.startswith("[::1]:")
    assert run(resolver(dns_server6).query("a.example", "A")).values == ("192.0.2.1",)


# -- addresses(): A and AAAA together ------------------------------------------

def test_addresses_asks_a_and_aaaa_and_merges(dns_server: DnsServer) -> None:
    dns_server.set("dual.example", "A", ["192.0.2.7"], ttl=100)
    dns_server.set("dual.example", "AAAA", ["2001:db8::7"], ttl=50)
    got = run(resolver(dns_server).addresses("dual.example"))
    assert got == Answer(OK, ("192.0.2.7", "2001:db8::7"), 50)


_A = Answer(OK, ("192.0.2.1",), 60)
_AAAA = Answer(OK, ("2001:db8::1",), 30)
_NX = Answer(NONE, ttl=60, reason="nxdomain")
_NODATA = Answer(NONE, ttl=20, reason="nodata")
_FAIL = Answer(UNKNOWN, reason="timeout")


@pytest.mark.parametrize("a, aaaa, expected", [
    pytest.param(_A, _AAAA, Answer(OK, ("192.0.2.1", "2001:db8::1"), 30), id="both families answered: both, smallest ttl"),
    pytest.param(_A, _NODATA, _A, id="IPv4 only is ok"),
    pytest.param(_NODATA, _AAAA, _AAAA, id="IPv6 only is ok"),
    pytest.param(_A, _FAIL, Answer(OK, _A.values, 60, partial=("AAAA",)),
                 id="one family failing does not hide the other's data, and marks it partial"),
    pytest.param(_NX, _NX, Answer(NONE, ttl=60, reason="nxdomain"), id="no such name in either family is none"),
    pytest.param(_NODATA, _NX, Answer(NONE, ttl=20, reason="nodata"), id="nothing in either family is none"),
    pytest.param(_FAIL, _NODATA, Answer(UNKNOWN, reason="timeout"), id="one failed and the other had nothing is unknown"),
])
def test_merge_addresses(a: Answer, aaaa: Answer, expected: Answer) -> None:
    assert merge_addresses(a, aaaa) == expected


# -- the cache -----------------------------------------------------------------

def test_positive_answers_are_cached_for_their_ttl(dns_server: DnsServer) -> None:
    dns_server.set("a.example", "A", ["192.0.2.1"], ttl=60)
    clock = Clock()
    r = resolver(dns_server, clock=clock)

    async def scenario() -> list[Answer]:
        got = [await r.query("a.example", "A")]
        clock.now += 59
        got.append(await r.query("A.EXAMPLE.", "A"))  # same key, any case
        assert dns_server.queries("a.example", "A") == 1
        clock.now += 2
        got.append(await r.query("a.example", "A"))
        return got

    first, cached, refreshed = run(scenario())
    assert dns_server.queries("a.example", "A") == 2
    assert (first.ttl, cached.ttl, refreshed.ttl) == (60, 1, 60)
    assert r.stats().cache_hits == 1


@pytest.mark.parametrize("soa_minimum, cap, expected_ttl", [
    pytest.param(30, 3600, 30, id="negative answers are kept for the SOA minimum"),
    pytest.param(7200, 100, 100, id="a long SOA minimum is capped at negative_ttl_max"),
    pytest.param(None, 3600, 60, id="a negative answer without SOA is kept 60 seconds"),
])
def test_negative_caching(soa_minimum: int | None, cap: float, expected_ttl: int) -> None:
    with DnsServer(negative_ttl=soa_minimum) as server:
        server.set("a.example", "A", ["192.0.2.1"])
        clock = Clock()
        r = resolver(server, clock=clock, negative_ttl_max=cap)

        async def scenario() -> tuple[Answer, Answer]:
            nx = await r.query("gone.example", "A")
            nodata = await r.query("a.example", "TXT")
            clock.now += expected_ttl - 1
            assert (await r.query("gone.example", "A")).status == NONE
            assert (await r.query("a.example", "TXT")).status == NONE
            assert server.queries("gone.example", "A") == 1
            assert server.queries("a.example", "TXT") == 1
            clock.now += 2
            await r.query("gone.example", "A")
            await r.query("a.example", "TXT")
            return nx, nodata

        nx, nodata = run(scenario())
        assert (nx.ttl, nodata.ttl) == (expected_ttl, expected_ttl)
        assert server.queries("gone.example", "A") == 2
        assert server.queries("a.example", "TXT") == 2


def test_failures_are_not_cached(dns_server: DnsServer) -> None:
    dns_server.servfail("flaky.example")
    r = resolver(dns_server)

    async def scenario() -> list[Answer]:
        got = [await r.query("flaky.example", "A"), await r.query("flaky.example", "A")]
        dns_server.set("flaky.example", "A", ["192.0.2.3"])  # the zone is repaired
        got.append(await r.query("flaky.example", "A"))
        return got

    first, second, repaired = run(scenario())
    assert (first.status, second.status, repaired.status) == (UNKNOWN, UNKNOWN, OK)
    assert dns_server.queries("flaky.example", "A") == 3


def test_zero_ttl_is_not_cached(dns_server: DnsServer) -> None:
    dns_server.set("volatile.example", "A", ["192.0.2.4"], ttl=0)
    r = resolver(dns_server)

    async def scenario() -> None:
        await r.query("volatile.example", "A")
        await r.query("volatile.example", "A")

    run(scenario())
    assert dns_server.queries("volatile.example", "A") == 2


def test_cache_is_bounded_and_evicts_the_least_recently_used(dns_server: DnsServer) -> None:
    for i in range(5):
        dns_server.set(f"n{i}.example", "A", [f"192.0.2.{i}"])
    r = resolver(dns_server, cache_size=3)

    async def scenario() -> None:
        for i in range(3):
            await r.query(f"n{i}.example", "A")
        await r.query("n0.example", "A")      # n0 used again: n1 is now the oldest
        for i in range(3, 5):
            await r.query(f"n{i}.example", "A")
        await r.query("n0.example", "A")      # still cached
        await r.query("n1.example", "A")      # evicted: asked again

    run(scenario())
    assert r.stats().cache_entries == 3
    assert dns_server.queries("n0.example", "A") == 1
    assert dns_server.queries("n1.example", "A") == 2


# -- in-flight sharing and stage deadlines ---------------------------------------

def test_concurrent_callers_share_one_query(dns_server: DnsServer) -> None:
    dns_server.set("popular.example", "A", ["192.0.2.5"])
    dns_server.delay("popular.example", 0.2)
    r = resolver(dns_server)

    async def scenario() -> list[Answer]:
        return await asyncio.gather(*(r.query("popular.example", "A") for _ in range(50)))

    answers = run(scenario())
    assert {a.values for a in answers} == {("192.0.2.5",)}
    assert dns_server.queries("popular.example", "A") == 1
    assert r.stats().inflight_joins == 49


def test_a_caller_giving_up_does_not_cancel_the_shared_query(dns_server: DnsServer) -> None:
    dns_server.set("late.example", "A", ["192.0.2.6"])
    dns_server.delay("late.example", 0.3)
    r = resolver(dns_server)

    async def scenario() -> tuple[Answer, Answer]:
        patient = asyncio.ensure_future(r.query("late.example", "A"))
        hasty = await gather_within(0.05, a=r.query("late.example", "A"))
        return hasty["a"], await patient

    hasty, patient = run(scenario())
    assert (hasty.status, hasty.reason) == (UNKNOWN, "deadline")
    assert patient.values == ("192.0.2.6",)
    assert dns_server.queries("late.example", "A") == 1


def test_stage_budget_returns_at_the_deadline(dns_server: DnsServer) -> None:
    dns_server.set("fast.example", "A", ["192.0.2.8"])
    dns_server.silent("silent.example")
    r = resolver(dns_server, timeout=5.0)

    async def scenario() -> dict[str, Answer]:
        return await r.gather_within(0.3, fast=r.query("fast.example", "A"),
                                     slow=r.query("silent.example", "A"))

    start = time.monotonic()
    got = run(scenario())
    elapsed = time.monotonic() - start
    assert got["fast"].values == ("192.0.2.8",)
    assert (got["slow"].status, got["slow"].reason) == (UNKNOWN, "deadline")
    assert 0.28 <= elapsed < 0.6


def test_a_stage_costs_its_slowest_lookup_not_the_sum(dns_server: DnsServer) -> None:
    for name in ("one", "two", "three"):
        dns_server.set(f"{name}.example", "A", ["192.0.2.10"])
        dns_server.delay(f"{name}.example", 0.2)
    r = resolver(dns_server)

    async def scenario() -> dict[str, Answer]:
        return await gather_within(5.0, **{n: r.query(f"{n}.example", "A") for n in ("one", "two", "three")})

    start = time.monotonic()
    got = run(scenario())
    elapsed = time.monotonic() - start
    assert all(a.status == OK for a in got.values())
    assert 0.2 <= elapsed < 0.45  # the sum would be 0.6


def test_stats_count_queries_hits_and_joins(dns_server: DnsServer) -> None:
    dns_server.set("s.example", "A", ["192.0.2.11"])
    r = resolver(dns_server)

    async def scenario() -> None:
        await asyncio.gather(r.query("s.example", "A"), r.query("s.example", "A"))
        await r.query("s.example", "A")

    run(scenario())
    stats = r.stats().as_dict()
    assert stats["lookups"] == 3
    assert stats["queries"] == 1
    assert stats["inflight_joins"] == 1
    assert stats["cache_hits"] == 1


# -- settings --------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    pytest.param("192.0.2.53", ("192.0.2.53", 53), id="a bare IPv4 address uses port 53"),
    pytest.param("127.0.0.1:5353", ("127.0.0.1", 5353), id="IPv4 with a port"),
    pytest.param("::1", ("::1", 53), id="a bare IPv6 address uses port 53"),
    pytest.param("[2001:db8::53]:5300", ("2001:db8::53", 5300), id="IPv6 in brackets with a port"),
])
def test_parse_server(text: str, expected: tuple[str, int]) -> None:
    assert parse_server(text) == expected


@pytest.mark.parametrize("text", [
    pytest.param("dns.example", id="a host name is refused: resolving the resolver is circular"),
    pytest.param("127.0.0.1:0", id="port zero is refused"),
    pytest.param("[::1", id="an unclosed bracket is refused"),
])
def test_parse_server_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_server(text)


def test_settings_defaults() -> None:
    s = DnsSettings.from_mapping({}, "dns")
    assert (s.servers, s.timeout, s.stage_budget, s.cache_size) == ((), 5.0, 10.0, 10_000)


def test_settings_parse_durations_and_servers() -> None:
    s = DnsSettings.from_mapping({"servers": ["127.0.0.1:5353", "::1"], "timeout": "2s",
                                  "stage_budget": "8s", "cache_size": 100}, "dns")
    assert (s.servers, s.timeout, s.stage_budget, s.cache_size) == (("127.0.0.1:5353", "::1"), 2.0, 8.0, 100)


@pytest.mark.parametrize("table, key", [
    pytest.param({"servers": ["dns.example"]}, "dns.servers", id="a server that is not an address names dns.servers"),
    pytest.param({"servers": 53}, "dns.servers", id="servers that are not a list name dns.servers"),
    pytest.param({"timeout": "0s"}, "dns.timeout", id="a zero timeout names dns.timeout"),
    pytest.param({"timeout": "soon"}, "dns.timeout", id="a timeout that is not a duration names dns.timeout"),
    pytest.param({"stage_budget": "10m"}, "dns.stage_budget", id="a budget beyond RFC 5321's 5 minutes names dns.stage_budget"),
    pytest.param({"cache_size": -1}, "dns.cache_size", id="a negative cache size names dns.cache_size"),
    pytest.param({"cache": 5}, "dns.cache", id="an unknown key is named"),
])
def test_settings_errors_name_the_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        DnsSettings.from_mapping(table, "dns")
    assert err.value.key == key


def test_resolver_from_settings_uses_the_servers(dns_server: DnsServer) -> None:
    dns_server.set("a.example", "A", ["192.0.2.1"])
    settings = DnsSettings.from_mapping({"servers": [dns_server.address], "timeout": 1}, "dns")
    r = Resolver.from_settings(settings)
    assert run(r.query("a.example", "A")).values == ("192.0.2.1",)


@pytest.mark.parametrize("count", [1, 2], ids=["one awaitable (awaited in place)", "several (tasks)"])
def test_within_gives_each_key_its_result_or_the_fallback(count: int) -> None:
    # the budget cuts what is slow, a raising awaitable is the fallback (and
    # logged), never an exception out of the stage
    import asyncio

    from smtpguard.adapters.dns import within

    async def value(v: str) -> str:
        return v

    async def never() -> str:
        await asyncio.Event().wait()
        return "late"

    async def broken() -> str:
        raise RuntimeError("a bug in a source")

    async def run(make: Any) -> dict[str, str]:
        keys = [f"k{i}" for i in range(count)]
        return await within(0.05, {k: make() for k in keys}, lambda k: f"fallback {k}")

    assert asyncio.run(run(lambda: value("ok"))) == {f"k{i}": "ok" for i in range(count)}
    assert asyncio.run(run(never)) == {f"k{i}": f"fallback k{i}" for i in range(count)}
    assert asyncio.run(run(broken)) == {f"k{i}": f"fallback k{i}" for i in range(count)}


def test_within_cuts_each_key_at_its_own_deadline() -> None:
    # The stage loop gives sources that keep the budget themselves a longer
    # bound than the rest (issue 16): the short key is cut at its deadline
    # while the long one goes on, and only finishes because the short was cut.
    import asyncio

    from smtpguard.adapters.dns import within

    async def run() -> dict[str, str]:
        cut = asyncio.Event()

        async def short() -> str:
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                cut.set()
                raise
            return "never"

        async def long() -> str:
            await cut.wait()
            return "finished after the short one was cut"

        async def stuck() -> str:
            await asyncio.Event().wait()
            return "never"

        got = await within({"short": 0.05, "long": 30.0, "stuck": 0.1},
                           {"short": short(), "long": long(), "stuck": stuck()}, lambda k: f"cut {k}")
        return got

    assert asyncio.run(asyncio.wait_for(run(), 10)) == {
        "short": "cut short", "long": "finished after the short one was cut", "stuck": "cut stuck"}


def test_addresses_from_the_cache_are_the_same_answer_without_queries(dns_server: DnsServer) -> None:
    # the cached fast path of addresses() (issue 15) merges as the network path does
    dns_server.set("both.example", "A", ["192.0.2.1"])
    dns_server.set("both.example", "AAAA", ["2001:db8::1"])
    dns_server.set("v4only.example", "A", ["192.0.2.2"])
    r = resolver(dns_server)

    async def twice(name: str) -> tuple[Answer, Answer]:
        return await r.addresses(name), await r.addresses(name)

    for name in ("both.example", "v4only.example", "missing.example"):
        first, second = run(twice(name))
        asked = dns_server.queries(name, "A") + dns_server.queries(name, "AAAA")
        assert (second.status, sorted(second.values), second.partial) == \
               (first.status, sorted(first.values), first.partial), name
        assert asked == 2, (name, asked)     # the second call asked nothing
