"""Real SMTP parts for tests: a recording upstream (aiosmtpd) and smtpguard
itself, each on a free loopback port in a thread of its own."""

from __future__ import annotations

import asyncio
import io
import json
import os
import shutil
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pytest
from aiosmtpd.smtp import SMTP

from smtpguard import config as cfg


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01) -> Any:
    """A bounded wait on a condition (never a sleep as synchronisation)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    def can_connect() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False
    wait_for(can_connect, timeout)


def raw_ehlo(sock: socket.socket, f: Any, name: str = "c.test") -> None:
    """Send EHLO on a raw connection and read its multi-line reply (for pipelining tests)."""
    sock.sendall(f"EHLO {name}\r\n".encode("ascii"))
    while not f.readline().startswith(b"250 "):
        pass


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]
    xclient: dict[str, str]
    xforward: dict[str, str]
    helo: str
    tls: bool = False


class LoopThread:
    """An asyncio loop in a daemon thread, for servers the sync tests talk to."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


class RecorderSMTP(SMTP):
    """aiosmtpd plus XCLIENT/XFORWARD, as Postfix offers them to an authorised
    client. Like Postfix, it authorises XCLIENT against the client it names:
    after one XCLIENT the connection neither offers nor accepts another."""

    def __init__(self, recorder: "Recorder", *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.recorder = recorder
        self.xclient: dict[str, str] = {}
        self.xforward: dict[str, str] = {}

    async def smtp_EHLO(self, hostname: str) -> None:  # type: ignore[override]
        self.recorder.ehlos += 1
        await super().smtp_EHLO(hostname)

    async def smtp_XCLIENT(self, arg: str) -> None:
        if self.xclient or not self.recorder._xclient:
            await self.push("550 5.7.0 Error: insufficient authorization")   # Postfix's words
            return
        self.xclient = dict(a.split("=", 1) for a in (arg or "").split())
        self.recorder.xclients.append(dict(self.xclient))
        await self.push("220 recorder.test ESMTP")

    async def smtp_RSET(self, arg: str) -> None:
        self.recorder.rsets += 1
        await super().smtp_RSET(arg)

    async def smtp_QUIT(self, arg: str) -> None:
        self.recorder.quits += 1
        await super().smtp_QUIT(arg)

    async def smtp_XFORWARD(self, arg: str) -> None:
        self.xforward.update(dict(a.split("=", 1) for a in (arg or "").split()))
        await self.push("250 2.0.0 Ok")


class Recorder:
    """A recording upstream MTA: it keeps every message it accepted, byte for byte."""

    def __init__(self, xclient: bool = False, xforward: bool = False, tls: ssl.SSLContext | None = None,
                 smtputf8: bool = False, size: int | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self.messages: list[Received] = []
        self.refuse_rcpt: dict[str, str] = {}
        self.refuse_mail: dict[str, str] = {}
        self.data_reply: str | None = None
        self.delay_rcpt = 0.0
        self.xclients: list[dict[str, str]] = []
        self.ehlos = 0
        self.connections = 0
        self.rsets = 0
        self.quits = 0
        self._xclient = xclient
        self._xforward = xforward
        self._tls = tls
        self._smtputf8 = smtputf8
        self._size = size
        self._loop = LoopThread()
        self._server = self._loop.run(self._start())

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def _start(self) -> Any:
        recorder = self

        class Handler:
            async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str,
                                  responses: list[str]) -> list[str]:
                session.host_name = hostname
                extra = []
                if recorder._xclient and not server.xclient:
                    extra.append("250-XCLIENT NAME ADDR PROTO HELO REVERSE_NAME")
                if recorder._xforward:
                    extra.append("250-XFORWARD NAME ADDR PROTO HELO")
                return responses[:-1] + extra + responses[-1:]

            async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str,
                                  options: list[str]) -> str:
                if address in recorder.refuse_mail:
                    return recorder.refuse_mail[address]
                envelope.mail_from = address
                envelope.mail_options.extend(options)
                return "250 2.1.0 Ok"

            async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                                  options: list[str]) -> str:
                if recorder.delay_rcpt:
                    await asyncio.sleep(recorder.delay_rcpt)  # simulating a slow MTA, not synchronising
                if address in recorder.refuse_rcpt:
                    return recorder.refuse_rcpt[address]
                envelope.rcpt_tos.append(address)
                return "250 2.1.5 Ok"

            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                if recorder.data_reply:
                    return recorder.data_reply
                recorder.messages.append(Received(
                    envelope.mail_from, list(envelope.rcpt_tos), envelope.original_content,
                    list(envelope.mail_options), dict(server.xclient), dict(server.xforward),
                    session.host_name or "", session.ssl is not None))
                server.xforward = {}
                return "250 2.0.0 Ok: queued as TEST"

        def factory() -> RecorderSMTP:
            recorder.connections += 1
            return RecorderSMTP(recorder, Handler(), hostname="recorder.test", tls_context=recorder._tls,
                                data_size_limit=recorder._size, enable_SMTPUTF8=recorder._smtputf8)

        return await asyncio.get_running_loop().create_server(factory, self.host, self.port)

    def stop(self) -> None:
        self._loop.loop.call_soon_threadsafe(self._server.close)
        self._loop.stop()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    r = Recorder()
    yield r
    r.stop()


@pytest.fixture
def recorder_factory() -> Iterator[Callable[..., Recorder]]:
    """Recorders with options; request it before guard_factory so smtpguard stops first."""
    made: list[Recorder] = []

    def make(**kw: Any) -> Recorder:
        r = Recorder(**kw)
        made.append(r)
        return r

    yield make
    for r in made:
        r.stop()


class Guard:
    """smtpguard serving in a thread of its own, built from flags and a TOML document."""

    def __init__(self, doc: dict[str, Any] | None = None, clock: Callable[[], float] | None = None,
                 **flags: Any) -> None:
        from smtpguard.observe import log
        from smtpguard.server import Server
        from smtpguard.services import build_services

        flags.setdefault("listen", ["127.0.0.1:0"])
        flags.setdefault("domain", ["example.test"])
        flags.setdefault("hostname", "mx.example.test")
        # The screen's early-talker wait (6 s by default) only where a test asks for it.
        if "wait" not in (doc or {}).get("pregreet", {}):
            flags.setdefault("pregreet_wait", "0s")
        self.config = cfg.build(doc or {}, flags)
        self.log = io.StringIO()
        log.setup("json", "debug", stream=self.log)
        self._loop = LoopThread()
        self.services = build_services(self.config)
        if clock is not None:
            self.services.clock = clock
        self.server = Server(self.config, self.services)
        bound = self._loop.run(self.server.start())
        self.host, self.port = bound[0]

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The decision log so far, parsed (one JSON object per line)."""
        out = [json.loads(line) for line in self.log.getvalue().splitlines() if line.startswith("{")]
        return [e for e in out if name is None or e["event"] == name]

    def stop(self) -> None:
        self._loop.run(self.server.stop())
        self._loop.run(self.services.close())
        self._loop.stop()


@pytest.fixture
def guard_factory(dns_server: Any) -> Iterator[Callable[..., Guard]]:
    """smtpguard instances whose resolver is a DNS server of the test's own on
    loopback (never the system's): names it was not told about are NXDOMAIN."""
    guards: list[Guard] = []

    def make(doc: dict[str, Any] | None = None, **flags: Any) -> Guard:
        flags.setdefault("dns_server", [dns_server.address])
        g = Guard(doc, **flags)
        guards.append(g)
        return g

    yield make
    for g in guards:
        g.stop()


@pytest.fixture
def guard(recorder: Recorder, guard_factory: Callable[..., Guard]) -> Guard:
    return guard_factory(upstream=recorder.address)


@pytest.fixture
def smtp_sink() -> Iterator[tuple[str, int]]:
    """Postfix's smtp-sink as an upstream: a real, fast, independent SMTP server."""
    path = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    if not os.path.exists(path):
        if os.environ.get("CI"):
            pytest.fail("smtp-sink (Debian package postfix) is missing: .ci/run must install it")
        pytest.skip("smtp-sink (Debian package postfix) is not installed")
    port = free_port()
    # smtp-sink refuses to run as root without a user to drop privileges to.
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    proc = subprocess.Popen([path, *user, "-c", f"127.0.0.1:{port}", "100"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port)
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        proc.wait(5)
