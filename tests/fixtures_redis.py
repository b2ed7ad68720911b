"""Fixtures for a real redis-server process on loopback.

`redis_url`: one redis-server per test session (no persistence), emptied
before each test with FLUSHDB. `redis_sentinel_url`: the same server behind a
real redis sentinel (redis-server --sentinel), for the redis+sentinel:// URL.
Without a redis-server binary the tests are skipped, or fail when the CI
environment variable is set (CI must not silently skip the shared-state tests).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT = 10.0   # seconds for redis-server to answer PING
STOP_TIMEOUT = 5.0
SENTINEL_SERVICE = "smtpguard"


def free_port() -> int:
    """A loopback TCP port nobody listens on (right now)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _command(port: int, *words: str, timeout: float = 1.0) -> bytes:
    """Send one inline command to a redis port, return the first reply line."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(" ".join(words).encode() + b"\r\n")
        buf = b""
        while not buf.endswith(b"\r\n"):
            chunk = s.recv(4096)
            if not chunk:
                break
            buf += chunk
        return buf


def _wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.02)  # polling interval of a bounded wait, not a synchronisation
    raise RuntimeError(f"{what} did not come up within {timeout:.0f} s")


def _redis_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        message = "redis-server is not installed (Debian: apt-get install redis-server)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@dataclass
class RedisProcess:
    port: int
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(STOP_TIMEOUT)


def start_redis(binary: str, workdir: Path, *extra: str, check: str = "PING",
                expect: bytes = b"+PONG") -> RedisProcess:
    """Start redis-server on a free loopback port, bounded wait for `check`."""
    last: Exception | None = None
    for _ in range(3):  # the free port may be taken between probe and bind
        port = free_port()
        process = subprocess.Popen(
            [binary, *extra, "--port", str(port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        server = RedisProcess(port, process)
        try:
            _wait_until(lambda: process.poll() is None
                        and _command(port, *check.split()).startswith(expect),
                        START_TIMEOUT, f"redis-server on port {port}")
            return server
        except RuntimeError as exc:
            last = exc
            server.stop()
    raise RuntimeError(f"could not start redis-server: {last}")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    binary = _redis_binary()
    server = start_redis(binary, tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisProcess) -> str:
    """redis://127.0.0.1:PORT/0 of a real, empty redis-server."""
    reply = _command(redis_server.port, "FLUSHDB")
    assert reply.startswith(b"+OK"), reply
    return redis_server.url


@pytest.fixture(scope="session")
def redis_sentinel(redis_server: RedisProcess,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    binary = _redis_binary()
    workdir = tmp_path_factory.mktemp("sentinel")
    conf = workdir / "sentinel.conf"  # sentinel rewrites its config: must be writable
    conf.write_text(f"sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {redis_server.port} 1\n")
    sentinel = start_redis(binary, workdir, str(conf), "--sentinel",
                           check=f"SENTINEL get-master-addr-by-name {SENTINEL_SERVICE}",
                           expect=b"*2")
    yield sentinel
    sentinel.stop()


@pytest.fixture
def redis_sentinel_url(redis_url: str, redis_sentinel: RedisProcess) -> str:
    """redis+sentinel://127.0.0.1:PORT/smtpguard/0 naming the redis_url server."""
    return f"redis+sentinel://127.0.0.1:{redis_sentinel.port}/{SENTINEL_SERVICE}/0"
