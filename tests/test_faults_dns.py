"""Issue 19, items 1-3: DNS answers a client controls, against the real
loopback DNS server (tests/fixtures_dns.py) with hostile answers.

1. answers are bounded before they are parsed or cached, the cache is bounded
   in bytes, and each session has a budget of lookups;
2. DNS error lines are rate-limited, carry the session id, and keep the
   event name apart from the data in JSON;
3. a lookup that failed in the client's address family makes `rdns` and
   `helo_matches_ip` `unknown`, never `unconfirmed`/`false`.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from typing import Any

import dns.message
import pytest

from smtpguard.adapters.dns import (
    DEFAULT_MAX_ANSWER_BYTES,
    Answer,
    DnsSettings,
    LookupBudget,
    RateLimitedLog,
    Resolver,
)
from smtpguard.core.facts import OK, UNKNOWN
from smtpguard.core.helo import identity
from smtpguard.errors import ConfigError
from smtpguard.observe import log as obslog
from smtpguard.sources import helo as helo_source
from smtpguard.sources import rdns as rdns_source
from tests.fixtures_dns import DnsServer, ptr_name

CLIENT4 = "192.0.2.7"
CLIENT6 = "2001:db8:7::25"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def resolver(server: DnsServer, **kw: Any) -> Resolver:
    kw.setdefault("timeout", 2.0)
    return Resolver([server.address], **kw)


@pytest.fixture
def parsed_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every DNS message dnspython parses (a spy on the real
    parser, which still runs): proof that an answer was refused unparsed."""
    sizes: list[int] = []
    real = dns.message.from_wire

    def spy(wire: bytes, *args: Any, **kwargs: Any) -> Any:
        sizes.append(len(wire))
        return real(wire, *args, **kwargs)

    monkeypatch.setattr(dns.message, "from_wire", spy)
    return sizes


# -- 1. bounded answers ----------------------------------------------------------

def test_a_65_kb_answer_over_tcp_is_refused_before_it_is_parsed(dns_server: DnsServer,
                                                                 parsed_sizes: list[int]) -> None:
    dns_server.huge("big.example", "A", 4090)  # TC over UDP, then about 65 KB over TCP
    r = resolver(dns_server)
    got = run(r.query("big.example", "A"))
    assert (got.status, got.reason) == (UNKNOWN, "oversized")
    assert dns_server.queries("big.example", "A", "udp") == 1
    assert dns_server.queries("big.example", "A", "tcp") == 1  # the truncation was followed
    assert parsed_sizes and max(parsed_sizes) <= DEFAULT_MAX_ANSWER_BYTES
    assert r.stats().cache_entries == 0  # nothing of it cached


def test_a_ptr_rrset_of_2000_names_is_refused_unparsed(dns_server: DnsServer, parsed_sizes: list[int]) -> None:
    dns_server.huge(ptr_name(CLIENT4), "PTR", 2000)
    fact = run(rdns_source.gather(CLIENT4, resolver(dns_server)))
    assert fact.rdns == "unknown" and fact.error == "oversized"
    assert max(parsed_sizes) <= DEFAULT_MAX_ANSWER_BYTES


def test_an_answer_within_the_bytes_keeps_32_addresses_and_says_it_cut(dns_server: DnsServer) -> None:
    dns_server.huge("many.example", "A", 200)  # about 3.2 KB: under the byte bound
    got = run(resolver(dns_server).query("many.example", "A"))
    assert got.status == OK and len(got.values) == 32 and got.partial == ("A",)


def test_the_byte_bound_is_a_setting(dns_server: DnsServer) -> None:
    dns_server.huge("many.example", "A", 100)  # about 1.6 KB
    assert run(resolver(dns_server, max_answer_bytes=1024).query("many.example", "A")).reason == "oversized"
    assert run(resolver(dns_server, max_answer_bytes=2048).query("many.example", "A")).status == OK
    settings = DnsSettings.from_mapping({"max_answer_bytes": 2048, "cache_bytes": 1 << 20,
                                         "session_lookups": 20})
    assert (settings.max_answer_bytes, settings.cache_bytes, settings.session_lookups) == (2048, 1 << 20, 20)


@pytest.mark.parametrize("key, value", [
    pytest.param("max_answer_bytes", 100, id="an answer bound under 512 bytes"),
    pytest.param("max_answer_bytes", 70000, id="an answer bound over the TCP maximum"),
    pytest.param("cache_bytes", -1, id="a negative cache size"),
    pytest.param("session_lookups", 0, id="a session budget of nothing"),
    pytest.param("session_lookups", "50", id="a budget given as text"),
])
def test_bad_bounds_are_config_errors_naming_the_key(key: str, value: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        DnsSettings.from_mapping({key: value})
    assert caught.value.key == f"dns.{key}"


def test_the_cache_is_bounded_in_bytes(dns_server: DnsServer) -> None:
    names = [f"n{i}.example" for i in range(60)]
    for name in names:
        dns_server.huge(name, "A", 30)  # 30 addresses each: about 2.5 KB of cache per entry
    r = resolver(dns_server, cache_bytes=20_000)

    async def main() -> None:
        for name in names:
            await r.query(name, "A")

    run(main())
    stats = r.stats()
    assert 0 < stats.cache_bytes <= 20_000
    assert stats.cache_entries < len(names)
    # the most recent answer is the one kept
    dns_server.reset_counts()
    run(r.query(names[-1], "A"))
    assert dns_server.queries(names[-1], "A") == 0


def test_a_session_budget_ends_in_unknown_without_a_query(dns_server: DnsServer) -> None:
    for i in range(5):
        dns_server.set(f"h{i}.example", "A", ["192.0.2.1"])
    r = resolver(dns_server)
    budget = LookupBudget(3)
    view = r.for_session(budget, "S1")

    async def main() -> list[Answer]:
        out = [await view.query(f"h{i}.example", "A") for i in range(5)]
        out.append(await view.query("h0.example", "A"))  # cached: costs nothing, still answered
        return out

    got = run(main())
    assert [a.status for a in got] == [OK, OK, OK, UNKNOWN, UNKNOWN, OK]
    assert got[3].reason == "budget"
    assert dns_server.queries("h3.example", "A") == 0 and dns_server.queries("h4.example", "A") == 0
    assert budget.spent == 3 and r.stats().over_budget == 2


def test_ehlo_names_spend_the_same_budget_and_end_unknown_never_false(dns_server: DnsServer) -> None:
    r = resolver(dns_server)
    view = r.for_session(LookupBudget(4), "S2")
    us = identity(["mx.ours.test"], [], [])

    async def main() -> list[Any]:
        out = []
        for i in range(4):
            dns_server.set(f"e{i}.client.test", "A", ["198.51.100.1"])
            out.append(await helo_source.gather(f"e{i}.client.test", CLIENT4, None, view, us=us))
        return out

    facts = run(main())
    assert [f.matches_ip for f in facts] == [False, False, UNKNOWN, UNKNOWN]  # 2 lookups (A, AAAA) per name
    assert facts[3].reason == "budget"


# -- 3. one family fails -----------------------------------------------------------

@pytest.mark.parametrize("client, failing, answering, value", [
    pytest.param(CLIENT4, "A", "AAAA", "2001:db8::99", id="IPv4 client: A fails, AAAA answers"),
    pytest.param(CLIENT6, "AAAA", "A", "198.51.100.99", id="IPv6 client: AAAA fails, A answers"),
])
def test_a_servfail_in_the_clients_family_makes_rdns_unknown(dns_server: DnsServer, client: str,
                                                            failing: str, answering: str, value: str) -> None:
    dns_server.set_ptr(client, ["mail.dual.t."])
    dns_server.set("mail.dual.t", answering, [value])
    dns_server.servfail("mail.dual.t", failing)
    fact = run(rdns_source.gather(client, resolver(dns_server)))
    assert fact.rdns == "unknown"          # was `unconfirmed`: a Windows SYN then got 550 [OS-RDNS]
    assert fact.as_facts()["rdns"] == "unknown"


def test_a_servfail_in_the_other_family_cannot_change_the_answer(dns_server: DnsServer) -> None:
    dns_server.set_ptr(CLIENT4, ["mail.dual.t."])
    dns_server.set("mail.dual.t", "A", ["198.51.100.99"])
    dns_server.servfail("mail.dual.t", "AAAA")
    assert run(rdns_source.gather(CLIENT4, resolver(dns_server))).rdns == "unconfirmed"


def test_a_servfail_in_one_family_still_confirms_when_the_other_holds_the_address(dns_server: DnsServer) -> None:
    dns_server.set_ptr(CLIENT4, ["mail.dual.t."])
    dns_server.set("mail.dual.t", "A", [CLIENT4])
    dns_server.servfail("mail.dual.t", "AAAA")
    assert run(rdns_source.gather(CLIENT4, resolver(dns_server))).rdns == "confirmed"


def test_a_cut_address_set_without_the_client_is_unknown(dns_server: DnsServer) -> None:
    dns_server.set_ptr(CLIENT4, ["pool.big.t."])
    dns_server.huge("pool.big.t", "A", 100)  # 32 kept; the client might be among the rest
    assert run(rdns_source.gather(CLIENT4, resolver(dns_server))).rdns == "unknown"


def test_helo_matches_ip_is_unknown_when_the_clients_family_failed(dns_server: DnsServer) -> None:
    dns_server.set("mail.dual.t", "AAAA", ["2001:db8::99"])
    dns_server.servfail("mail.dual.t", "A")
    us = identity(["mx.ours.test"], [], [])
    fact = run(helo_source.gather("mail.dual.t", CLIENT4, None, resolver(dns_server), us=us))
    assert fact.as_facts()["helo_resolves"] is True
    assert fact.as_facts()["helo_matches_ip"] == UNKNOWN   # was false


# -- 2. error lines ----------------------------------------------------------------

@pytest.fixture
def json_log() -> Any:
    stream = io.StringIO()
    obslog.setup("json", "info", stream)
    yield stream
    obslog.setup("text", "warning")


def test_yxdomain_floods_give_one_json_line_a_minute_with_the_session(dns_server: DnsServer,
                                                                     json_log: io.StringIO) -> None:
    dns_server.yxdomain("flood.t")
    dns_server.set("*.flood.t", "A", ["192.0.2.1"])
    dns_server.yxdomain("*.flood.t")
    now = [1000.0]
    r = resolver(dns_server, clock=lambda: now[0])
    view = r.for_session(LookupBudget(100), "SESS42")

    async def burst(start: int) -> None:
        for i in range(start, start + 20):
            await view.query(f"x{i}.flood.t", "A")

    run(burst(0))
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    errors = [o for o in lines if o["event"] == "dns.error"]
    assert len(errors) == 1
    first = errors[0]
    assert first["session"] == "SESS42" and first["error"] == "YXDOMAIN" and first["type"] == "A"
    assert first["qname"].endswith(".flood.t") and "suppressed" not in first
    now[0] += 61  # a minute later: one more line, counting the 19 held back
    run(burst(20))
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    errors = [o for o in lines if o["event"] == "dns.error"]
    assert len(errors) == 2 and errors[1]["suppressed"] == 19


def test_the_rate_limit_is_per_key() -> None:
    now = [0.0]
    limiter = RateLimitedLog(60.0, clock=lambda: now[0])
    assert limiter.event("dnsbl.error", "dnsbl a") and limiter.event("dnsbl.error", "dnsbl b")
    assert not limiter.event("dnsbl.error", "dnsbl a")
    now[0] = 59.9
    assert not limiter.event("dnsbl.error", "dnsbl a")
    now[0] = 60.0
    assert limiter.event("dnsbl.error", "dnsbl a")


def test_a_hostile_name_is_escaped_in_the_text_log(dns_server: DnsServer) -> None:
    stream = io.StringIO()
    obslog.setup("text", "info", stream)
    try:
        dns_server.yxdomain("*.odd.t")
        run(resolver(dns_server).for_session(LookupBudget(5), "S9").query('a\\"b.odd.t', "A"))
    finally:
        obslog.setup("text", "warning")
    line = next(x for x in stream.getvalue().splitlines() if " dns.error " in x)
    assert "session=S9" in line and "\n" not in line and logging.getLevelName(logging.INFO).lower() in line


# -- the budget in a live session -----------------------------------------------------

@pytest.mark.parametrize("lookups, refused", [
    pytest.param(3, False, id="budget spent by the PTR: the EHLO name is unknown and mail goes through"),
    pytest.param(50, True, id="within the budget: the EHLO name is asked and the rule refuses"),
])
def test_a_live_session_over_its_budget_gets_unknown_helo_facts_and_goes_on(
        dns_server: DnsServer, recorder: Any, guard_factory: Any, lookups: int, refused: bool) -> None:
    """smtpguard in front of a recorder: the PTR and its forward lookups (A,
    AAAA) spend a budget of 3, so the EHLO name is never asked:
    helo_matches_ip is `unknown`, a rule refusing `false` does not fire."""
    import smtplib

    dns_server.set_ptr("127.0.0.1", ["client.good.t."])
    dns_server.set("client.good.t", "A", ["127.0.0.1"])
    dns_server.set("helo.hostile.t", "A", ["198.51.100.1"])  # `false` when asked
    # a connect rule reads rdns, so the PTR and its forward lookups run first
    doc = {"dns": {"session_lookups": lookups},
           "rule": [{"name": "no-rdns", "stage": "connect", "when": {"rdns": "none"}, "action": "reject"},
                    {"name": "helo-mismatch", "stage": "helo", "when": {"helo_matches_ip": False},
                     "action": "reject", "reason": "HELO"}]}
    g = guard_factory(doc, upstream=recorder.address)
    with smtplib.SMTP(g.host, g.port, timeout=10, local_hostname="helo.hostile.t") as s:
        assert s.ehlo()[0] == 250
        assert s.mail("a@good.t")[0] == 250
        code, _ = s.rcpt("b@example.test")
    assert (code == 550) is refused
    assert (dns_server.queries("helo.hostile.t", "A") == 0) is not refused
