"""The graylist source over real stores: memory, sqlite (two connections on
one file, as two worker processes) and redis (two RedisStore instances on one
redis-server, as two MX nodes)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from smtpguard.adapters.store import MemoryStore, Store, open_store
from smtpguard.core.facts import OK, UNKNOWN
from smtpguard.errors import ConfigError
from smtpguard.sources import graylist as source
from smtpguard.sources.graylist import GraylistFact, GraylistSettings, StateSettings
from smtpguard.sources.registry import FACTS
from tests.fixtures_redis import free_port

T0 = 1_900_000_000.0  # an injected clock, in the future so redis TTLs stay positive
SETTINGS = GraylistSettings.from_mapping({"traps": ["trap@example.com"]})
IP = "192.0.2.10"
SENDER = "alice@example.org"
RCPT = "bob@example.net"


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "sqlite", "redis"])
def nodes(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    """Opens one 'node' per call; nodes share state (memory: one instance)."""
    if request.param == "memory":
        shared = MemoryStore()
        return lambda: shared
    url = f"sqlite://{tmp_path}/state.db" if request.param == "sqlite" else request.getfixturevalue("redis_url")
    return lambda: open_store(url)


async def ask(store: Store, now: float, *, ip: str = IP, domain: str | None = None, sender: str = SENDER,
              rcpt: str = RCPT, strict: bool = False, settings: GraylistSettings = SETTINGS) -> GraylistFact:
    return await source.check(store, settings, ip=ip, rdns_confirmed_domain=domain, sender=sender,
                              rcpt=rcpt, strict=strict, now=now)


def with_nodes(nodes: Callable[[], Store], body: Callable[[Store, Store], Awaitable[None]]) -> None:
    async def go() -> None:
        a, b = nodes(), nodes()
        try:
            await body(a, b)
        finally:
            await a.close()
            if b is not a:
                await b.close()
    run(go())


def test_the_first_attempt_defers_and_the_retry_after_the_delay_passes_on_another_node(nodes: Any) -> None:
    async def body(a: Store, b: Store) -> None:
        first = await ask(a, T0)
        assert (first.status, first.graylist, first.wait, first.identity) == (OK, "new", 180, "192.0.2.0/24")
        early = await ask(b, T0 + 100)
        assert (early.graylist, early.wait) == ("deferred", 80), "the clock was not reset"
        assert (await ask(b, T0 + 180)).graylist == "passed"
        assert (await ask(a, T0 + 5000)).graylist == "passed"
    with_nodes(nodes, body)


def test_a_retry_from_another_address_of_the_pool_passes(nodes: Any) -> None:
    async def body(a: Store, b: Store) -> None:
        assert (await ask(a, T0, ip="192.0.2.10")).graylist == "new"
        assert (await ask(b, T0 + 200, ip="192.0.2.250")).graylist == "passed", "same /24"
        assert (await ask(a, T0, ip="2001:db8:1:2::1")).graylist == "new"
        assert (await ask(b, T0 + 200, ip="2001:db8:1:2:ffff::9")).graylist == "passed", "same /64"
        # confirmed rDNS: the domain is the identity, whatever the network
        assert (await ask(a, T0, ip="198.51.100.1", domain="outlook.com")).graylist == "new"
        assert (await ask(b, T0 + 200, ip="203.0.113.7", domain="outlook.com")).graylist == "passed"
    with_nodes(nodes, body)


def test_the_next_message_of_a_mailing_list_with_a_new_verp_id_passes_at_once(nodes: Any) -> None:
    async def body(a: Store, b: Store) -> None:
        assert (await ask(a, T0, sender="list-return-100-bob=example.net@lists.example.org")).graylist == "new"
        assert (await ask(a, T0 + 200, sender="list-return-100-bob=example.net@lists.example.org")).graylist == "passed"
        assert (await ask(b, T0 + 9000, sender="list-return-101-bob=example.net@lists.example.org")).graylist == "passed"
    with_nodes(nodes, body)


def test_a_trap_on_one_node_traps_the_network_on_another(nodes: Any) -> None:
    async def body(a: Store, b: Store) -> None:
        hit = await ask(a, T0, ip="192.0.2.10", rcpt="<Trap@Example.com>")
        assert (hit.graylist, hit.via) == ("trapped", "trap")
        later = await ask(b, T0 + 60, ip="192.0.2.99", rcpt=RCPT)
        assert (later.graylist, later.via) == ("trapped", "network")
        assert (await ask(b, T0 + 60, ip="192.0.3.1")).graylist == "new", "another /24 is not trapped"
        assert (await ask(b, T0 + SETTINGS.policy.trap_ttl, ip="192.0.2.99")).graylist == "new", "the trap expired"
    with_nodes(nodes, body)


def test_five_passed_triplets_auto_allow_the_client_but_not_in_strict_mode(nodes: Any) -> None:
    async def body(a: Store, b: Store) -> None:
        for i in range(5):
            rcpt = f"user{i}@example.net"
            assert (await ask(a, T0, rcpt=rcpt)).graylist == "new"
            assert (await ask(b, T0 + 200, rcpt=rcpt)).graylist == "passed"
        fresh = await ask(b, T0 + 300, rcpt="someone-new@example.net")
        assert (fresh.graylist, fresh.via) == ("allowed", "auto")
        assert (await ask(a, T0 + 300, rcpt="another@example.net", strict=True)).graylist == "new"
        # an auto-allowed client writing to a trap is not trapped (spamd: whitelisted hosts are exempt)
        assert (await ask(a, T0 + 400, rcpt="trap@example.com")).graylist == "allowed"
    with_nodes(nodes, body)


async def trap(store: Store, now: float, *, ip: str = IP, domain: str | None = None,
               rcpt: str = RCPT) -> GraylistFact | None:
    return await source.trap(store, SETTINGS, ip=ip, rdns_confirmed_domain=domain, rcpt=rcpt, now=now)


def test_spamtraps_outside_the_graylist_spare_an_auto_allowed_client_as_check_does(nodes: Any) -> None:
    """`trap` (a recipient no graylist rule covers) and `check` answer alike:
    an auto-allowed client writing to a trap is neither trapped nor does it
    trap its network; any other client is."""
    async def body(a: Store, b: Store) -> None:
        for i in range(5):
            await ask(a, T0, rcpt=f"user{i}@example.net")
            await ask(b, T0 + 200, rcpt=f"user{i}@example.net")
        assert await trap(b, T0 + 300, rcpt="trap@example.com") is None
        assert await trap(a, T0 + 301, ip="192.0.2.99") is None, "its network was not trapped"
        assert (await ask(a, T0 + 302)).via == "auto"
        hit = await trap(a, T0 + 300, ip="192.0.3.1", rcpt="<Trap@Example.com>")
        assert hit is not None and (hit.graylist, hit.via) == ("trapped", "trap")
        later = await trap(b, T0 + 360, ip="192.0.3.99")
        assert later is not None and (later.graylist, later.via) == ("trapped", "network")
        assert await trap(b, T0 + 360, ip="198.51.100.1") is None, "an untouched network is not trapped"
    with_nodes(nodes, body)


def test_four_passed_triplets_do_not_auto_allow(nodes: Any) -> None:
    async def body(a: Store, b: Store) -> None:
        for i in range(4):
            await ask(a, T0, rcpt=f"user{i}@example.net")
            await ask(b, T0 + 200, rcpt=f"user{i}@example.net")
        assert (await ask(b, T0 + 300, rcpt="someone-new@example.net")).graylist == "new"
    with_nodes(nodes, body)


def test_strict_passes_do_not_count_towards_auto_allow(nodes: Any) -> None:
    async def body(a: Store, b: Store) -> None:
        for i in range(5):
            await ask(a, T0, rcpt=f"user{i}@example.net", strict=True)
            assert (await ask(b, T0 + 200, rcpt=f"user{i}@example.net", strict=True)).graylist == "passed"
        assert (await ask(b, T0 + 300, rcpt="someone-new@example.net")).graylist == "new"
    with_nodes(nodes, body)


def test_an_admin_allow_skips_graylisting_and_traps_until_denied(nodes: Any) -> None:
    async def body(a: Store, b: Store) -> None:
        assert await source.allow(a, "192.0.0.0/16", ttl=math.inf, now=T0) == "192.0.0.0/16"
        allowed = await ask(b, T0)
        assert (allowed.graylist, allowed.via) == ("allowed", "admin")
        assert (await ask(b, T0, rcpt="trap@example.com")).graylist == "allowed"
        assert await source.deny(a, "192.0.0.0/16", now=T0) == ("192.0.0.0/16", True)
        assert (await ask(b, T0)).graylist == "new"
        assert await source.deny(a, "192.0.0.0/16", now=T0) == ("192.0.0.0/16", False)
    with_nodes(nodes, body)


def test_an_admin_domain_allow_needs_confirmed_rdns_and_expires_with_its_ttl(nodes: Any) -> None:
    async def body(a: Store, b: Store) -> None:
        await source.allow(a, "Partner.Example.", ttl=3600, now=T0)
        assert (await ask(b, T0, domain="partner.example")).graylist == "allowed"
        assert (await ask(b, T0, domain=None)).graylist == "new", "unconfirmed rDNS is not the domain"
        assert (await ask(b, T0 + 3600, domain="partner.example")).graylist == "new"
    with_nodes(nodes, body)


def test_a_passed_triplet_survives_closing_and_reopening_the_sqlite_store(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path}/state.db"

    async def go() -> None:
        store = open_store(url)
        await ask(store, T0)
        assert (await ask(store, T0 + 200)).graylist == "passed"
        await store.close()
        store = open_store(url)
        assert (await ask(store, T0 + 86400)).graylist == "passed"
        await store.close()
    run(go())


@pytest.mark.parametrize("url_of", [
    pytest.param(lambda tmp: f"redis://127.0.0.1:{free_port()}/0", id="a stopped redis port"),
    pytest.param(lambda tmp: f"sqlite://{tmp}/not-a-dir/state.db", id="an unwritable sqlite path"),
])
def test_a_store_that_cannot_answer_gives_unknown_with_the_error(url_of: Any, tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("")

    async def go() -> GraylistFact:
        store = open_store(url_of(tmp_path), timeout=0.5)
        try:
            return await ask(store, T0)
        finally:
            try:
                await store.close()
            except Exception:
                pass
    fact = run(go())
    assert (fact.status, fact.graylist) == (UNKNOWN, "unknown")
    assert fact.error and fact.identity == "192.0.2.0/24"
    assert fact.as_facts() == {"graylist": "unknown"}


def test_the_fact_flattens_to_names_the_policy_knows() -> None:
    fact = GraylistFact(OK, "deferred", 80, "192.0.2.0/24")
    assert set(fact.as_facts()) <= set(FACTS)


# -- settings -----------------------------------------------------------------------


def test_graylist_defaults() -> None:
    s = GraylistSettings.from_mapping({})
    p = s.policy
    assert (p.delay, p.retry_window, p.max_age, p.auto_allow_after, p.strict_max_age, p.trap_ttl,
            p.ipv4_prefix, p.ipv6_prefix) == (180, 2 * 86400, 35 * 86400, 5, 86400, 86400, 24, 64)
    assert (s.traps, s.on_error) == (frozenset(), "tempfail")
    assert StateSettings.from_mapping({}) == StateSettings("sqlite:///var/lib/smtpguard/state.db", 2.0)


def test_graylist_settings_are_read_from_the_table() -> None:
    s = GraylistSettings.from_mapping({
        "delay": "5m", "retry_window": "1d", "max_age": "40d", "auto_allow_after": 0, "strict_max_age": "12h",
        "traps": ["Trap1@Example.com"], "trap_ttl": "2h", "on_error": "accept", "ipv4_prefix": 32,
        "ipv6_prefix": 56})
    p = s.policy
    assert (p.delay, p.retry_window, p.max_age, p.auto_allow_after, p.strict_max_age, p.trap_ttl,
            p.ipv4_prefix, p.ipv6_prefix) == (300, 86400, 40 * 86400, 0, 43200, 7200, 32, 56)
    assert (s.traps, s.on_error) == (frozenset({"trap1@example.com"}), "accept")


BAD_GRAYLIST = [
    ("an unknown key", {"dealy": "3m"}, "graylist.dealy"),
    ("a duration that is not one", {"delay": "soon"}, "graylist.delay"),
    ("a delay longer than the retry window", {"delay": "3d"}, "graylist.delay"),
    ("a zero max_age", {"max_age": 0}, "graylist.max_age"),
    ("a negative auto_allow_after", {"auto_allow_after": -1}, "graylist.auto_allow_after"),
    ("auto_allow_after as text", {"auto_allow_after": "5"}, "graylist.auto_allow_after"),
    ("an IPv4 prefix over 32", {"ipv4_prefix": 33}, "graylist.ipv4_prefix"),
    ("an IPv6 prefix below 16", {"ipv6_prefix": 8}, "graylist.ipv6_prefix"),
    ("traps as a string", {"traps": "trap@example.com"}, "graylist.traps"),
    ("a trap that is not an address", {"traps": ["nobody"]}, "graylist.traps"),
    ("an unknown on_error", {"on_error": "ignore"}, "graylist.on_error"),
]


@pytest.mark.parametrize("table,key", [c[1:] for c in BAD_GRAYLIST], ids=[c[0] for c in BAD_GRAYLIST])
def test_a_bad_graylist_setting_names_its_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        GraylistSettings.from_mapping(table)
    assert info.value.key == key


BAD_STATE = [
    ("an unknown scheme", {"url": "mysql://x"}, "state.url"),
    ("a url that is not text", {"url": 5}, "state.url"),
    ("a zero timeout", {"timeout": 0}, "state.timeout"),
    ("an unknown key", {"path": "/x"}, "state.path"),
]


@pytest.mark.parametrize("table,key", [c[1:] for c in BAD_STATE], ids=[c[0] for c in BAD_STATE])
def test_a_bad_state_setting_names_its_key(table: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as info:
        StateSettings.from_mapping(table)
    assert info.value.key == key


def test_two_admin_networks_in_one_bucket_are_allowed_and_denied_separately(nodes: Any) -> None:
    async def body(a: Store, b: Store) -> None:
        await source.allow(a, "192.0.2.0/24", ttl=math.inf, now=T0)
        await source.allow(b, "192.1.0.0/16", ttl=60, now=T0)
        await source.allow(a, "2001:db8::/32", ttl=math.inf, now=T0)
        assert (await ask(b, T0, ip="192.0.2.5")).graylist == "allowed"
        assert (await ask(b, T0, ip="192.1.77.5")).graylist == "allowed"
        assert (await ask(b, T0, ip="2001:db8:5::1")).graylist == "allowed"
        assert (await ask(b, T0, ip="192.2.0.1")).graylist == "new", "same /8 bucket, not allowed"
        assert (await ask(b, T0 + 60, ip="192.1.77.5")).graylist == "new", "the /16 expired"
        assert (await source.deny(b, "192.0.2.0/24", now=T0))[1] is True
        assert (await ask(a, T0, ip="192.0.2.5")).graylist == "new"
        assert sorted([t async for t, _, _ in source.allowed(a, now=T0)]) == ["192.1.0.0/16", "2001:db8::/32"]
    with_nodes(nodes, body)
