"""HELO facts: the pure syntax table (core/helo.py), then the source
(sources/helo.py) against a real DNS server on loopback."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from smtpguard.adapters.dns import Resolver
from smtpguard.core.facts import NONE, OK, UNKNOWN
from smtpguard.core.helo import (
    BARE_IP,
    EMPTY,
    FQDN,
    INVALID,
    LITERAL,
    MAX_HELO_LENGTH,
    check,
    identity,
    is_fqdn,
)
from smtpguard.core.rdns import RDNS_CONFIRMED, RDNS_NONE, RDNS_UNCONFIRMED, RDNS_UNKNOWN, RdnsFact
from smtpguard.sources.helo import gather
from tests.fixtures_dns import DnsServer, ptr_name

CLIENT = "192.0.2.10"
US = identity(names=["mx.our.example"], domains=["our.example", ".sub.our.example"],
              ips=["203.0.113.5", "2001:db8:ff::/64"])

# -- syntax: kind and validity (RFC 5321 §4.1.1.1, §4.1.3, §2.3.5) ----------------

SYNTAX = [
    ("a plain FQDN is valid", "mail.example.com", FQDN),
    ("case and one trailing dot are ignored", "MAIL.Example.COM.", FQDN),
    ("a U-label name that encodes to A-labels is valid", "bücher.example", FQDN),
    ("an A-label name is valid", "xn--bcher-kva.example", FQDN),
    ("a 63-octet label is valid", "a" * 63 + ".example", FQDN),
    ("a single label is a local alias, not an FQDN", "localhost", INVALID),
    ("a label starting with a hyphen is invalid", "-bad.example.com", INVALID),
    ("a label ending with a hyphen is invalid", "bad-.example.com", INVALID),
    ("an underscore is not LDH", "under_score.example.com", INVALID),
    ("an empty label is invalid", "a..example.com", INVALID),
    ("a 64-octet label is invalid", "a" * 64 + ".example", INVALID),
    ("an all-numeric top label is invalid", "host.123", INVALID),
    ("spaces are invalid", "mail example.com", INVALID),
    ("an IPv4 literal is valid", "[192.0.2.1]", LITERAL),
    ("an IPv4 literal may have leading zeros (Snum)", "[010.000.002.001]", LITERAL),
    ("an IPv6 literal is valid", "[IPv6:2001:db8::1]", LITERAL),
    ("the IPv6 tag is case-insensitive", "[ipv6:2001:DB8::1]", LITERAL),
    ("an IPv6 literal without its tag is invalid", "[2001:db8::1]", INVALID),
    ("an IPv4 address under the IPv6 tag is invalid", "[IPv6:192.0.2.1]", INVALID),
    ("an octet over 255 is invalid", "[300.1.1.1]", INVALID),
    ("an unclosed literal is invalid", "[192.0.2.1", INVALID),
    ("a zone index is invalid", "[IPv6:fe80::1%eth0]", INVALID),
    ("a general literal with an unregistered tag is invalid", "[X-Tag:abc]", INVALID),
    ("a bare IPv4 address is a bare IP", "192.0.2.1", BARE_IP),
    ("a bare IPv6 address is a bare IP", "2001:db8::1", BARE_IP),
    ("an IPv6 tag without brackets is a bare IP", "IPv6:2001:db8::1", BARE_IP),
    ("nothing is empty", "  ", EMPTY),
]


@pytest.mark.parametrize("helo, kind", [pytest.param(h, k, id=what) for what, h, k in SYNTAX])
def test_syntax(helo: str, kind: str) -> None:
    s = check(helo, CLIENT)
    assert s.kind == kind
    assert s.valid is (kind in (FQDN, LITERAL))
    assert s.bare_ip is (kind == BARE_IP)


def test_a_name_over_255_octets_is_invalid_and_truncated() -> None:
    long = ".".join(["a" * 60] * 5)  # 304 octets
    assert not is_fqdn(long)
    s = check(long, CLIENT)
    assert s.kind == INVALID and len(s.name) == MAX_HELO_LENGTH


def test_leading_zeros_are_read_as_decimal() -> None:
    assert check("[010.000.002.001]", CLIENT).address == "10.0.2.1"


# -- the literal and the client --------------------------------------------------------

LITERALS = [
    ("a literal of the client's address matches", "[192.0.2.10]", CLIENT, True),
    ("another address does not match", "[192.0.2.11]", CLIENT, False),
    ("an IPv6 literal matches in any spelling", "[IPv6:2001:db8:0:0::25]", "2001:db8::25", True),
    ("an IPv4-mapped client matches its IPv4 literal", "[192.0.2.10]", "::ffff:192.0.2.10", True),
    ("a bare IP is not a literal, even when equal", "192.0.2.10", CLIENT, False),
    ("a name is not a literal", "mail.example.com", CLIENT, False),
]


@pytest.mark.parametrize("helo, client, matches", [pytest.param(h, c, m, id=w) for w, h, c, m in LITERALS])
def test_literal_matches(helo: str, client: str, matches: bool) -> None:
    assert check(helo, client).literal_matches is matches


# -- claims to be us -------------------------------------------------------------------

CLAIMS = [
    ("our hostname is us", "mx.our.example", CLIENT, True),
    ("our hostname in capitals with a trailing dot is us", "MX.OUR.EXAMPLE.", CLIENT, True),
    ("an exact served domain is us", "our.example", CLIENT, True),
    ("a name under an exact-only domain is not", "host.our.example", CLIENT, False),
    ("a name under a .domain entry is us", "x.sub.our.example", CLIENT, True),
    ("the .domain entry itself is not", "sub.our.example", CLIENT, False),
    ("our address as a literal is us", "[203.0.113.5]", CLIENT, True),
    ("our address bare is us", "203.0.113.5", CLIENT, True),
    ("an address in our IPv6 network is us", "[IPv6:2001:db8:ff::9]", CLIENT, True),
    ("localhost from outside is us", "localhost", CLIENT, True),
    ("localhost.localdomain from outside is us", "localhost.localdomain", CLIENT, True),
    ("a loopback literal from outside is us", "[127.0.0.1]", CLIENT, True),
    ("localhost from loopback itself is not a forgery", "localhost", "127.0.0.1", False),
    ("a stranger's name is not us", "mail.example.com", CLIENT, False),
    ("a stranger's literal is not us", "[192.0.2.10]", CLIENT, False),
]


@pytest.mark.parametrize("helo, client, is_us", [pytest.param(h, c, u, id=w) for w, h, c, u in CLAIMS])
def test_is_us(helo: str, client: str, is_us: bool) -> None:
    assert check(helo, client, US).is_us is is_us


def test_a_bad_address_in_our_ips_is_refused() -> None:
    with pytest.raises(ValueError, match="not an IP"):
        identity(ips=["203.0.113.500"])


# -- the source against DNS ------------------------------------------------------------

def run(coro: Any) -> Any:
    return asyncio.run(coro)


def resolver(server: DnsServer, timeout: float = 1.0) -> Resolver:
    return Resolver([server.address], timeout=timeout)


CONFIRMED = RdnsFact(RDNS_CONFIRMED, "mail.example.net", "example.net")


def test_a_name_that_resolves_to_the_client(dns_server: DnsServer) -> None:
    dns_server.set("mail.example.net", "A", ["198.51.100.1", CLIENT])
    fact = run(gather("Mail.Example.NET.", CLIENT, CONFIRMED, resolver(dns_server),
                      our_names=["mx.our.example"], our_domains=["our.example"], our_ips=["203.0.113.5"]))
    assert fact.status == OK
    assert fact.as_facts() == {
        "helo": "Mail.Example.NET.", "helo_valid": True, "helo_bare_ip": False,
        "helo_literal_matches": False, "helo_is_us": False, "helo_resolves": True,
        "helo_matches_ip": True, "helo_matches_rdns": True,
    }


def test_an_ipv6_client_matches_an_aaaa_record(dns_server: DnsServer) -> None:
    dns_server.set("mail6.example.net", "AAAA", ["2001:db8:1::25"])
    fact = run(gather("mail6.example.net", "2001:db8:1:0::25", None, resolver(dns_server)))
    assert (fact.resolves, fact.matches_ip) == (True, True)


@pytest.mark.parametrize("setup, resolves, matches, status", [
    pytest.param(lambda s: s.set("mail.example.net", "A", ["198.51.100.1"]), True, False, OK,
                 id="a name resolving elsewhere resolves but does not match"),
    pytest.param(lambda s: s.nxdomain("mail.example.net"), False, False, OK,
                 id="a name that does not exist neither resolves nor matches"),
    pytest.param(lambda s: s.set("mail.example.net", "MX", ["10 mx.example.net."]), False, False, OK,
                 id="a name without addresses does not resolve"),
    pytest.param(lambda s: s.servfail("mail.example.net"), UNKNOWN, UNKNOWN, UNKNOWN,
                 id="a SERVFAIL leaves both unknown"),
])
def test_lookup_outcomes(dns_server: DnsServer, setup: Any, resolves: Any, matches: Any, status: str) -> None:
    setup(dns_server)
    fact = run(gather("mail.example.net", CLIENT, CONFIRMED, resolver(dns_server)))
    assert (fact.resolves, fact.matches_ip, fact.status) == (resolves, matches, status)


@pytest.mark.parametrize("helo", [
    pytest.param("[192.0.2.10]", id="a literal is not looked up"),
    pytest.param("192.0.2.10", id="a bare IP is not looked up"),
    pytest.param("localhost", id="an invalid name is not looked up"),
    pytest.param("", id="an empty argument is not looked up"),
])
def test_no_lookup_without_a_valid_name(dns_server: DnsServer, helo: str) -> None:
    fact = run(gather(helo, CLIENT, CONFIRMED, resolver(dns_server)))
    assert dns_server.total_queries() == 0
    assert (fact.resolves, fact.matches_ip, fact.matches_rdns) == (False, False, False)
    assert fact.status == (NONE if not helo else OK)


@pytest.mark.parametrize("rdns, matches", [
    pytest.param(CONFIRMED, True, id="the confirmed rDNS name matches"),
    pytest.param(RdnsFact(RDNS_UNCONFIRMED, "MAIL.example.net"), True, id="an unconfirmed rDNS name matches too"),
    pytest.param(RdnsFact(RDNS_CONFIRMED, "other.example.net"), False, id="another rDNS name does not"),
    pytest.param(RdnsFact(RDNS_NONE), False, id="no PTR does not match"),
    pytest.param(RdnsFact(RDNS_UNKNOWN, generic=UNKNOWN), UNKNOWN, id="a failed PTR lookup is unknown"),
    pytest.param(RdnsFact(RDNS_UNKNOWN, "mail.example.net", generic=UNKNOWN), True,
                 id="a failed forward lookup still has the PTR name to compare"),
    pytest.param(None, UNKNOWN, id="rDNS not gathered is unknown"),
])
def test_matches_rdns(dns_server: DnsServer, rdns: RdnsFact | None, matches: Any) -> None:
    dns_server.set("mail.example.net", "A", [CLIENT])
    assert run(gather("mail.example.net.", CLIENT, rdns, resolver(dns_server))).matches_rdns == matches


def test_the_budget_bounds_the_lookup(dns_server: DnsServer) -> None:
    dns_server.silent("slow.example.net")
    started = time.monotonic()
    fact = run(gather("slow.example.net", CLIENT, None, resolver(dns_server, timeout=5.0), budget=0.3))
    assert time.monotonic() - started < 2.0
    assert (fact.resolves, fact.status, fact.reason) == (UNKNOWN, UNKNOWN, "deadline")


def test_a_long_argument_is_truncated_in_the_fact(dns_server: DnsServer) -> None:
    fact = run(gather("x" * 1000, CLIENT, None, resolver(dns_server)))
    assert len(str(fact.as_facts()["helo"])) == MAX_HELO_LENGTH and fact.as_facts()["helo_valid"] is False


def test_a_prebuilt_identity_is_used(dns_server: DnsServer) -> None:
    fact = run(gather("[203.0.113.5]", CLIENT, None, resolver(dns_server), us=US))
    assert fact.as_facts()["helo_is_us"] is True


@pytest.mark.parametrize("when, asked, ptr", [
    ({"helo_is_us": True}, False, False),   # the shipped rule: no lookup of a stranger's name, no PTR
    ({"helo_resolves": False}, True, False),
    ({"helo_matches_ip": False}, True, False),
    ({"helo_matches_rdns": False}, False, True),   # the one HELO fact that reads the rDNS result
])
def test_the_helo_name_is_looked_up_only_when_a_rule_reads_what_that_tells(
        when: dict[str, Any], asked: bool, ptr: bool, dns_server: DnsServer, guard_factory: Any,
        recorder: Any) -> None:
    # issue 15: a lookup no rule needs is not made (postscreen runs only enabled tests)
    import smtplib

    from smtpguard.commands.check import evaluate

    dns_server.set("name.client.test", "A", ["192.0.2.1"])
    g = guard_factory({"rule": [{"name": "r", "stage": "helo", "action": "continue",
                                 "when": when}]}, upstream=recorder.address)
    with smtplib.SMTP(g.host, g.port, timeout=10) as s:
        assert s.ehlo("name.client.test")[0] == 250
        s.mail("a@sender.test")
        assert s.rcpt("user@example.test")[0] == 250
    looked = dns_server.queries("name.client.test", "A") + dns_server.queries("name.client.test", "AAAA")
    assert (looked > 0) is asked
    assert (dns_server.queries(ptr_name("127.0.0.1"), "PTR") > 0) is ptr
    # check shows every fact, the lookup's too, whatever the rules read
    import asyncio
    result = asyncio.run(evaluate(g.config, "192.0.2.1", "name.client.test"))
    assert result["facts"]["helo_matches_ip"] is True
