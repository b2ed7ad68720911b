"""The state store: one small interface, three backends (sqlite, redis, memory).

Decides: nothing. Keeps short-lived state for the graylist, rate limits and
  the pregreet pass cache: string values under string keys, each with an
  absolute expiry time.
Inputs: keys, values, `now` and `expires_at` in epoch seconds. Every
  operation takes `now` from the caller, so expiry follows an injected clock in
  tests; an entry is visible while `expires_at > now` on every backend.
Output: values, counters, listings. `Put(value, expires_at)` is what an
  update function returns to write; `math.inf` means "never expires".
Failure modes: every backend error (unreachable redis, locked or unwritable
  sqlite file, timeouts) is raised as `StoreError` — never a raw redis or
  sqlite exception. `open_store` raises ConfigError("state.url", ...) for a
  URL it cannot use.
Defaults and why:
  - `sqlite:///var/lib/smtpguard/state.db`: durable on one host, no daemon.
    WAL mode (readers never wait for the writer), synchronous=NORMAL: in WAL
    mode a commit is in the OS before the call returns, so a crash or restart
    of smtpguard loses nothing it acknowledged; only a power cut or kernel
    crash can roll back the last commits, and losing graylist state costs a
    sender one more delay, never a message. `?synchronous=full` fsyncs every
    commit for those who want that too (bench/bench_graylist.py prints the
    cost). busy_timeout (the store timeout) and BEGIN IMMEDIATE for
    read-modify-write make several worker processes on one host safe. All sqlite calls run on one
    dedicated thread per store: the event loop never blocks on the file.
  - `redis://`, `rediss://`, `redis+sentinel://h:p,h:p/service/db`: shared by
    several MX hosts. Values are stored as `<expires_at>:<value>` with a
    relative PX TTL (expires_at - now): Redis expiry collects the garbage,
    the stored expiry keeps the `now` semantics identical to the other
    backends, and clock skew between nodes does not matter. Key prefix
    `smtpguard:` (`?prefix=` changes it). Read-modify-write reads, runs
    the (Python) update function, and writes with a Lua compare-and-set
    that fails if another node wrote in between (then it reads again);
    counters are one Lua script.
  - `memory://`: tests and one-off runs; LOSES ALL STATE ON RESTART and is
    not shared between processes.
  - timeout 2 s: redis socket and connect timeouts, sqlite's wait for
    another process's lock (a RCPT stage deadline is seconds). On Redis it
    is also the bound of a whole operation, its retry included; after an
    operation times out, operations fail at once (StoreError) for as long
    again, so that a frozen server (SIGSTOP, a stalled failover) costs a
    session one timeout, not one per RCPT and per round trip (issue 19
    item 8: 5 RCPTs took 20 s).
  - sqlite: the file's identity (device, inode) is checked before each
    operation; a state.db deleted or replaced under us is reopened (and
    logged as `store.reopened`) instead of writing on a deleted inode that
    the CLI no longer sees.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import math
import os
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, TypeVar
from urllib.parse import parse_qs, unquote

from smtpguard.errors import ConfigError, StoreError
from smtpguard.observe.log import event

R = TypeVar("R")
T = TypeVar("T")

DEFAULT_URL = "sqlite:///var/lib/smtpguard/state.db"
DEFAULT_REDIS_PREFIX = "smtpguard:"
# A store round trip is well under a millisecond; 2 s bounds a hung backend
# well inside the RCPT stage deadline (RFC 5321 §4.5.3.2: 5 min for RCPT).
DEFAULT_TIMEOUT = 2.0
# Rows per scan batch and per purge transaction: keeps each lock short.
BATCH = 1000
PURGE_BATCH = 10000
# Compare-and-set attempts for one redis update: N concurrent updaters of one
# key need at most N rounds; graylist keys see a handful at most.
MAX_UPDATE_ATTEMPTS = 100


@dataclass(frozen=True, slots=True)
class Put:
    """What an update function returns to write: the new value and expiry."""

    value: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class Item:
    """One live entry, as `scan` lists it."""

    key: str
    value: str
    expires_at: float


# An update function: given the current value (None when absent or expired),
# return (Put to write or None to leave it, result for the caller). It must be
# pure: the redis backend calls it again when another writer got there first.
Update = Callable[[str | None], tuple[Put | None, R]]


class Store(abc.ABC):
    """The state operations the graylist, rate limits and pregreet cache need.

    Every method is a coroutine and raises only StoreError.
    """

    url: str

    @abc.abstractmethod
    async def get(self, key: str, *, now: float) -> str | None:
        """The live value of `key`, or None."""

    @abc.abstractmethod
    async def get_many(self, keys: list[str], *, now: float) -> list[str | None]:
        """Values of several keys in one round trip, aligned with `keys`."""

    @abc.abstractmethod
    async def set(self, key: str, value: str, *, expires_at: float, now: float) -> None:
        """Write `key` unconditionally (an expiry <= now deletes it)."""

    @abc.abstractmethod
    async def delete(self, key: str) -> bool:
        """Remove `key`; True if it existed (expired or not)."""

    @abc.abstractmethod
    async def update(self, key: str, fn: Update[R], *, now: float) -> R:
        """Atomic read-modify-write of one key: `fn(current)` decides."""

    @abc.abstractmethod
    async def incr(self, key: str, amount: int = 1, *, expires_at: float, now: float) -> int:
        """Add to a counter and return it; a missing or expired counter starts
        at 0 with expiry `expires_at` (a fixed window, as rate limits count),
        a live one keeps its expiry."""

    @abc.abstractmethod
    def scan(self, prefix: str, *, now: float) -> AsyncIterator[Item]:
        """Live entries whose key starts with `prefix`, in batches."""

    @abc.abstractmethod
    async def purge(self, *, now: float) -> int:
        """Delete expired entries; the number removed. Idempotent, safe on
        several nodes at once (redis expires keys itself and returns 0)."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StoreError unless the backend answers (startup, health)."""

    async def check_writes(self, *, now: float) -> None:
        """Raise StoreError unless a write goes through: a probe key written
        and deleted (issue 19 item 8: a read-only sqlite file or a read-only
        Redis replica answers reads and fails every graylist write)."""
        key = f"probe:{os.getpid()}"
        await self.set(key, "1", expires_at=now + 60, now=now)
        await self.delete(key)

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and threads; the store is unusable after."""


def _counter(current: str | None) -> int:
    try:
        return int(current) if current is not None else 0
    except ValueError:
        return 0  # not a counter: start the window again


# ---------------------------------------------------------------------------
# memory://


class MemoryStore(Store):
    """In-process dict. LOSES ALL STATE ON RESTART; not shared between
    processes. Each operation runs without awaiting, so it is atomic on the
    event loop."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._data: dict[str, tuple[str, float]] = {}
        self._closed = False

    def _live(self, key: str, now: float) -> str | None:
        self._check()
        hit = self._data.get(key)
        if hit is None or hit[1] <= now:
            return None
        return hit[0]

    def _check(self) -> None:
        if self._closed:
            raise StoreError("memory store is closed")

    def _put(self, key: str, put: Put, now: float) -> None:
        if put.expires_at <= now:
            self._data.pop(key, None)
        else:
            self._data[key] = (put.value, put.expires_at)

    async def get(self, key: str, *, now: float) -> str | None:
        return self._live(key, now)

    async def get_many(self, keys: list[str], *, now: float) -> list[str | None]:
        return [self._live(k, now) for k in keys]

    async def set(self, key: str, value: str, *, expires_at: float, now: float) -> None:
        self._check()
        self._put(key, Put(value, expires_at), now)

    async def delete(self, key: str) -> bool:
        self._check()
        return self._data.pop(key, None) is not None

    async def update(self, key: str, fn: Update[R], *, now: float) -> R:
        put, result = fn(self._live(key, now))
        if put is not None:
            self._put(key, put, now)
        return result

    async def incr(self, key: str, amount: int = 1, *, expires_at: float, now: float) -> int:
        self._check()
        hit = self._data.get(key)
        if hit is not None and hit[1] > now:
            value, expires_at = _counter(hit[0]) + amount, hit[1]
        else:
            value = amount
        self._put(key, Put(str(value), expires_at), now)
        return value

    async def scan(self, prefix: str, *, now: float) -> AsyncIterator[Item]:
        self._check()
        keys = sorted(k for k in self._data if k.startswith(prefix))
        for key in keys:
            hit = self._data.get(key)
            if hit is not None and hit[1] > now:
                yield Item(key, hit[0], hit[1])

    async def purge(self, *, now: float) -> int:
        self._check()
        dead = [k for k, (_, x) in self._data.items() if x <= now]
        for key in dead:
            del self._data[key]
        return len(dead)

    async def ping(self) -> None:
        self._check()

    async def close(self) -> None:
        self._closed = True
        self._data.clear()


# ---------------------------------------------------------------------------
# sqlite:///path


_SCHEMA = (
    # WITHOUT ROWID: the key is the primary key, one b-tree lookup per get.
    "CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT NOT NULL, x REAL NOT NULL) WITHOUT ROWID",
    # purge walks expired rows by expiry instead of the whole table.
    "CREATE INDEX IF NOT EXISTS kv_expiry ON kv (x)",
)
_UPSERT = "INSERT INTO kv (k, v, x) VALUES (?, ?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v, x = excluded.x"
SYNCHRONOUS = ("normal", "full")


class SqliteStore(Store):
    """One sqlite file, one connection on one dedicated thread per store."""

    def __init__(self, path: str, *, synchronous: str = "normal",
                 timeout: float = DEFAULT_TIMEOUT, url: str = "") -> None:
        if synchronous not in SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS}")
        self.url = url or f"sqlite://{path}"
        self.path = path
        self._synchronous = synchronous
        self.timeout = timeout
        self._busy_ms = int(timeout * 1000)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="smtpguard-sqlite")
        self._conn: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None   # (st_dev, st_ino) of the open file
        self._closed = False

    # -- the store thread ---------------------------------------------------

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None and self._file_identity() != self._identity:
            # Deleted or replaced under us (an admin's rm, a restore): writes
            # would go to an inode no one else sees. Open the path again.
            event("store.reopened", logging.WARNING, url=self.url,
                  reason="state file deleted" if self._file_identity() is None else "state file replaced")
            self._conn.close()
            self._conn = None
        if self._conn is None:
            # isolation_level=None: no implicit transactions; we say BEGIN.
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            try:
                conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
                self._setup(conn)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
            self._identity = self._file_identity()
        return self._conn

    def _setup(self, conn: sqlite3.Connection) -> None:
        # Switching a new file to WAL needs the exclusive lock and sqlite
        # answers "locked" at once, without its busy handler, while another
        # process opens the same file: retry within the busy timeout. This
        # runs on the store thread, never on the event loop.
        deadline = time.monotonic() + self._busy_ms / 1000
        while True:
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    conn.execute("PRAGMA journal_mode = WAL")
                conn.execute(f"PRAGMA synchronous = {self._synchronous.upper()}")
                for statement in _SCHEMA:
                    conn.execute(statement)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.005)

    def _call(self, fn: Callable[[sqlite3.Connection], R]) -> R:
        if self._closed:
            raise StoreError(f"sqlite store {self.path} is closed")
        try:
            return fn(self._connect())
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"sqlite {self.path}: {exc}") from exc

    async def _run(self, fn: Callable[[sqlite3.Connection], R]) -> R:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, self._call, fn)
        except RuntimeError as exc:  # executor shut down
            raise StoreError(f"sqlite store {self.path} is closed") from exc

    @staticmethod
    def _write(conn: sqlite3.Connection, key: str, put: Put, now: float) -> None:
        if put.expires_at <= now:
            conn.execute("DELETE FROM kv WHERE k = ?", (key,))
        else:
            conn.execute(_UPSERT, (key, put.value, put.expires_at))

    @staticmethod
    def _transaction(conn: sqlite3.Connection, body: Callable[[], R]) -> R:
        # IMMEDIATE takes the write lock before reading, so two processes
        # cannot both read the old value and both write (busy_timeout waits).
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = body()
            conn.execute("COMMIT")
            return result
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # -- the interface ------------------------------------------------------

    async def get(self, key: str, *, now: float) -> str | None:
        def op(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT v FROM kv WHERE k = ? AND x > ?", (key, now)).fetchone()
            return None if row is None else str(row[0])
        return await self._run(op)

    async def get_many(self, keys: list[str], *, now: float) -> list[str | None]:
        if not keys:
            return []

        def op(conn: sqlite3.Connection) -> list[str | None]:
            found: dict[str, str] = {}
            # 500 stays under SQLITE_MAX_VARIABLE_NUMBER on every build.
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                marks = ",".join("?" * len(chunk))
                found.update(conn.execute(
                    f"SELECT k, v FROM kv WHERE k IN ({marks}) AND x > ?", (*chunk, now)))
            return [found.get(k) for k in keys]
        return await self._run(op)

    async def set(self, key: str, value: str, *, expires_at: float, now: float) -> None:
        await self._run(lambda conn: self._write(conn, key, Put(value, expires_at), now))

    async def delete(self, key: str) -> bool:
        return await self._run(lambda conn: conn.execute("DELETE FROM kv WHERE k = ?", (key,)).rowcount > 0)

    async def update(self, key: str, fn: Update[R], *, now: float) -> R:
        def op(conn: sqlite3.Connection) -> R:
            def body() -> R:
                row = conn.execute("SELECT v FROM kv WHERE k = ? AND x > ?", (key, now)).fetchone()
                put, result = fn(None if row is None else str(row[0]))
                if put is not None:
                    self._write(conn, key, put, now)
                return result
            return self._transaction(conn, body)
        return await self._run(op)

    async def incr(self, key: str, amount: int = 1, *, expires_at: float, now: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            def body() -> int:
                row = conn.execute("SELECT v, x FROM kv WHERE k = ? AND x > ?", (key, now)).fetchone()
                value, expiry = (_counter(row[0]) + amount, float(row[1])) if row else (amount, expires_at)
                self._write(conn, key, Put(str(value), expiry), now)
                return value
            return self._transaction(conn, body)
        return await self._run(op)

    async def scan(self, prefix: str, *, now: float) -> AsyncIterator[Item]:
        # Keyset pagination over the primary key: each batch is one short
        # read, nothing is held between batches.
        upper = _prefix_upper(prefix)
        after = ""
        while True:
            def op(conn: sqlite3.Connection, after: str = after) -> list[tuple[str, str, float]]:
                sql = "SELECT k, v, x FROM kv WHERE k >= ? AND k > ? AND x > ?"
                params: list[Any] = [prefix, after, now]
                if upper is not None:
                    sql += " AND k < ?"
                    params.append(upper)
                return conn.execute(sql + f" ORDER BY k LIMIT {BATCH}", params).fetchall()
            rows = await self._run(op)
            for k, v, x in rows:
                yield Item(k, v, float(x))
            if len(rows) < BATCH:
                return
            after = rows[-1][0]

    async def purge(self, *, now: float) -> int:
        def op(conn: sqlite3.Connection) -> int:
            # Short transactions: other processes' writers wait for one batch
            # at most, never for the whole purge.
            total = 0
            while True:
                n = conn.execute(
                    "DELETE FROM kv WHERE k IN (SELECT k FROM kv WHERE x <= ? LIMIT ?)",
                    (now, PURGE_BATCH)).rowcount
                total += n
                if n < PURGE_BATCH:
                    return total
        return await self._run(op)

    async def ping(self) -> None:
        await self._run(lambda conn: conn.execute("SELECT 1 FROM kv LIMIT 1").fetchall())

    async def close(self) -> None:
        if self._closed:
            return

        def op() -> None:
            # Set on the store thread: an operation queued behind close()
            # finds the store closed instead of reopening the file.
            self._closed = True
            if self._conn is not None:
                self._conn.close()
                self._conn = None
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, op)
        self._executor.shutdown(wait=False)


def _prefix_upper(prefix: str) -> str | None:
    """The smallest string above every string starting with `prefix`."""
    while prefix:
        last = ord(prefix[-1])
        if last < 0x10FFFF:
            return prefix[:-1] + chr(last + 1)
        prefix = prefix[:-1]
    return None


# ---------------------------------------------------------------------------
# redis://, rediss://, redis+sentinel://

# Counter in one step on the server: GET, drop an expired value, add, SET
# with the remaining lifetime. ARGV: now, amount, expires_at for a new window.
_INCR_LUA = """
local raw = redis.call('GET', KEYS[1])
local now = tonumber(ARGV[1])
local value = 0
local expiry = ARGV[3]
if raw then
  local sep = string.find(raw, ':', 1, true)
  if sep then
    local x = tonumber(string.sub(raw, 1, sep - 1))
    if x == nil or x > now then
      value = tonumber(string.sub(raw, sep + 1)) or 0
      expiry = string.sub(raw, 1, sep - 1)
    end
  end
end
value = value + tonumber(ARGV[2])
local encoded = expiry .. ':' .. string.format('%d', value)
local x = tonumber(expiry)
if x == nil or x == math.huge then
  redis.call('SET', KEYS[1], encoded)
else
  local ms = math.ceil((x - now) * 1000)
  if ms < 1 then ms = 1 end
  redis.call('SET', KEYS[1], encoded, 'PX', ms)
end
return value
"""


# Compare-and-set: write only if the key still holds the raw value the caller
# read. ARGV: expected raw, "1" if a value was read ("0": it was absent), new
# raw value, PX milliseconds ("0": no expiry, "del": delete). 1 if written.
_CAS_LUA = """
local cur = redis.call('GET', KEYS[1])
if ARGV[2] == '1' then
  if cur ~= ARGV[1] then return 0 end
elseif cur then
  return 0
end
if ARGV[4] == 'del' then
  redis.call('DEL', KEYS[1])
elseif ARGV[4] == '0' then
  redis.call('SET', KEYS[1], ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[3], 'PX', ARGV[4])
end
return 1
"""


def _encode_expiry(expires_at: float) -> str:
    return "inf" if math.isinf(expires_at) else repr(float(expires_at))  # round-trips exactly


def _redis_decode(raw: str | None, now: float) -> tuple[str, float] | None:
    if raw is None:
        return None
    expiry, sep, value = raw.partition(":")
    try:
        x = float(expiry)
    except ValueError:
        return None
    if not sep or x <= now:
        return None
    return value, x


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisStore(Store):
    """Several nodes share state through one redis (or a sentinel-managed
    master). Keys are `<prefix><key>`."""

    def __init__(self, client: Any, *, prefix: str = DEFAULT_REDIS_PREFIX, url: str = "",
                 closers: Iterable[Any] = (), timeout: float = DEFAULT_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self.timeout = timeout
        self._clock = clock
        self._down_until = 0.0   # after a timeout: fail at once until then
        self._r = client
        self._prefix = prefix
        self._closers = list(closers)
        self._incr = client.register_script(_INCR_LUA)
        self._cas = client.register_script(_CAS_LUA)

    async def _do(self, op: Callable[[], Awaitable[T]]) -> T:
        from redis.exceptions import RedisError
        from redis.exceptions import TimeoutError as RedisTimeout
        if self._clock() < self._down_until:
            raise StoreError(f"redis {self.url}: timed out less than {self.timeout:g} s ago; not asked")
        try:
            return await asyncio.wait_for(op(), self.timeout)
        except (asyncio.TimeoutError, RedisTimeout) as exc:
            self._down_until = self._clock() + self.timeout
            raise StoreError(f"redis {self.url}: no answer within {self.timeout:g} s") from exc
        except (RedisError, OSError) as exc:
            raise StoreError(f"redis {self.url}: {type(exc).__name__}: {exc}") from exc

    def _k(self, key: str) -> str:
        return self._prefix + key

    def _px(self, expires_at: float, now: float) -> int | None:
        if math.isinf(expires_at):
            return None
        return max(1, math.ceil((expires_at - now) * 1000))

    async def get(self, key: str, *, now: float) -> str | None:
        hit = _redis_decode(await self._do(lambda: self._r.get(self._k(key))), now)
        return None if hit is None else hit[0]

    async def get_many(self, keys: list[str], *, now: float) -> list[str | None]:
        if not keys:
            return []
        raws = await self._do(lambda: self._r.mget([self._k(k) for k in keys]))
        out: list[str | None] = []
        for raw in raws:
            hit = _redis_decode(raw, now)
            out.append(None if hit is None else hit[0])
        return out

    async def set(self, key: str, value: str, *, expires_at: float, now: float) -> None:
        if expires_at <= now:
            await self._do(lambda: self._r.delete(self._k(key)))
            return
        encoded = f"{_encode_expiry(expires_at)}:{value}"
        await self._do(lambda: self._r.set(self._k(key), encoded, px=self._px(expires_at, now)))

    async def delete(self, key: str) -> bool:
        return bool(await self._do(lambda: self._r.delete(self._k(key))))

    async def update(self, key: str, fn: Update[R], *, now: float) -> R:
        # Optimistic: read, decide in Python, then write only if the raw
        # value is still what was read (one Lua compare-and-set, atomic on
        # the server). Two round trips; a lost race reads again.
        k = self._k(key)
        for _ in range(MAX_UPDATE_ATTEMPTS):
            raw = await self._do(lambda: self._r.get(k))
            hit = _redis_decode(raw, now)
            put, result = fn(None if hit is None else hit[0])
            if put is None:
                return result
            if put.expires_at <= now:
                args = [raw or "", "1" if raw is not None else "0", "", "del"]
            else:
                px = self._px(put.expires_at, now)
                args = [raw or "", "1" if raw is not None else "0",
                        f"{_encode_expiry(put.expires_at)}:{put.value}", str(px or 0)]
            if await self._do(lambda: self._cas(keys=[k], args=args)):
                return result
        raise StoreError(f"redis {self.url}: {key!r} changed under {MAX_UPDATE_ATTEMPTS} attempts")

    async def incr(self, key: str, amount: int = 1, *, expires_at: float, now: float) -> int:
        args = [repr(now), str(amount), _encode_expiry(expires_at)]
        return int(await self._do(lambda: self._incr(keys=[self._k(key)], args=args)))

    async def scan(self, prefix: str, *, now: float) -> AsyncIterator[Item]:
        pattern = _glob_escape(self._prefix + prefix) + "*"
        cut = len(self._prefix)
        cursor: int = 0
        while True:
            cursor, keys = await self._do(
                lambda: self._r.scan(cursor=cursor, match=pattern, count=BATCH))
            if keys:
                raws = await self._do(lambda: self._r.mget(keys))
                for full, raw in zip(keys, raws):
                    hit = _redis_decode(raw, now)
                    if hit is not None:
                        yield Item(full[cut:], hit[0], hit[1])
            if cursor == 0:
                return

    async def purge(self, *, now: float) -> int:
        return 0  # key TTLs expire entries on the server

    async def ping(self) -> None:
        await self._do(lambda: self._r.ping())

    async def close(self) -> None:
        self._down_until = 0.0  # closing is always tried (it frees our sockets)
        await self._do(lambda: self._r.aclose())
        for other in self._closers:
            await self._do(lambda: other.aclose())


# ---------------------------------------------------------------------------
# open_store


def open_store(url: str, *, timeout: float = DEFAULT_TIMEOUT) -> Store:
    """A store for `url`; ConfigError("state.url", ...) if it cannot be used.

    Connections are made on first use: an unreachable backend shows as
    StoreError from the operations (call `ping()` to check at start).
    """
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    opener = _OPENERS.get(scheme)
    if opener is None:
        raise ConfigError("state.url", f"{url!r}: expected sqlite:///path, redis://host:port/db, "
                          f"rediss://…, redis+sentinel://host:port,host:port/service/db or memory://")
    return opener(url, timeout)


def _open_memory(url: str, timeout: float) -> Store:
    if url.rstrip("/") != "memory:":
        raise ConfigError("state.url", f"{url!r}: memory:// takes no path or options")
    return MemoryStore(url)


def _open_sqlite(url: str, timeout: float) -> Store:
    if not url.startswith("sqlite://"):
        raise ConfigError("state.url", f"{url!r}: write sqlite:///absolute/path or sqlite://relative/path")
    rest = url[len("sqlite://"):]
    path, _, query = rest.partition("?")
    path = unquote(path)
    if not path or path == ":memory:":
        raise ConfigError("state.url", f"{url!r}: needs a file path (use memory:// for no file)")
    options = parse_qs(query)
    unknown = set(options) - {"synchronous"}
    if unknown:
        raise ConfigError("state.url", f"{url!r}: unknown option {sorted(unknown)[0]!r}; allowed: synchronous")
    synchronous = options.get("synchronous", ["normal"])[-1].lower()
    if synchronous not in SYNCHRONOUS:
        raise ConfigError("state.url", f"{url!r}: synchronous must be normal or full")
    return SqliteStore(path, synchronous=synchronous, timeout=timeout, url=url)


def _split_prefix(url: str) -> tuple[str, str]:
    """Take our own `prefix=` option out of the query (redis-py would pass an
    unknown option to its connection class)."""
    base, _, query = url.partition("?")
    prefix = DEFAULT_REDIS_PREFIX
    kept = []
    for part in query.split("&") if query else []:
        name, _, value = part.partition("=")
        if name == "prefix":
            prefix = unquote(value)
        else:
            kept.append(part)
    return (base + ("?" + "&".join(kept) if kept else "")), prefix


def _redis_options(timeout: float) -> dict[str, Any]:
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    return {
        "decode_responses": True,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        # One immediate retry covers a pooled connection the server closed;
        # redis-py's default backs off for seconds, longer than a RCPT waits.
        "retry": Retry(NoBackoff(), 1),
    }


def _open_redis(url: str, timeout: float) -> Store:
    import redis.asyncio as aioredis
    plain, prefix = _split_prefix(url)
    try:
        client = aioredis.Redis.from_url(plain, **_redis_options(timeout))
    except (ValueError, TypeError) as exc:
        raise ConfigError("state.url", f"{url!r}: {exc}") from None
    return RedisStore(client, prefix=prefix, url=url, timeout=timeout)


def _open_sentinel(url: str, timeout: float) -> Store:
    from redis.asyncio.sentinel import Sentinel
    plain, prefix = _split_prefix(url)
    rest = plain[len("redis+sentinel://"):]
    rest, _, query = rest.partition("?")
    if query:
        raise ConfigError("state.url", f"{url!r}: redis+sentinel:// takes only the prefix= option")
    netloc, _, path = rest.partition("/")
    password: str | None = None
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        password = unquote(userinfo.partition(":")[2]) or None
    sentinels: list[tuple[str, int]] = []
    for hostport in filter(None, netloc.split(",")):
        if hostport.startswith("["):
            host, _, port = hostport[1:].partition("]")
            port = port.lstrip(":")
        else:
            host, _, port = hostport.partition(":")
        try:
            # 26379: the sentinel port redis documents.
            sentinels.append((host, int(port) if port else 26379))
        except ValueError:
            raise ConfigError("state.url", f"{url!r}: bad sentinel port in {hostport!r}") from None
    parts = [p for p in path.split("/") if p]
    if not sentinels or not parts or len(parts) > 2:
        raise ConfigError("state.url", f"{url!r}: expected redis+sentinel://host:port,host:port/service/db")
    try:
        db = int(parts[1]) if len(parts) == 2 else 0
    except ValueError:
        raise ConfigError("state.url", f"{url!r}: the database must be a number") from None
    options = _redis_options(timeout)
    sentinel_options = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    sentinel = Sentinel(sentinels, sentinel_kwargs=sentinel_options)  # type: ignore[no-untyped-call]
    client = sentinel.master_for(parts[0], db=db, password=password, **options)
    return RedisStore(client, prefix=prefix, url=url, closers=sentinel.sentinels, timeout=timeout)


_OPENERS: dict[str, Callable[[str, float], Store]] = {
    "memory": _open_memory,
    "sqlite": _open_sqlite,
    "redis": _open_redis,
    "rediss": _open_redis,
    "redis+sentinel": _open_sentinel,
}
