"""The rDNS source (sources/rdns.py) against a real DNS server on loopback."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from smtpguard.adapters.dns import Resolver
from smtpguard.core.facts import NONE, OK, UNKNOWN
from smtpguard.core.rdns import RdnsFact, compile_rules
from smtpguard.errors import ConfigError
from smtpguard.sources.rdns import RdnsSettings, gather, registrable_domain, with_helo
from tests.fixtures_dns import DnsServer, ptr_name

CLIENT = "192.0.2.10"
CLIENT6 = "2001:db8:1::25"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def resolver(server: DnsServer, timeout: float = 1.0) -> Resolver:
    return Resolver([server.address], timeout=timeout)


# -- the four outcomes ------------------------------------------------------------

def test_no_ptr_is_none(dns_server: DnsServer) -> None:
    dns_server.nxdomain(ptr_name(CLIENT))
    fact = run(gather(CLIENT, resolver(dns_server)))
    assert (fact.rdns, fact.status, fact.name, fact.generic) == ("none", NONE, "", False)
    assert fact.as_facts()["rdns_name"] == ""


def test_a_ptr_owner_without_ptr_data_is_none(dns_server: DnsServer) -> None:
    dns_server.nodata(ptr_name(CLIENT))
    assert run(gather(CLIENT, resolver(dns_server))).rdns == "none"


def test_a_ptr_name_pointing_elsewhere_is_unconfirmed(dns_server: DnsServer) -> None:
    dns_server.set_ptr(CLIENT, ["mail.example.net."])
    dns_server.set("mail.example.net", "A", ["198.51.100.1"])
    fact = run(gather(CLIENT, resolver(dns_server)))
    assert (fact.rdns, fact.status, fact.name, fact.domain) == ("unconfirmed", OK, "mail.example.net", "example.net")
    assert fact.generic is False and "unconfirmed" in fact.reasons


def test_a_ptr_name_that_does_not_exist_is_unconfirmed(dns_server: DnsServer) -> None:
    dns_server.set_ptr(CLIENT, ["ghost.example.net."])
    dns_server.nxdomain("ghost.example.net")
    fact = run(gather(CLIENT, resolver(dns_server)))
    assert (fact.rdns, fact.name) == ("unconfirmed", "ghost.example.net")


def test_forward_confirmed_is_confirmed(dns_server: DnsServer) -> None:
    dns_server.set_ptr(CLIENT, ["Mail.Example.NET."])
    dns_server.set("mail.example.net", "A", ["198.51.100.1", CLIENT])
    fact = run(gather(CLIENT, resolver(dns_server)))
    assert fact.as_facts() == {"rdns": "confirmed", "rdns_name": "mail.example.net",
                               "rdns_domain": "example.net", "rdns_generic": False}


def test_only_the_second_ptr_name_confirms(dns_server: DnsServer) -> None:
    # The resolver sorts an RRset's values; "a" is asked first, "b" confirms.
    dns_server.set_ptr(CLIENT, ["a.example.net.", "b.example.org."])
    dns_server.set("a.example.net", "A", ["198.51.100.1"])
    dns_server.set("b.example.org", "A", [CLIENT])
    fact = run(gather(CLIENT, resolver(dns_server)))
    assert (fact.rdns, fact.name, fact.domain) == ("confirmed", "b.example.org", "example.org")
    assert fact.names == ("a.example.net", "b.example.org")


def test_a_cname_in_the_forward_chain_confirms(dns_server: DnsServer) -> None:
    dns_server.set_ptr(CLIENT, ["host.example.net."])
    dns_server.set("host.example.net", "CNAME", ["real.example.com."])
    dns_server.set("real.example.com", "A", [CLIENT])
    fact = run(gather(CLIENT, resolver(dns_server)))
    assert (fact.rdns, fact.name) == ("confirmed", "host.example.net")


def test_ipv6_ptr_in_nibble_format_confirms(dns_server: DnsServer) -> None:
    dns_server.set_ptr(CLIENT6, ["mail6.example.net."])
    dns_server.set("mail6.example.net", "AAAA", ["2001:db8:1:0:0:0:0:25"])
    fact = run(gather(CLIENT6, resolver(dns_server)))
    assert (fact.rdns, fact.name) == ("confirmed", "mail6.example.net")
    assert dns_server.queries(ptr_name(CLIENT6), "PTR") == 1
    assert ptr_name(CLIENT6).startswith("5.2.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa")


def test_an_ipv4_mapped_client_is_asked_as_ipv4(dns_server: DnsServer) -> None:
    dns_server.set_ptr(CLIENT, ["mail.example.net."])
    dns_server.set("mail.example.net", "A", [CLIENT])
    assert run(gather("::ffff:" + CLIENT, resolver(dns_server))).rdns == "confirmed"


# -- failures are values -------------------------------------------------------------

@pytest.mark.parametrize("behaviour, reason", [
    pytest.param("servfail", "servfail", id="a SERVFAIL on the PTR is unknown"),
    pytest.param("silent", "timeout", id="silence on the PTR is unknown after the timeout"),
])
def test_ptr_failure_is_unknown(dns_server: DnsServer, behaviour: str, reason: str) -> None:
    getattr(dns_server, behaviour)(ptr_name(CLIENT))
    fact = run(gather(CLIENT, resolver(dns_server, timeout=0.4)))
    assert (fact.rdns, fact.status, fact.generic, fact.error) == ("unknown", UNKNOWN, UNKNOWN, reason)
    assert fact.as_facts() == {"rdns": "unknown", "rdns_name": "unknown", "rdns_domain": "unknown",
                               "rdns_generic": "unknown"}


def test_a_failed_forward_lookup_is_unknown_but_keeps_the_name(dns_server: DnsServer) -> None:
    dns_server.set_ptr(CLIENT, ["192-0-2-10.dsl.example.net."])
    dns_server.servfail("192-0-2-10.dsl.example.net")
    fact = run(gather(CLIENT, resolver(dns_server)))
    assert (fact.rdns, fact.name, fact.generic, fact.error) == \
        ("unknown", "192-0-2-10.dsl.example.net", UNKNOWN, "servfail")


def test_a_failed_forward_lookup_does_not_hide_another_confirming_name(dns_server: DnsServer) -> None:
    dns_server.set_ptr(CLIENT, ["a.example.net.", "b.example.net."])
    dns_server.servfail("a.example.net")
    dns_server.set("b.example.net", "A", [CLIENT])
    fact = run(gather(CLIENT, resolver(dns_server)))
    assert (fact.rdns, fact.name) == ("confirmed", "b.example.net")


def test_the_budget_bounds_the_whole_gather(dns_server: DnsServer) -> None:
    dns_server.set_ptr(CLIENT, ["slow.example.net."])
    dns_server.silent("slow.example.net")
    started = time.monotonic()
    fact = run(gather(CLIENT, resolver(dns_server, timeout=5.0), budget=0.3))
    assert time.monotonic() - started < 2.0
    assert (fact.rdns, fact.name, fact.error) == ("unknown", "slow.example.net", "deadline")


def test_a_non_address_client_is_unknown(dns_server: DnsServer) -> None:
    fact = run(gather("not-an-ip", resolver(dns_server)))
    assert fact.rdns == "unknown" and dns_server.total_queries() == 0


# -- bounds and concurrency ------------------------------------------------------------

def test_at_most_ten_ptr_names_are_looked_up(dns_server: DnsServer) -> None:
    names = [f"h{i:02d}.example.net" for i in range(12)]
    dns_server.set_ptr(CLIENT, [n + "." for n in names])
    for n in names[:10]:
        dns_server.set(n, "A", ["198.51.100.1"])
    dns_server.set(names[11], "A", [CLIENT])  # would confirm, but is the 12th
    fact = run(gather(CLIENT, resolver(dns_server)))
    assert fact.rdns == "unconfirmed" and fact.names == tuple(names[:10])
    assert [dns_server.queries(n, "A") for n in names] == [1] * 10 + [0, 0]


def test_the_bound_is_a_setting(dns_server: DnsServer) -> None:
    dns_server.set_ptr(CLIENT, ["a.example.net.", "b.example.net."])
    dns_server.set("b.example.net", "A", [CLIENT])
    fact = run(gather(CLIENT, resolver(dns_server), RdnsSettings(max_ptr_names=1)))
    assert fact.rdns == "unconfirmed" and dns_server.queries("b.example.net", "A") == 0


def test_forward_lookups_run_concurrently(dns_server: DnsServer) -> None:
    names = [f"slow{i}.example.net" for i in range(5)]
    dns_server.set_ptr(CLIENT, [n + "." for n in names])
    for n in names:
        dns_server.set(n, "A", ["198.51.100.1"])
        dns_server.delay(n, 0.3)
    started = time.monotonic()
    fact = run(gather(CLIENT, resolver(dns_server, timeout=3.0)))
    elapsed = time.monotonic() - started
    assert fact.rdns == "unconfirmed"
    assert elapsed < 1.2, f"5 forward lookups of 0.3 s took {elapsed:.2f} s: not concurrent"


# -- the classifier through the source ---------------------------------------------------

def test_a_pool_name_is_generic(dns_server: DnsServer) -> None:
    dns_server.set_ptr(CLIENT, ["192-0-2-10.dynamic.example.net."])
    dns_server.set("192-0-2-10.dynamic.example.net", "A", [CLIENT])
    fact = run(gather(CLIENT, resolver(dns_server)))
    assert fact.as_facts()["rdns_generic"] is True
    assert "ip:full-decimal" in fact.reasons


def test_an_admin_exception_reaches_the_classifier(dns_server: DnsServer) -> None:
    dns_server.set_ptr(CLIENT, ["192-0-2-10.dynamic.example.net."])
    dns_server.set("192-0-2-10.dynamic.example.net", "A", [CLIENT])
    settings = RdnsSettings.from_mapping({"generic_exceptions": [".dynamic.example.net"]})
    fact = run(gather(CLIENT, resolver(dns_server), settings))
    assert fact.generic is False and fact.reasons[0].startswith("exception:")


@pytest.mark.parametrize("name, domain", [
    pytest.param("ec2-54-210-33-7.compute-1.amazonaws.com", "amazonaws.com",
                 id="private PSL entries are left out: a hoster's names share one domain"),
    pytest.param("p1.tokyo.ocn.ne.jp", "ocn.ne.jp", id="a country second level is a public suffix"),
    pytest.param("Mail.Example.COM.", "example.com", id="case and the trailing dot are ignored"),
    pytest.param("com", "", id="a public suffix alone has no registrable domain"),
    pytest.param("", "", id="an empty name has none"),
])
def test_registrable_domain(name: str, domain: str) -> None:
    assert registrable_domain(name) == domain


# -- the HELO stage: with_helo() (issue 14) ------------------------------------------

def test_with_helo_revises_a_confirmed_name_given_as_helo(dns_server: DnsServer) -> None:
    dns_server.set_ptr(CLIENT, ["static1-res.company.test."])
    dns_server.set("static1-res.company.test", "A", [CLIENT])
    fact = run(gather(CLIENT, resolver(dns_server)))
    assert fact.rdns == "confirmed" and fact.generic is True          # two pool words: score 3
    same = with_helo(fact, CLIENT, "Static1-RES.company.test.")
    assert same.generic is False and "helo-is-name" in same.reasons
    assert (same.rdns, same.name, same.domain, same.names) == (fact.rdns, fact.name, fact.domain, fact.names)
    assert with_helo(same, CLIENT, "mail.other.test") == fact           # a later EHLO with another name
    assert with_helo(fact, CLIENT, None) is fact and with_helo(fact, CLIENT, "") is fact


def test_with_helo_keeps_the_admin_exceptions(dns_server: DnsServer) -> None:
    dns_server.set_ptr(CLIENT, ["dyn-192-0-2-10.isp.test."])
    dns_server.set("dyn-192-0-2-10.isp.test", "A", [CLIENT])
    settings = RdnsSettings.from_mapping({"generic_exceptions": [".isp.test"]})
    fact = run(gather(CLIENT, resolver(dns_server), settings))
    assert fact.generic is False
    assert with_helo(fact, CLIENT, "other.test", settings).generic is False
    assert with_helo(fact, CLIENT, "other.test").generic is True     # without them: the address and "dyn"


@pytest.mark.parametrize("fact", [
    pytest.param(RdnsFact("none"), id="no PTR"),
    pytest.param(RdnsFact("unknown", generic="unknown", error="timeout"), id="lookup failed"),
    pytest.param(RdnsFact("unconfirmed", "static1-res.company.test", "company.test", True, ("static1-res.company.test",),
                          ("chosen-name",)), id="unconfirmed: the HELO weighs nothing"),
])
def test_with_helo_leaves_facts_without_a_confirmed_name_alone(fact: RdnsFact) -> None:
    assert with_helo(fact, CLIENT, fact.name or "x.test") is fact


def test_with_helo_on_a_bad_address_changes_nothing() -> None:
    fact = RdnsFact("confirmed", "static1-res.company.test", "company.test", True)
    assert with_helo(fact, "not-an-ip", "static1-res.company.test") is fact


# -- settings ---------------------------------------------------------------------------

def test_settings_defaults() -> None:
    s = RdnsSettings.from_mapping({})
    assert (s.generic_patterns, s.generic_exceptions, s.max_ptr_names) == ((), (), 10)


def test_settings_compile_entries() -> None:
    s = RdnsSettings.from_mapping({"generic_patterns": [r"^srv\d+\."], "generic_exceptions": "mail.example.com",
                                   "max_ptr_names": 3}, "rdns")
    assert s.generic_patterns == compile_rules([r"^srv\d+\."])
    assert s.generic_exceptions[0].search("mail.example.com") and s.max_ptr_names == 3


@pytest.mark.parametrize("table, key, words", [
    pytest.param({"generic_pattern": []}, "rdns.generic_pattern", "unknown key", id="an unknown key is named"),
    pytest.param({"generic_patterns": ["ok", "(bad"]}, "rdns.generic_patterns", "entry 2",
                 id="a bad regex is named by key and entry number"),
    pytest.param({"generic_exceptions": [3]}, "rdns.generic_exceptions", "expected a list",
                 id="a non-string entry is refused"),
    pytest.param({"max_ptr_names": 0}, "rdns.max_ptr_names", "from 1 to 100", id="zero names is refused"),
    pytest.param({"max_ptr_names": True}, "rdns.max_ptr_names", "whole number", id="a boolean is not a number"),
    pytest.param({"max_ptr_names": "10"}, "rdns.max_ptr_names", "whole number", id="a string is not a number"),
])
def test_settings_errors_name_the_key(table: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        RdnsSettings.from_mapping(table, "rdns")
    assert err.value.key == key and words in err.value.message
