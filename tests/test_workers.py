"""`server.workers = N`: several processes on one address, signals forwarded."""

from __future__ import annotations

import json
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_smtp import Recorder, free_port, wait_for, wait_port


def test_two_workers_share_the_port_reload_and_stop(tmp_path: Path, recorder: Recorder) -> None:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "smtpguard", "serve", "--listen", f"127.0.0.1:{port}",
                             "--upstream", recorder.address, "--domain", "example.test", "--hostname",
                             "mx.example.test", "--workers", "2", "--log-format", "json"],
                            stderr=subprocess.PIPE, text=True)
    events: list[dict[str, Any]] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("{"):
                events.append(json.loads(line))

    threading.Thread(target=read, daemon=True).start()
    try:
        wait_for(lambda: sum(e["event"] == "listening" for e in events) == 2)
        wait_port("127.0.0.1", port)
        for n in range(20):
            with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
                s.sendmail("a@sender.test", ["b@example.test"], f"Subject: {n}\r\n\r\nbody\r\n".encode())
        assert len(recorder.messages) == 20
        proc.send_signal(signal.SIGHUP)  # no --config: each worker says so
        wait_for(lambda: sum(e["event"] == "reload.skipped" for e in events) == 2)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert proc.returncode == 0
    assert sum(e["event"] == "stopped" for e in events) == 2


def _reuseport_listener() -> "socket.socket":
    """Another process's listener that allows SO_REUSEPORT (as a second smtpguard had)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


@pytest.mark.parametrize("workers", ["1", "2"])
def test_an_address_another_process_listens_on_is_exit_2_naming_it(workers: str) -> None:
    """Issue 11 item 3: never share a port by accident, with or without SO_REUSEPORT on the other side."""
    for blocker in (_reuseport_listener(), socket.create_server(("127.0.0.1", 0))):
        port = blocker.getsockname()[1]
        try:
            r = subprocess.run([sys.executable, "-m", "smtpguard", "serve", "--listen", f"127.0.0.1:{port}",
                                "--upstream", "127.0.0.1:1", "--domain", "example.test", "--hostname",
                                "mx.example.test", "--workers", workers], capture_output=True, text=True, timeout=60)
        finally:
            blocker.close()
        assert r.returncode == 2, r.stderr
        assert f"127.0.0.1:{port} is already in use by another process" in r.stderr
        assert "server.listen" in r.stderr and "Traceback" not in r.stderr
        assert "listening" not in r.stderr


def test_too_many_workers_is_a_config_error() -> None:
    n = 4 * (os.cpu_count() or 1) + 1
    r = subprocess.run([sys.executable, "-m", "smtpguard", "serve", "--listen", "127.0.0.1:0", "--upstream",
                        "127.0.0.1:1", "--domain", "example.test", "--workers", str(n)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--workers" in r.stderr and "at most" in r.stderr, r.stderr


class Supervisor:
    """`serve --workers 2 --config F` as a process, its JSON log collected."""

    def __init__(self, conf: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "smtpguard", "serve", "--config", str(conf),
                                      "--log-format", "json"], stderr=subprocess.PIPE, text=True)
        self.events: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if line.startswith("{"):
                self.events.append(json.loads(line))

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in list(self.events) if e["event"] == name]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)


def _conf(path: Path, port: int, upstream: str, hostname: str) -> None:
    path.write_text(f"""
[server]
listen = ["127.0.0.1:{port}"]
hostname = "{hostname}"
domains = ["example.test"]
workers = 2
[pregreet]
wait = "0s"
[upstream]
address = "{upstream}"
""")


def _banner(port: int) -> str:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        return s.ehlo("c.test")[1].decode().split()[0]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_sighup_while_a_restarted_worker_starts_neither_kills_it_nor_the_supervisor(tmp_path: Path) -> None:
    """Issue 19 item 9: SIGKILL a worker, SIGHUP while its successor starts (its upstream probe
    holds the start for PROBE_WAIT against a silent MTA): the successor lives, reloads, serves."""
    silent = socket.create_server(("127.0.0.1", 0))  # accepts in the backlog, never greets
    port = free_port()
    conf = tmp_path / "smtpguard.toml"
    _conf(conf, port, f"127.0.0.1:{silent.getsockname()[1]}", "mx.example.test")
    sup = Supervisor(conf)
    try:
        wait_for(lambda: len(sup.named("listening")) == 2, timeout=30)
        victim = sup.named("worker.started")[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: any(e.get("restarted") for e in sup.named("worker.started")), timeout=15)
        sup.proc.send_signal(signal.SIGHUP)   # the fresh worker is still in its start-up
        fresh = [e for e in sup.named("worker.started") if e.get("restarted")][0]["pid"]
        wait_for(lambda: len(sup.named("listening")) == 3, timeout=15)
        # both workers reload, the fresh one once it listens
        wait_for(lambda: len(sup.named("reload.done")) == 2, timeout=15)
        assert sup.proc.poll() is None and _alive(fresh)
        assert not [e for e in sup.named("worker.exited") if e["pid"] == fresh]
        assert _banner(port) == "mx.example.test"
    finally:
        sup.stop()
        silent.close()
    assert sup.proc.returncode == 0


def test_a_restarted_worker_runs_the_latest_good_config(tmp_path: Path, recorder: Recorder) -> None:
    port = free_port()
    conf = tmp_path / "smtpguard.toml"
    _conf(conf, port, recorder.address, "mx1.example.test")
    sup = Supervisor(conf)
    try:
        wait_for(lambda: len(sup.named("listening")) == 2, timeout=30)
        _conf(conf, port, recorder.address, "mx2.example.test")
        sup.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(sup.named("reload.done")) == 2, timeout=15)
        conf.write_text("[server\nbroken")      # the next reload fails: mx2 stays the latest good
        sup.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: len(sup.named("reload.failed")) == 3, timeout=15)   # the supervisor and both workers
        for started in sup.named("worker.started")[:2]:
            os.kill(started["pid"], signal.SIGKILL)
        wait_for(lambda: len(sup.named("listening")) == 4, timeout=30)
        banners = {_banner(port) for _ in range(12)}
        assert banners == {"mx2.example.test"}
    finally:
        sup.stop()


def test_workers_die_with_a_killed_supervisor(tmp_path: Path, recorder: Recorder) -> None:
    """Issue 19 item 9: no worker keeps serving an old config after its supervisor is SIGKILLed."""
    port = free_port()
    conf = tmp_path / "smtpguard.toml"
    _conf(conf, port, recorder.address, "mx.example.test")
    sup = Supervisor(conf)
    try:
        wait_for(lambda: len(sup.named("listening")) == 2, timeout=30)
        pids = [e["pid"] for e in sup.named("worker.started")]
        assert all(_alive(p) for p in pids)
        sup.proc.kill()
        sup.proc.wait(10)
        wait_for(lambda: not any(_alive(p) for p in pids), timeout=15)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        for pid in [e["pid"] for e in sup.named("worker.started")]:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


class SlowMTA:
    """An MTA that takes `delay` to answer the end of DATA (after it has the message)."""

    def __init__(self, delay: float) -> None:
        self.delay, self.arrived, self.delivered = delay, 0, 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        import asyncio

        self.arrived += 1
        await asyncio.sleep(self.delay)   # the MTA's own slowness, not synchronisation
        self.delivered += 1
        return "250 2.0.0 queued"


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_waits_for_the_mtas_end_of_data_reply(workers: str) -> None:
    """Issue 19 item 9: clients waiting for the MTA's reply to their message get it (250), not 421,
    when SIGTERM arrives meanwhile: no delivered message is retried as a duplicate."""
    from aiosmtpd.controller import Controller

    mta = SlowMTA(2.0)
    controller = Controller(mta, hostname="127.0.0.1", port=free_port())
    controller.start()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "smtpguard", "serve", "--listen", f"127.0.0.1:{port}",
                             "--upstream", f"127.0.0.1:{controller.port}", "--domain", "example.test",
                             "--hostname", "mx.example.test", "--pregreet-wait", "0s", "--workers", workers],
                            stderr=subprocess.DEVNULL)
    replies: list[tuple[int, bytes] | str] = []

    def send(n: int) -> None:
        s = smtplib.SMTP("127.0.0.1", port, timeout=30)
        try:
            s.ehlo("c.test")
            s.mail("a@sender.test")
            s.rcpt("b@example.test")
            replies.append(s.data(f"Subject: {n}\r\n\r\nbody\r\n".encode()))
        except (smtplib.SMTPException, OSError) as e:
            replies.append(f"{type(e).__name__}: {e}")
        finally:
            s.close()   # after the reply to the message, a 421 (stopping) is no harm: not read here

    try:
        wait_port("127.0.0.1", port, timeout=30)
        clients = [threading.Thread(target=send, args=(n,)) for n in range(10)]
        for c in clients:
            c.start()
        wait_for(lambda: mta.arrived == 10, timeout=30)   # all ten wait for the MTA's answer now
        proc.send_signal(signal.SIGTERM)
        for c in clients:
            c.join(40)
        proc.wait(40)
    finally:
        if proc.poll() is None:
            proc.kill()
        controller.stop()
    assert mta.delivered == 10
    assert [r for r in replies if not (isinstance(r, tuple) and r[0] == 250)] == [], replies
    assert len(replies) == 10 and proc.returncode == 0
