"""Issue 19, items 5, 6 and 11: graylist identities and keys that strangers
shape. The rDNS facts come from the real loopback DNS server; the graylist
runs its real source (sources/graylist.py) on the memory store, whose
contract the store suite holds to the sqlite and redis ones.

5. a cloud or dynamic-DNS provider never shares one identity among its
   customers (the PSL's private section counts; generic names key on /24);
6. random bot senders do not collapse into one sender key;
11. a strict client's re-graylisting leaves a non-strict client's pass alone.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import pytest

from smtpguard.adapters.dns import Resolver
from smtpguard.adapters.store import MemoryStore
from smtpguard.core import graylist as g
from smtpguard.services import Services
from smtpguard.sources import graylist
from smtpguard.sources import rdns as rdns_source
from tests.fixtures_dns import DnsServer

T0 = 1_800_000_000.0
DAY = 86400.0
SETTINGS = graylist.GraylistSettings()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def session_for(ip: str, server: DnsServer) -> Any:
    """A session as the graylist sees it: its address and its rDNS facts,
    gathered from the loopback DNS server."""
    fact = run(rdns_source.gather(ip, Resolver([server.address], timeout=2.0)))
    return SimpleNamespace(client=SimpleNamespace(ip=ip), facts=fact.as_facts())


def attempt(store: MemoryStore, session: Any, now: float, *, sender: str = "a@sender.t",
            rcpt: str = "u@ours.t", strict: bool = False) -> str:
    fact = run(graylist.check(store, SETTINGS, ip=session.client.ip,
                              rdns_confirmed_domain=Services._confirmed_domain(session),
                              sender=sender, rcpt=rcpt, strict=strict, now=now))
    return str(fact.graylist)


def confirm(server: DnsServer, ip: str, name: str) -> None:
    server.set_ptr(ip, [name + "."])
    server.set(name, "A", [ip])


# -- 5. identities -------------------------------------------------------------------

@pytest.mark.parametrize("name, ip, identity", [
    pytest.param("ec2-54-210-33-7.compute-1.amazonaws.com", "54.210.33.7", None,
                 id="an EC2 default name is a suffix of the PSL's private section: the /24"),
    pytest.param("host7.duckdns.org", "198.51.100.7", "host7.duckdns.org",
                 id="a dynamic-DNS customer is its own identity, never duckdns.org"),
    pytest.param("dsl-198-51-100-8.dyn.example.net", "198.51.100.8", None,
                 id="a generic name gives no domain identity: the /24"),
    pytest.param("mail.example.com", "198.51.100.9", "example.com",
                 id="an ordinary confirmed mail host keys on its registrable domain"),
])
def test_the_domain_identity(dns_server: DnsServer, name: str, ip: str, identity: str | None) -> None:
    confirm(dns_server, ip, name)
    session = session_for(ip, dns_server)
    assert session.facts["rdns"] == "confirmed"
    assert Services._confirmed_domain(session) == identity


def test_one_ec2_host_retrying_does_not_pass_another_in_a_different_24(dns_server: DnsServer) -> None:
    a = "ec2-54-210-33-7.compute-1.amazonaws.com", "54.210.33.7"
    b = "ec2-3-80-1-9.compute-1.amazonaws.com", "3.80.1.9"
    for name, ip in (a, b):
        confirm(dns_server, ip, name)
    host_a, host_b = session_for(a[1], dns_server), session_for(b[1], dns_server)
    store = MemoryStore()
    assert attempt(store, host_a, T0) == "new"
    assert attempt(store, host_a, T0 + 300) == "passed"
    assert attempt(store, host_b, T0 + 301) == "new"   # was `passed`: the whole cloud was one identity


def test_auto_allow_of_one_cloud_host_does_not_cover_the_provider(dns_server: DnsServer) -> None:
    a = "ec2-54-210-33-7.compute-1.amazonaws.com", "54.210.33.7"
    b = "ec2-3-80-1-9.compute-1.amazonaws.com", "3.80.1.9"
    for name, ip in (a, b):
        confirm(dns_server, ip, name)
    host_a, host_b = session_for(a[1], dns_server), session_for(b[1], dns_server)
    store = MemoryStore()
    for i in range(SETTINGS.policy.auto_allow_after):
        attempt(store, host_a, T0, rcpt=f"u{i}@ours.t")
        assert attempt(store, host_a, T0 + 300, rcpt=f"u{i}@ours.t") == "passed"
    assert attempt(store, host_a, T0 + 400, rcpt="fresh@ours.t") == "allowed"  # its own /24 earned it
    assert attempt(store, host_b, T0 + 400, rcpt="fresh@ours.t") == "new"


# -- 6. sender keys ------------------------------------------------------------------

BOT_SENDERS = [
    "q7z@bulk.t", "zz99top@bulk.t", "k3k@bulk.t", "A1X+anything@BULK.t", "prvs=1234abcd=q9@bulk.t",
    "SRS0=HHHH=TT=bulk.t=a1x@attacker.t",
]


@pytest.mark.parametrize("sender", BOT_SENDERS)
def test_random_bot_senders_do_not_ride_on_one_pass(dns_server: DnsServer, sender: str) -> None:
    session = SimpleNamespace(client=SimpleNamespace(ip="192.0.2.50"), facts={"rdns": "none"})
    store = MemoryStore()
    attempt(store, session, T0, sender="a1x@bulk.t")
    assert attempt(store, session, T0 + 300, sender="a1x@bulk.t") == "passed"
    assert attempt(store, session, T0 + 301, sender=sender) == "new"


def test_bot_senders_keep_distinct_keys() -> None:
    keys = {g.normalise_sender(s) for s in ["a1x@bulk.t", *BOT_SENDERS]}
    assert len(keys) == len(BOT_SENDERS) + 1


# -- 11. strict and non-strict clients on one triplet -----------------------------------

def test_a_strict_regraylisting_keeps_a_non_strict_clients_pass() -> None:
    session = SimpleNamespace(client=SimpleNamespace(ip="192.0.2.60"), facts={"rdns": "none"})
    store = MemoryStore()
    assert attempt(store, session, T0) == "new"
    assert attempt(store, session, T0 + 300) == "passed"
    later = T0 + 7 * DAY                  # a weekly correspondent
    assert attempt(store, session, later, strict=True) == "new"          # strict: earn it again
    assert attempt(store, session, later + 10) == "passed"               # was `deferred`
    assert attempt(store, session, later + 20, strict=True) == "deferred"
    assert attempt(store, session, later + 200, strict=True) == "passed"  # its own retry passed
    assert attempt(store, session, later + 201) == "passed"


def test_a_pass_older_than_max_age_is_not_kept_alive_by_a_strict_retry() -> None:
    session = SimpleNamespace(client=SimpleNamespace(ip="192.0.2.61"), facts={"rdns": "none"})
    store = MemoryStore()
    attempt(store, session, T0)
    attempt(store, session, T0 + 300)
    near_end = T0 + 300 + SETTINGS.policy.max_age - 60
    assert attempt(store, session, near_end, strict=True) == "new"
    assert attempt(store, session, near_end + 120) == "new"  # past max_age: the pass is gone
