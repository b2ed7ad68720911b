"""`server.workers = N`: several processes on one address, signals forwarded."""

from __future__ import annotations

import json
import signal
import smtplib
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

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


def test_a_worker_that_cannot_start_stops_the_supervisor(tmp_path: Path) -> None:
    blocker = __import__("socket").socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]  # taken, without SO_REUSEPORT
    try:
        r = subprocess.run([sys.executable, "-m", "smtpguard", "serve", "--listen", f"127.0.0.1:{port}",
                            "--upstream", "127.0.0.1:1", "--domain", "example.test", "--hostname", "mx.example.test",
                            "--workers", "2"], capture_output=True, text=True, timeout=60)
    finally:
        blocker.close()
    assert r.returncode == 1 and "cannot listen" in r.stderr
