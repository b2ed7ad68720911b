"""Issue 19 item 4: an allowlist that cannot answer never makes a higher,
certain score. Real queries to the loopback DNS server; the rule is the one
examples/smtpguard.toml ships (`dnsbl_score_ge = 3` rejects)."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import pytest

from smtpguard.adapters.dns import Resolver
from smtpguard.core import policy as pol
from smtpguard.core.dnsbl import DnsblList, parse_code, query_name
from smtpguard.sources.dnsbl import gather
from smtpguard.sources.registry import FACT_TABLE
from tests.fixtures_dns import DnsServer

CLIENT = "192.0.2.99"
BLOCK = DnsblList("bl.test", 3)
ALLOW = DnsblList("wl.test", -2, (parse_code("127.0.10.0/24"),))
ALLOW_DEFAULT_CODES = DnsblList("wl.test", -2)


def score(server: DnsServer, lists: tuple[DnsblList, ...]) -> Any:
    async def main() -> Any:
        fact = await gather(CLIENT, lists, Resolver([server.address], timeout=0.5), 2.0)
        return fact.as_facts()["dnsbl_score"]
    return asyncio.run(main())


ALLOWLIST_FAULTS: list[Any] = [
    pytest.param(lambda s, n: s.servfail(n), ALLOW, id="the allowlist answers SERVFAIL"),
    pytest.param(lambda s, n: s.silent(n), ALLOW, id="the allowlist times out"),
    pytest.param(lambda s, n: s.set(n, "A", ["127.0.0.255"]), ALLOW,
                 id="the allowlist says over quota (127.0.0.255), codes configured"),
    pytest.param(lambda s, n: s.set(n, "A", ["127.0.0.255"]), ALLOW_DEFAULT_CODES,
                 id="the allowlist says over quota (127.0.0.255), default codes"),
    pytest.param(lambda s, n: s.set(n, "A", ["127.255.255.254"]), ALLOW,
                 id="the allowlist refuses a public resolver (127.255.255.254)"),
]


@pytest.mark.parametrize("fault, allow", ALLOWLIST_FAULTS)
def test_an_allowlist_outage_makes_the_score_unknown_not_higher(
        dns_server: DnsServer, fault: Callable[[DnsServer, str], None], allow: DnsblList) -> None:
    dns_server.set(query_name(CLIENT, "bl.test"), "A", ["127.0.0.2"])
    fault(dns_server, query_name(CLIENT, "wl.test"))
    got = score(dns_server, (BLOCK, allow))
    assert got == "unknown"     # was 3, and `dnsbl_score_ge = 3` gave 550 [DNSBL]
    policy = pol.parse_policy({"rule": [{"name": "dnsbl", "stage": "connect", "when": {"dnsbl_score_ge": 3},
                                         "action": "reject", "reason": "DNSBL"}]}, facts=FACT_TABLE)
    assert pol.decide(policy, "connect", {"dnsbl_score": got}).action != "reject"


def test_the_allowlist_answering_still_lowers_the_score(dns_server: DnsServer) -> None:
    dns_server.set(query_name(CLIENT, "bl.test"), "A", ["127.0.0.2"])
    dns_server.set(query_name(CLIENT, "wl.test"), "A", ["127.0.10.2"])
    assert score(dns_server, (BLOCK, ALLOW)) == 1


def test_the_allowlist_not_listing_leaves_the_block_score(dns_server: DnsServer) -> None:
    dns_server.set(query_name(CLIENT, "bl.test"), "A", ["127.0.0.2"])
    dns_server.nxdomain(query_name(CLIENT, "wl.test"))
    assert score(dns_server, (BLOCK, ALLOW)) == 3


def test_a_failing_blocklist_keeps_the_others_certain_lower_bound(dns_server: DnsServer) -> None:
    other = DnsblList("bl2.test", 2)
    dns_server.set(query_name(CLIENT, "bl.test"), "A", ["127.0.0.2"])
    dns_server.servfail(query_name(CLIENT, "bl2.test"))
    assert score(dns_server, (BLOCK, other)) == 3  # a missing positive weight can only raise it
