"""Graylisting in live sessions: two proxies sharing one real redis-server,
sqlite state surviving a crash of the proxy process, and spamtraps."""

from __future__ import annotations

import signal
import smtplib
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.fixtures_smtp import Recorder, free_port, raw_ehlo, wait_for, wait_port

MESSAGE = b"Subject: graylist\r\n\r\nbody\r\n"
GRAYLIST_ALL = {"rule": [{"name": "graylist", "action": "graylist"}]}


def attempt(host: str, port: int, rcpt: str = "b@example.test", sender: str = "a@sender.test") -> tuple[int, bytes]:
    with smtplib.SMTP(host, port, timeout=10) as s:
        s.ehlo("c.test")
        s.mail(sender)
        code, text = s.rcpt(rcpt)
        if code == 250:
            s.data(MESSAGE)
        return code, text


def test_a_retry_on_the_other_node_passes(recorder: Recorder, guard_factory: Any, redis_url: str) -> None:
    now = [2_000_000.0]
    doc = {**GRAYLIST_ALL, "state": {"url": redis_url}}
    a = guard_factory(doc, clock=lambda: now[0], upstream=recorder.address)
    b = guard_factory(doc, clock=lambda: now[0], upstream=recorder.address)
    code, text = attempt(a.host, a.port)
    assert code == 451 and b"[GRAYLIST]" in text
    now[0] += 200  # past the 180 s delay
    # a retry through the other MX host, sharing the same Redis
    assert attempt(b.host, b.port)[0] == 250
    # and node A now knows the triplet too
    assert attempt(a.host, a.port)[0] == 250
    assert len(recorder.messages) == 2


def test_a_trap_on_one_node_is_seen_on_every_node(recorder: Recorder, guard_factory: Any, redis_url: str) -> None:
    doc = {"state": {"url": redis_url}, "graylist": {"traps": ["trap@example.test"]}}
    a = guard_factory(doc, upstream=recorder.address)
    b = guard_factory(doc, upstream=recorder.address)
    assert attempt(b.host, b.port)[0] == 250  # not trapped yet, and no graylist rule
    code, text = attempt(a.host, a.port, rcpt="trap@example.test")
    assert code == 550 and text.startswith(b"5.7.1 [TRAP] ")
    code, text = attempt(b.host, b.port)
    assert code == 550 and text.startswith(b"5.7.1 [TRAP] ")
    assert attempt(b.host, b.port, rcpt="postmaster@example.test")[0] == 250  # a human stays reachable


def test_store_down_tempfails_by_default_and_accepts_when_told(recorder: Recorder, guard_factory: Any) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    g = guard_factory({**GRAYLIST_ALL, "state": {"url": dead, "timeout": "0.5s"}}, upstream=recorder.address)
    code, text = attempt(g.host, g.port)
    assert code == 451 and text.startswith(b"4.3.0 [GRAYLIST-STORE] ")
    assert g.events("graylist.store_error")[0]["level"] == "error"
    g2 = guard_factory({**GRAYLIST_ALL, "state": {"url": dead, "timeout": "0.5s"}, "graylist": {"on_error": "accept"}},
                       upstream=recorder.address)
    assert attempt(g2.host, g2.port)[0] == 250


def test_sqlite_state_survives_a_crash_of_the_proxy(recorder: Recorder, tmp_path: Path, dns_server: Any) -> None:
    port = free_port()
    conf = tmp_path / "c.toml"
    conf.write_text(f"""
[server]
listen = ["127.0.0.1:{port}"]
hostname = "mx.example.test"
domains = ["example.test"]
[upstream]
address = "{recorder.address}"
[dns]
servers = ["{dns_server.address}"]
[state]
url = "sqlite:///{tmp_path}/state.db"
[graylist]
delay = "1s"
[[rule]]
name = "graylist"
action = "graylist"
""")

    def start() -> subprocess.Popen[bytes]:
        p = subprocess.Popen([sys.executable, "-m", "smtpguard", "serve", "--config", str(conf)],
                             stderr=subprocess.DEVNULL)
        wait_port("127.0.0.1", port)
        return p

    proxy = start()
    try:
        assert attempt("127.0.0.1", port)[0] == 451
        # the retry after the delay passes (a bounded wait on the condition, as a real MTA retries)
        wait_for(lambda: attempt("127.0.0.1", port)[0] == 250, timeout=15, interval=0.25)
        proxy.send_signal(signal.SIGKILL)  # a crash: no clean shutdown
        proxy.wait(10)
        proxy = start()
        # the passed triplet was on disk before the 250: no new deferral
        assert attempt("127.0.0.1", port)[0] == 250
    finally:
        proxy.terminate()
        proxy.wait(10)


def test_pipelined_recipients_get_one_decision_each(recorder: Recorder, guard_factory: Any) -> None:
    import socket
    now = [3_000_000.0]
    doc = {**GRAYLIST_ALL, "state": {"url": "memory://"}}
    g = guard_factory(doc, clock=lambda: now[0], upstream=recorder.address)

    def pipelined() -> list[bytes]:
        with socket.create_connection((g.host, g.port), timeout=10) as sock:
            f = sock.makefile("rb")
            f.readline()
            raw_ehlo(sock, f)
            sock.sendall(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.test>\r\nRCPT TO:<c@example.test>\r\n"
                         b"RCPT TO:<postmaster@example.test>\r\nRSET\r\nQUIT\r\n")
            codes = [f.readline()[:3] for _ in range(6)]
            f.close()
            return codes

    # each recipient its own triplet; postmaster@ is never graylisted (RFC 5321 §4.5.1)
    assert pipelined() == [b"250", b"451", b"451", b"250", b"250", b"221"]
    now[0] += 200
    assert pipelined() == [b"250", b"250", b"250", b"250", b"250", b"221"]
