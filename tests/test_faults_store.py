"""Issue 19 item 8, the state store: start-up checks write as well as read,
a deleted state.db is noticed, and a frozen Redis (a real redis-server,
SIGSTOPped) costs a session one timeout, not one per RCPT."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from smtpguard.adapters.store import SqliteStore, open_store
from smtpguard.errors import StoreError
from smtpguard.observe import log as obslog
from smtpguard.sources import graylist
from tests.fixtures_redis import RedisProcess, _redis_binary, start_redis
from tests.fixtures_smtp import free_port

NOW = 1_800_000_000.0
GRAYLIST = "[[rule]]\nname = 'graylist'\nstage = 'rcpt'\naction = 'graylist'\n"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


# -- a read-only state.db is a start-up error ------------------------------------------

def _unprivileged() -> list[str]:
    """Root writes a read-only file anyway: run the server as nobody then."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv (util-linux) to drop privileges")
    return [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups"]


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another user can read (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="sg-faults-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_read_only_state_db_is_exit_2_naming_state_url(shared_dir: Path) -> None:
    db = shared_dir / "state.db"
    store = SqliteStore(str(db))
    run(store.ping())
    run(store.close())
    # The file is read-only, its directory is not: sqlite opens it, makes its
    # -wal/-shm files and answers reads (the old check passed); only writes fail.
    for name in os.listdir(shared_dir):
        os.chmod(shared_dir / name, 0o444)
    conf = shared_dir / "c.toml"
    conf.write_text(f"[state]\nurl = 'sqlite://{db}'\n{GRAYLIST}")
    shared_dir.chmod(0o777)
    port = free_port()
    r = subprocess.run([*_unprivileged(), sys.executable, "-m", "smtpguard", "serve", "--config", str(conf),
                        "--listen", f"127.0.0.1:{port}", "--upstream", "127.0.0.1:2526",
                        "--domain", "example.test"],
                       capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parent.parent,
                       env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)))
    assert r.returncode == 2, r.stderr          # was: started, then 451 [GRAYLIST-STORE] forever
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "state.url" in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_check_writes_fails_on_a_read_only_file_and_passes_on_a_writable_one(shared_dir: Path) -> None:
    db = shared_dir / "w.db"
    store = SqliteStore(str(db))
    run(store.check_writes(now=NOW))        # writable: fine, and the probe is gone
    assert run(store.get(f"probe:{os.getpid()}", now=NOW)) is None
    run(store.close())


# -- a deleted state.db ----------------------------------------------------------------

def test_a_deleted_state_db_is_reopened_and_logged(tmp_path: Path) -> None:
    stream = io.StringIO()
    obslog.setup("json", "info", stream)
    db = tmp_path / "state.db"
    try:
        async def main() -> tuple[str | None, str | None]:
            store = SqliteStore(str(db))
            try:
                await store.set("k", "before", expires_at=NOW + 60, now=NOW)
                for suffix in ("", "-wal", "-shm"):
                    if os.path.exists(f"{db}{suffix}"):
                        os.unlink(f"{db}{suffix}")
                await store.set("k2", "after", expires_at=NOW + 60, now=NOW)
                return await store.get("k", now=NOW), await store.get("k2", now=NOW)
            finally:
                await store.close()

        old, new = run(main())
    finally:
        obslog.setup("text", "warning")
    assert old is None and new == "after"
    assert db.exists()
    # What the CLI sees is what the server wrote (it was a deleted inode before).
    other = SqliteStore(str(db))
    assert run(other.get("k2", now=NOW)) == "after"
    run(other.close())
    events = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [e["reason"] for e in events if e["event"] == "store.reopened"] == ["state file deleted"]


# -- a frozen Redis --------------------------------------------------------------------

@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server of this test's own (it gets SIGSTOPped)."""
    server = start_redis(_redis_binary(), tmp_path)
    yield server
    try:
        os.kill(server.process.pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
    server.stop()


def test_a_sigstopped_redis_costs_a_session_one_timeout_not_one_per_rcpt(own_redis: RedisProcess) -> None:
    timeout = 0.5
    settings = graylist.GraylistSettings()

    async def main() -> tuple[list[str], float, list[str]]:
        store = open_store(own_redis.url, timeout=timeout)
        try:
            await store.ping()
            os.kill(own_redis.process.pid, signal.SIGSTOP)
            start = time.monotonic()
            got = []
            for i in range(5):   # five RCPTs of one session
                fact = await graylist.check(store, settings, ip="192.0.2.1", rdns_confirmed_domain=None,
                                            sender="a@b.t", rcpt=f"u{i}@ours.t", strict=False, now=NOW)
                got.append(fact.graylist)
            took = time.monotonic() - start
            os.kill(own_redis.process.pid, signal.SIGCONT)
            # back: once the hold-off is over the store answers again (a
            # bounded wait on that condition)
            for _ in range(100):
                fact = await graylist.check(store, settings, ip="192.0.2.1", rdns_confirmed_domain=None,
                                            sender="a@b.t", rcpt="u9@ours.t", strict=False, now=NOW)
                if fact.graylist != "unknown":
                    break
                await asyncio.sleep(0.05)
            return got, took, [fact.graylist]
        finally:
            os.kill(own_redis.process.pid, signal.SIGCONT)
            try:
                await store.close()
            except StoreError:
                pass

    got, took, after = run(main())
    assert got == ["unknown"] * 5
    # One timeout (0.5 s) for the first RCPT, the rest fail at once. Before:
    # one socket timeout per round trip and its retry, for every RCPT
    # (5 x 2 x 2 x 0.5 s here); the bound leaves room for a loaded machine.
    assert took < 4 * timeout, took
    assert after == ["new"]
