"""One contract for every Store backend: memory, sqlite (a tmp file), redis
(a real redis-server) and redis through a real sentinel.

Expiry follows the `now` each call passes (an injected clock), identically
on every backend; redis key TTLs are checked separately as the garbage
collector they are.
"""

from __future__ import annotations

import asyncio
import math
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from smtpguard.adapters.store import (
    BATCH, Item, MemoryStore, Put, RedisStore, SqliteStore, Store, open_store)
from smtpguard.errors import ConfigError, StoreError
from tests.fixtures_redis import free_port

Opener = Callable[[], Store]


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


@pytest.fixture(params=["memory", "sqlite", "redis", "sentinel"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Opener:
    """A function opening a store of one backend; two calls give two
    instances over the same state (two processes, two nodes), except for
    memory, which has no sharing and returns the one instance."""
    kind = request.param
    if kind == "memory":
        shared = MemoryStore()
        return lambda: shared
    if kind == "sqlite":
        url = f"sqlite://{tmp_path}/state.db"
    elif kind == "redis":
        url = request.getfixturevalue("redis_url")
    else:
        url = request.getfixturevalue("redis_sentinel_url")
    return lambda: open_store(url)


async def items(store: Store, prefix: str, now: float) -> list[Item]:
    return [item async for item in store.scan(prefix, now=now)]


def contract(body: Callable[[Store, float], Awaitable[None]]) -> Callable[[Opener], None]:
    """Run `body(store, now)` on one fresh store of the backend, closing it."""
    def test(opener: Opener) -> None:
        async def go() -> None:
            store = opener()
            try:
                await body(store, time.time())
            finally:
                await store.close()
        run(go())
    test.__name__ = body.__name__
    test.__doc__ = body.__doc__
    return test


@contract
async def test_a_missing_key_reads_as_none_and_a_set_key_reads_back(store: Store, now: float) -> None:
    assert await store.get("k", now=now) is None
    await store.set("k", "v: with colon, ünïcode", expires_at=now + 60, now=now)
    assert await store.get("k", now=now) == "v: with colon, ünïcode"
    await store.set("k", "second", expires_at=now + 60, now=now)
    assert await store.get("k", now=now) == "second"


@contract
async def test_get_many_is_aligned_with_the_keys_asked(store: Store, now: float) -> None:
    await store.set("a", "1", expires_at=now + 60, now=now)
    await store.set("c", "3", expires_at=now + 60, now=now)
    await store.set("gone", "x", expires_at=now + 1, now=now)
    assert await store.get_many(["a", "b", "c", "gone"], now=now + 2) == ["1", None, "3", None]
    assert await store.get_many([], now=now) == []


@contract
async def test_an_entry_is_visible_until_its_expiry_on_the_callers_clock(store: Store, now: float) -> None:
    await store.set("k", "v", expires_at=now + 10, now=now)
    assert await store.get("k", now=now + 9.9) == "v"
    assert await store.get("k", now=now + 10) is None
    assert await store.get_many(["k"], now=now + 11) == [None]
    assert await items(store, "k", now + 10) == []


@contract
async def test_setting_an_expiry_in_the_past_deletes(store: Store, now: float) -> None:
    await store.set("k", "v", expires_at=now + 60, now=now)
    await store.set("k", "v", expires_at=now, now=now)
    assert await store.get("k", now=now - 100) is None


@contract
async def test_an_infinite_expiry_never_expires(store: Store, now: float) -> None:
    await store.set("k", "v", expires_at=math.inf, now=now)
    assert await store.get("k", now=now + 1e9) == "v"
    [item] = await items(store, "k", now + 1e9)
    assert item.expires_at == math.inf


@contract
async def test_delete_says_whether_the_key_existed(store: Store, now: float) -> None:
    await store.set("k", "v", expires_at=now + 60, now=now)
    assert await store.delete("k") is True
    assert await store.get("k", now=now) is None
    assert await store.delete("k") is False


@contract
async def test_update_sees_the_current_value_writes_and_returns_the_result(store: Store, now: float) -> None:
    seen: list[str | None] = []

    def append(current: str | None) -> tuple[Put | None, int]:
        seen.append(current)
        new = (current or "") + "x"
        return Put(new, now + 60), len(new)

    assert await store.update("k", append, now=now) == 1
    assert await store.update("k", append, now=now) == 2
    assert seen == [None, "x"]
    assert await store.get("k", now=now) == "xx"


@contract
async def test_update_returning_no_put_leaves_the_entry_and_its_expiry(store: Store, now: float) -> None:
    await store.set("k", "v", expires_at=now + 60, now=now)
    assert await store.update("k", lambda cur: (None, cur), now=now) == "v"
    [item] = await items(store, "k", now)
    assert (item.value, item.expires_at) == ("v", pytest.approx(now + 60, abs=0.01))


@contract
async def test_update_sees_an_expired_entry_as_absent(store: Store, now: float) -> None:
    await store.set("k", "old", expires_at=now + 5, now=now)
    assert await store.update("k", lambda cur: (None, cur), now=now + 5) is None


@contract
async def test_update_can_delete_by_writing_an_expiry_in_the_past(store: Store, now: float) -> None:
    await store.set("k", "v", expires_at=now + 60, now=now)
    await store.update("k", lambda cur: (Put("", now), None), now=now)
    assert await store.get("k", now=now - 1) is None


@contract
async def test_a_counter_counts_within_a_fixed_window_and_restarts_after(store: Store, now: float) -> None:
    assert await store.incr("c", expires_at=now + 60, now=now) == 1
    assert await store.incr("c", 4, expires_at=now + 999, now=now + 1) == 5
    [item] = await items(store, "c", now)
    assert item.expires_at == pytest.approx(now + 60, abs=0.01), "a live window keeps its expiry"
    assert await store.get("c", now=now) == "5"
    assert await store.incr("c", expires_at=now + 120, now=now + 60) == 1, "expired: a new window"


@contract
async def test_scan_lists_live_entries_under_a_prefix_only(store: Store, now: float) -> None:
    await store.set("grey:t:a", "1", expires_at=now + 60, now=now)
    await store.set("grey:t:b", "2", expires_at=now + 60, now=now)
    await store.set("grey:t:dead", "3", expires_at=now + 1, now=now)
    await store.set("grey:c:a", "4", expires_at=now + 60, now=now)
    await store.set("grey:t*", "glob characters are literal", expires_at=now + 60, now=now)
    got = sorted((i.key, i.value) for i in await items(store, "grey:t:", now + 2))
    assert got == [("grey:t:a", "1"), ("grey:t:b", "2")]
    assert [i.key for i in await items(store, "grey:t*", now)] == ["grey:t*"]


@contract
async def test_scan_walks_more_entries_than_one_batch(store: Store, now: float) -> None:
    n = BATCH * 2 + 7
    for i in range(n):
        await store.set(f"p:{i:05d}", str(i), expires_at=now + 60, now=now)
    keys = [i.key for i in await items(store, "p:", now)]
    assert sorted(keys) == [f"p:{i:05d}" for i in range(n)]


@contract
async def test_purge_removes_expired_entries_and_keeps_live_ones(store: Store, now: float) -> None:
    await store.set("live", "1", expires_at=now + 60, now=now)
    await store.set("dead", "2", expires_at=now + 1, now=now)
    removed = await store.purge(now=now + 2)
    assert [i.key for i in await items(store, "", now + 2)] == ["live"]
    if isinstance(store, RedisStore):
        assert removed == 0, "redis expires keys itself and counts nothing"
    else:
        assert removed == 1
        # really gone, not only hidden by the clock:
        assert [i.key for i in await items(store, "", now)] == ["live"]
    assert await store.purge(now=now + 2) == 0, "purge is idempotent"


@contract
async def test_ping_answers_when_the_backend_is_up(store: Store, now: float) -> None:
    await store.ping()


def test_concurrent_updates_of_one_key_from_two_instances_lose_nothing(opener: Opener) -> None:
    """50 read-modify-write increments racing on one key through two store
    instances (two processes or nodes; one for memory) must end at 50."""

    def plus_one(current: str | None) -> tuple[Put | None, int]:
        value = int(current or "0") + 1
        return Put(str(value), time.time() + 60), value

    async def go() -> None:
        a, b = opener(), opener()
        try:
            now = time.time()
            results = await asyncio.gather(*(
                (a if i % 2 else b).update("n", plus_one, now=now) for i in range(50)))
            assert sorted(results) == list(range(1, 51)), "each update saw a distinct value"
            assert await a.get("n", now=now) == "50"
            counts = await asyncio.gather(*(
                (a if i % 2 else b).incr("c", expires_at=now + 60, now=now) for i in range(50)))
            assert sorted(counts) == list(range(1, 51))
        finally:
            await a.close()
            if b is not a:
                await b.close()
    run(go())


def test_concurrent_sqlite_writers_in_two_threads_wait_for_each_other(tmp_path: Path) -> None:
    """Two stores on one file, each on its own thread and connection (what
    two worker processes are): BEGIN IMMEDIATE plus busy_timeout serialise
    the read-modify-writes instead of failing with 'database is locked'."""
    path = str(tmp_path / "state.db")

    def plus_one(current: str | None) -> tuple[Put | None, None]:
        return Put(str(int(current or "0") + 1), time.time() + 60), None

    async def hammer(store: Store) -> None:
        for _ in range(200):
            await store.update("n", plus_one, now=time.time())

    async def go() -> None:
        a, b = SqliteStore(path), SqliteStore(path)
        try:
            await asyncio.gather(hammer(a), hammer(b))
            assert await a.get("n", now=time.time()) == "400"
        finally:
            await a.close()
            await b.close()
    run(go())


def test_redis_keys_carry_a_ttl_matching_the_expiry(redis_url: str, redis_server: Any) -> None:
    """Redis drops entries by itself: the PX TTL is expires_at - now."""
    import redis

    async def go() -> None:
        store = open_store(redis_url + "?prefix=t1:")
        now = time.time()
        await store.set("k", "v", expires_at=now + 30, now=now)
        await store.incr("c", expires_at=now + 20, now=now)
        await store.update("u", lambda cur: (Put("x", now + 10), None), now=now)
        await store.set("forever", "v", expires_at=math.inf, now=now)
        await store.close()

    run(go())
    raw = redis.Redis(port=redis_server.port)
    assert 29_000 < raw.pttl("t1:k") <= 30_000
    assert 19_000 < raw.pttl("t1:c") <= 20_000
    assert 9_000 < raw.pttl("t1:u") <= 10_000
    assert raw.pttl("t1:forever") == -1
    assert raw.get("smtpguard:k") is None, "the prefix option replaces the default prefix"
    raw.close()


def test_a_redis_key_expires_on_the_server_by_itself(redis_url: str, redis_server: Any) -> None:
    """One short real TTL, because this is redis's clock, not ours."""
    import redis

    async def go() -> None:
        store = open_store(redis_url)
        now = time.time()
        await store.set("short", "v", expires_at=now + 0.05, now=now)
        await store.close()

    run(go())
    raw = redis.Redis(port=redis_server.port)
    deadline = time.monotonic() + 5
    while raw.exists("smtpguard:short") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not raw.exists("smtpguard:short")
    raw.close()


# -- failures ---------------------------------------------------------------

OPERATIONS: list[tuple[str, Callable[[Store, float], Awaitable[Any]]]] = [
    ("get", lambda s, now: s.get("k", now=now)),
    ("get_many", lambda s, now: s.get_many(["k", "j"], now=now)),
    ("set", lambda s, now: s.set("k", "v", expires_at=now + 60, now=now)),
    ("delete", lambda s, now: s.delete("k")),
    ("update", lambda s, now: s.update("k", lambda cur: (Put("v", now + 60), None), now=now)),
    ("incr", lambda s, now: s.incr("k", expires_at=now + 60, now=now)),
    ("scan", lambda s, now: items(s, "", now)),
    ("purge", lambda s, now: s.purge(now=now)),
    ("ping", lambda s, now: s.ping()),
]


def dead_redis_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"


def unwritable_sqlite_url(tmp_path: Path) -> str:
    # A path below a regular file cannot be created, even by root.
    (tmp_path / "a-file").write_text("")
    return f"sqlite://{tmp_path}/a-file/state.db"


# Redis purge is a no-op (key TTLs expire entries) and talks to no server.
FAILURE_CASES = [
    pytest.param(backend, op, id=f"{name} on {backend}")
    for backend in ("a stopped redis port", "an unwritable sqlite path")
    for name, op in OPERATIONS
    if not (name == "purge" and "redis" in backend)
]


@pytest.mark.parametrize("backend,operation", FAILURE_CASES)
def test_a_backend_that_cannot_answer_raises_store_error(
        backend: str, operation: Callable[[Store, float], Awaitable[Any]],
        tmp_path: Path) -> None:
    url = dead_redis_url() if "redis" in backend else unwritable_sqlite_url(tmp_path)

    async def go() -> None:
        store = open_store(url, timeout=0.5)
        try:
            with pytest.raises(StoreError):
                await operation(store, time.time())
        finally:
            try:
                await store.close()
            except StoreError:
                pass
    run(go())


def test_redis_going_away_under_a_live_store_raises_store_error(tmp_path: Path) -> None:
    """A store that worked, then lost its server: StoreError, not a redis
    exception, and it works again once a server is back on the port."""
    from tests.fixtures_redis import _redis_binary, start_redis
    server = start_redis(_redis_binary(), tmp_path)

    async def go() -> None:
        store = open_store(server.url, timeout=0.5)
        now = time.time()
        await store.set("k", "v", expires_at=now + 60, now=now)
        server.stop()
        with pytest.raises(StoreError):
            await store.get("k", now=now)
        await store.close()
    try:
        run(go())
    finally:
        server.stop() if server.process.poll() is None else None


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
def test_a_closed_store_raises_store_error(backend: str, tmp_path: Path) -> None:
    url = "memory://" if backend == "memory" else f"sqlite://{tmp_path}/s.db"

    async def go() -> None:
        store = open_store(url)
        await store.ping()
        await store.close()
        with pytest.raises(StoreError):
            await store.get("k", now=time.time())
    run(go())


# -- URLs ---------------------------------------------------------------------

GOOD_URLS = [
    ("memory://", "MemoryStore"),
    ("sqlite:///var/lib/smtpguard/state.db", "SqliteStore"),
    ("sqlite://relative/state.db?synchronous=full", "SqliteStore"),
    ("redis://127.0.0.1:6379/0", "RedisStore"),
    ("rediss://127.0.0.1:6380/1?prefix=mx:", "RedisStore"),
    ("redis+sentinel://10.0.0.1:26379,10.0.0.2/mymaster/2", "RedisStore"),
    ("redis+sentinel://:secret@[::1]:26379/mymaster", "RedisStore"),
]


@pytest.mark.parametrize("url,kind", GOOD_URLS, ids=[u for u, _ in GOOD_URLS])
def test_open_store_accepts_the_documented_urls_without_connecting(url: str, kind: str) -> None:
    store = open_store(url)
    assert type(store).__name__ == kind
    run(store.close()) if kind == "MemoryStore" else None


BAD_URLS = [
    ("an unknown scheme", "mysql://localhost/state"),
    ("no scheme at all", "/var/lib/smtpguard/state.db"),
    ("sqlite without a path", "sqlite://"),
    ("sqlite asking for an in-memory database", "sqlite://:memory:"),
    ("sqlite with an unknown option", "sqlite:///x.db?journal=off"),
    ("sqlite with a bad synchronous value", "sqlite:///x.db?synchronous=off"),
    ("memory with a path", "memory://somewhere"),
    ("sentinel without a service", "redis+sentinel://127.0.0.1:26379"),
    ("sentinel with a bad port", "redis+sentinel://127.0.0.1:port/svc"),
    ("sentinel with a non-numeric db", "redis+sentinel://127.0.0.1:26379/svc/zero"),
]


@pytest.mark.parametrize("url", [u for _, u in BAD_URLS], ids=[i for i, _ in BAD_URLS])
def test_a_bad_url_is_a_config_error_naming_state_url(url: str) -> None:
    with pytest.raises(ConfigError) as info:
        open_store(url)
    assert info.value.key == "state.url"
    assert url in info.value.message


def test_two_processes_can_open_the_same_sqlite_file_concurrently(tmp_path: Path) -> None:
    """WAL mode is set by whichever connection comes first; a second opener
    in the same instant must not fail (busy_timeout covers the schema)."""
    path = tmp_path / "state.db"

    async def go() -> None:
        stores = [SqliteStore(str(path)) for _ in range(4)]
        now = time.time()
        await asyncio.gather(*(s.set(f"k{i}", "v", expires_at=now + 60, now=now)
                               for i, s in enumerate(stores)))
        assert await stores[0].get_many([f"k{i}" for i in range(4)], now=now) == ["v"] * 4
        for s in stores:
            await s.close()
    run(go())
    import sqlite3
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_a_port_check_helper_really_finds_a_closed_port() -> None:
    """Guards the failure tests above: the 'dead' port refuses connections."""
    port = free_port()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
