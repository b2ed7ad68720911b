"""DNS block/allow lists: the pure part by tables, the source against a loopback DNS server."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from smtpguard.adapters.dns import Resolver
from smtpguard.core.dnsbl import (
    CodeRange,
    DnsblFact,
    DnsblList,
    ZoneAnswer,
    evaluate,
    parse_code,
    parse_zone,
    query_name,
)
from smtpguard.core.facts import NONE, OK, UNKNOWN
from smtpguard.errors import ConfigError
from smtpguard.sources.dnsbl import DnsblSettings, gather, parse_lists
from smtpguard.sources.registry import FACTS
from tests.fixtures_dns import DnsServer

# -- query names ---------------------------------------------------------------


@pytest.mark.parametrize("ip, expected", [
    pytest.param("192.0.2.99", "99.2.0.192.bl.test", id="IPv4 octets are reversed"),
    pytest.param("::ffff:192.0.2.99", "99.2.0.192.bl.test", id="an IPv4-mapped IPv6 client is asked as IPv4"),
    pytest.param("2001:db8::1",
                 "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.test",
                 id="IPv6 is asked as 32 reversed nibbles"),
    pytest.param("2001:DB8:0:0:0:0:0:A",
                 "a.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.bl.test",
                 id="IPv6 nibbles are lower case whatever the input"),
])
def test_query_name(ip: str, expected: str) -> None:
    assert query_name(ip, "bl.test") == expected


def test_query_name_refuses_what_is_not_an_address() -> None:
    with pytest.raises(ValueError):
        query_name("mail.example", "bl.test")


# -- configuration text ----------------------------------------------------------

def _ip(text: str) -> int:
    a, b, c, d = (int(x) for x in text.split("."))
    return (a << 24) | (b << 16) | (c << 8) | d


@pytest.mark.parametrize("text, low, high", [
    pytest.param("127.0.0.2", "127.0.0.2", "127.0.0.2", id="a single code"),
    pytest.param("127.0.0.2-127.0.0.11", "127.0.0.2", "127.0.0.11", id="a range of codes"),
    pytest.param("127.0.10.0/24", "127.0.10.0", "127.0.10.255", id="a network of codes"),
])
def test_parse_code(text: str, low: str, high: str) -> None:
    assert parse_code(text) == CodeRange(_ip(low), _ip(high))


@pytest.mark.parametrize("text", [
    pytest.param("127.0.0.11-127.0.0.2", id="a range that ends before it starts"),
    pytest.param("10.0.0.2", id="a code outside 127.0.0.0/8"),
    pytest.param("127.0.0.0/7", id="a network reaching outside 127.0.0.0/8"),
    pytest.param("listed", id="text that is no code"),
])
def test_parse_code_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_code(text)


@pytest.mark.parametrize("text, expected", [
    pytest.param("zen.spamhaus.org", "zen.spamhaus.org", id="a plain zone"),
    pytest.param("ZEN.Spamhaus.ORG.", "zen.spamhaus.org", id="case and the final dot are normalised"),
])
def test_parse_zone(text: str, expected: str) -> None:
    assert parse_zone(text) == expected


@pytest.mark.parametrize("text", [
    pytest.param("", id="an empty zone"),
    pytest.param("bad..zone", id="an empty label"),
    pytest.param("spaced zone.org", id="a space in a label"),
    pytest.param("a." * 100 + "org", id="a zone too long to fit an IPv6 query"),
])
def test_parse_zone_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_zone(text)


# -- scoring: what each answer means ---------------------------------------------

ZEN = "zen.spamhaus.org"
DNSWL = "list.dnswl.org"
COP = "bl.spamcop.net"
SBL = DnsblList(ZEN, 3, (parse_code("127.0.0.2-127.0.0.3"),))
XBL = DnsblList(ZEN, 2, (parse_code("127.0.0.4-127.0.0.7"),))
PBL = DnsblList(ZEN, 1, (parse_code("127.0.0.10-127.0.0.11"),))
SPAMCOP = DnsblList(COP, 2)                       # default codes
WL = DnsblList(DNSWL, -2, (parse_code("127.0.0.0/16"),))
DQS = DnsblList("secretkey.zen.dq.spamhaus.net", 3, (parse_code("127.0.0.2"),), name="spamhaus-dqs")


def listed(*codes: str) -> ZoneAnswer:
    return ZoneAnswer(OK, codes)


NOT_LISTED = ZoneAnswer(NONE, reason="nxdomain")
TIMEOUT = ZoneAnswer(UNKNOWN, reason="timeout")

SCORING = [
    pytest.param([SBL, SPAMCOP], {ZEN: NOT_LISTED, COP: NOT_LISTED},
                 NONE, 0, (), "", 0, id="an address on no list is none with score 0"),
    pytest.param([SBL, SPAMCOP], {ZEN: listed("127.0.0.2"), COP: NOT_LISTED},
                 OK, 3, ("zen.spamhaus.org=127.0.0.2",), "listed by zen.spamhaus.org (127.0.0.2)", 0,
                 id="a configured code scores the entry's weight"),
    pytest.param([SBL, XBL, PBL], {ZEN: listed("127.0.0.2", "127.0.0.3", "127.0.0.4")},
                 OK, 5, ("zen.spamhaus.org=127.0.0.2", "zen.spamhaus.org=127.0.0.3", "zen.spamhaus.org=127.0.0.4"),
                 "listed by zen.spamhaus.org (127.0.0.2, 127.0.0.3), zen.spamhaus.org (127.0.0.4)", 0,
                 id="two codes of one entry score it once, another entry's code adds its weight"),
    pytest.param([SBL], {ZEN: listed("127.0.0.20")},
                 NONE, 0, (), "", 1, id="a code outside the configured ones is logged, never a listing"),
    pytest.param([DnsblList(ZEN, 3, (parse_code("127.0.0.0/8"),))], {ZEN: listed("127.255.255.254")},
                 UNKNOWN, "unknown", (), "", 1,
                 id="Spamhaus's public resolver answer is an error even inside the configured codes"),
    pytest.param([SBL, SPAMCOP], {ZEN: listed("127.255.255.255"), COP: NOT_LISTED},
                 UNKNOWN, 0, (), "", 1, id="an over-quota answer fails that list and leaves the others"),
    pytest.param([SPAMCOP], {COP: listed("198.51.100.7")},
                 UNKNOWN, "unknown", (), "", 1, id="an answer outside 127/8 is an error, not a listing"),
    pytest.param([SPAMCOP], {COP: listed("127.0.0.2")},
                 OK, 2, ("bl.spamcop.net=127.0.0.2",), "listed by bl.spamcop.net (127.0.0.2)", 0,
                 id="default codes take a 127/8 listing"),
    pytest.param([SPAMCOP], {COP: listed("127.0.0.1")},
                 UNKNOWN, "unknown", (), "", 1,
                 id="default codes do not take 127.0.0.1: a refusal fails the list (issue 19)"),
    pytest.param([SBL, WL], {ZEN: listed("127.0.0.2"), DNSWL: listed("127.0.10.2")},
                 OK, 1, ("list.dnswl.org=127.0.10.2", "zen.spamhaus.org=127.0.0.2"),
                 "listed by zen.spamhaus.org (127.0.0.2)", 0,
                 id="an allowlist hit lowers the score and is not named in the reply"),
    pytest.param([SBL, SPAMCOP], {ZEN: listed("127.0.0.2"), COP: TIMEOUT},
                 UNKNOWN, 3, ("zen.spamhaus.org=127.0.0.2",), "listed by zen.spamhaus.org (127.0.0.2)", 1,
                 id="a list timing out leaves the others' score and makes the status unknown"),
    pytest.param([SBL, SPAMCOP], {ZEN: TIMEOUT, COP: TIMEOUT},
                 UNKNOWN, "unknown", (), "", 2, id="every list failing makes the score unknown"),
    pytest.param([], {}, NONE, 0, (), "", 0, id="no lists configured is none"),
    pytest.param([DQS], {DQS.zone: listed("127.0.0.2")},
                 OK, 3, ("spamhaus-dqs=127.0.0.2",), "listed by spamhaus-dqs (127.0.0.2)", 0,
                 id="a list's name replaces its zone in hits and reply, keeping a DQS key private"),
]


@pytest.mark.parametrize("lists, answers, status, score, hits, text, n_errors", SCORING)
def test_evaluate(lists: list[DnsblList], answers: dict[str, ZoneAnswer], status: str, score: Any,
                  hits: tuple[str, ...], text: str, n_errors: int) -> None:
    fact = evaluate(lists, answers)
    assert fact.status == status
    state = {OK: "listed", NONE: "none", UNKNOWN: "unknown"}[status]
    assert fact.as_facts() == {"dnsbl": state, "dnsbl_score": score, "dnsbl_hits": hits}
    assert fact.text == text
    assert len(fact.errors) == n_errors
    assert "secretkey" not in " ".join(fact.errors + fact.hits + (fact.text,))


def test_fact_names_are_in_the_fact_table() -> None:
    assert set(DnsblFact(NONE).as_facts()) <= set(FACTS)


def test_error_lines_say_what_the_code_means() -> None:
    fact = evaluate([SBL], {ZEN: listed("127.255.255.254")})
    assert fact.errors == ("zen.spamhaus.org: answer 127.255.255.254: query through a public or open resolver refused (Spamhaus)",)


# -- the source against a DNS server on loopback ----------------------------------

CLIENT = "192.0.2.99"
CLIENT6 = "2001:db8::99"


def run_gather(server: DnsServer, lists: list[DnsblList], ip: str = CLIENT, budget: float = 2.0) -> DnsblFact:
    async def go() -> DnsblFact:
        return await gather(ip, lists, Resolver([server.address], timeout=5.0), budget)
    return asyncio.run(go())


def test_several_codes_from_one_zone(dns_server: DnsServer) -> None:
    dns_server.set(query_name(CLIENT, ZEN), "A", ["127.0.0.4", "127.0.0.10"])
    fact = run_gather(dns_server, [SBL, XBL, PBL, SPAMCOP])
    assert (fact.status, fact.score) == (OK, 3)
    assert fact.hits == ("zen.spamhaus.org=127.0.0.4", "zen.spamhaus.org=127.0.0.10")
    assert fact.text == "listed by zen.spamhaus.org (127.0.0.4), zen.spamhaus.org (127.0.0.10)"
    # Three entries share one zone: one query. Spamcop's name was not served: NXDOMAIN.
    assert dns_server.queries(query_name(CLIENT, ZEN), "A") == 1
    assert dns_server.queries(query_name(CLIENT, COP), "A") == 1


def test_an_error_code_from_the_list_is_not_a_listing(dns_server: DnsServer) -> None:
    dns_server.set(f"*.{ZEN}", "A", ["127.255.255.254"])
    fact = run_gather(dns_server, [SBL])
    assert (fact.status, fact.as_facts()["dnsbl_score"], fact.hits) == (UNKNOWN, "unknown", ())
    assert "public or open resolver" in fact.errors[0]


def test_ipv6_client_is_asked_in_nibble_form(dns_server: DnsServer) -> None:
    dns_server.set(query_name(CLIENT6, COP), "A", ["127.0.0.2"])
    fact = run_gather(dns_server, [SPAMCOP], ip=CLIENT6)
    assert fact.hits == ("bl.spamcop.net=127.0.0.2",)
    assert dns_server.queries("2.0.0.127." + COP, "A") == 0
    assert dns_server.queries(query_name(CLIENT6, COP), "A") == 1


def test_allowlist_weight_is_negative(dns_server: DnsServer) -> None:
    dns_server.set(query_name(CLIENT, DNSWL), "A", ["127.0.15.3"])
    dns_server.set(query_name(CLIENT, COP), "A", ["127.0.0.2"])
    fact = run_gather(dns_server, [SPAMCOP, WL])
    assert fact.score == 0
    assert fact.text == "listed by bl.spamcop.net (127.0.0.2)"


def test_a_silent_list_costs_the_budget_and_the_others_still_count(dns_server: DnsServer) -> None:
    dns_server.set(query_name(CLIENT, ZEN), "A", ["127.0.0.2"])
    dns_server.silent(query_name(CLIENT, COP))
    start = time.monotonic()
    fact = run_gather(dns_server, [SBL, SPAMCOP], budget=0.3)
    elapsed = time.monotonic() - start
    assert (fact.status, fact.score, fact.failed) == (UNKNOWN, 3, 1)
    assert fact.errors == ("bl.spamcop.net: deadline",)
    assert 0.28 <= elapsed < 0.6


def test_unreadable_client_address_is_unknown(dns_server: DnsServer) -> None:
    fact = run_gather(dns_server, [SBL], ip="not-an-address")
    assert fact.status == UNKNOWN
    assert dns_server.total_queries() == 0


# -- [[dnsbl]] settings -----------------------------------------------------------

def test_parse_lists() -> None:
    lists = parse_lists([
        {"zone": "zen.spamhaus.org", "weight": 3, "codes": ["127.0.0.2-127.0.0.11"]},
        {"zone": "list.dnswl.org", "weight": -2, "codes": "127.0.0.0/16", "name": "dnswl"},
        {"zone": "bl.spamcop.net"},
    ])
    assert lists == (
        DnsblList("zen.spamhaus.org", 3, (CodeRange(_ip("127.0.0.2"), _ip("127.0.0.11")),)),
        DnsblList("list.dnswl.org", -2, (CodeRange(_ip("127.0.0.0"), _ip("127.0.255.255")),), "dnswl"),
        DnsblList("bl.spamcop.net", 1, ()),
    )
    assert DnsblSettings.from_list(None).lists == ()


@pytest.mark.parametrize("value, key", [
    pytest.param({"zone": "x.test"}, "dnsbl", id="a single table instead of [[dnsbl]] names dnsbl"),
    pytest.param(["x.test"], "dnsbl[1]", id="an entry that is not a table names its index"),
    pytest.param([{"weight": 2}], "dnsbl[1].zone", id="a missing zone names dnsbl[1].zone"),
    pytest.param([{"zone": "ok.test"}, {"zone": "bad..test"}], "dnsbl[2].zone", id="the second entry's bad zone names dnsbl[2].zone"),
    pytest.param([{"zone": "x.test", "weight": "3"}], "dnsbl[1].weight", id="a weight in quotes names the weight"),
    pytest.param([{"zone": "x.test", "weight": 2.5}], "dnsbl[1].weight", id="a fractional weight names the weight"),
    pytest.param([{"zone": "x.test", "codes": ["10.0.0.2"]}], "dnsbl[1].codes", id="a code outside 127/8 names the codes"),
    pytest.param([{"zone": "x.test", "codes": [2]}], "dnsbl[1].codes", id="a code that is not text names the codes"),
    pytest.param([{"zone": "x.test", "name": "has space"}], "dnsbl[1].name", id="a name with a space names the name"),
    pytest.param([{"zone": "x.test", "score": 3}], "dnsbl[1].score", id="an unknown key is named"),
])
def test_parse_lists_errors_name_the_key(value: Any, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_lists(value, "dnsbl")
    assert err.value.key == key
