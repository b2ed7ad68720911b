"""SIGHUP reloads config and zones without dropping sessions; a bad reload keeps the running config."""

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


class Serve:
    """`smtpguard serve` as a process, its JSON log collected line by line."""

    def __init__(self, conf: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "smtpguard", "serve", "--config", str(conf),
                                      "--log-format", "json"], stderr=subprocess.PIPE, text=True)
        self.lines: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if line.startswith("{"):
                self.lines.append(json.loads(line))

    def count(self, event: str) -> int:
        return sum(1 for e in self.lines if e["event"] == event)

    def hup(self, expect: str) -> dict[str, Any]:
        before = self.count(expect)
        self.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: self.count(expect) > before)
        return [e for e in self.lines if e["event"] == expect][-1]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


def write(conf: Path, port: int, upstream: str, zones: Path, extra: str = "") -> None:
    conf.write_text(f"""
[server]
listen = ["127.0.0.1:{port}"]
hostname = "mx.example.test"
domains = ["example.test"]
[upstream]
address = "{upstream}"
[geo]
zones = "{zones}"
allow = ["US"]
{extra}
""")


def rcpt_reply(port: int) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.ehlo("c.test")
        s.mail("a@sender.test")
        return s.rcpt("b@example.test")


def rcpt(port: int) -> int:
    return rcpt_reply(port)[0]


def test_sighup_reloads_rules_and_zones_and_keeps_sessions(tmp_path: Path, recorder: Recorder) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "us.zone").write_text("127.0.0.0/8\n")
    conf, port = tmp_path / "c.toml", free_port()
    write(conf, port, recorder.address, zones)
    serve = Serve(conf)
    try:
        wait_port("127.0.0.1", port)
        assert rcpt(port) == 250
        # a session that is open across the reload
        held = smtplib.SMTP("127.0.0.1", port, timeout=10)
        held.ehlo("c.test")

        (zones / "us.zone").write_text("192.0.2.0/24\n")
        (zones / "cn.zone").write_text("127.0.0.0/8\n")
        serve.hup("reload.done")
        assert rcpt(port) == 550  # now from CN, not allowed

        write(conf, port, recorder.address, zones,
              '[[rule]]\nname = "home"\nstage = "connect"\nwhen = { ip_in = ["127.0.0.0/8"] }\naction = "accept"\n')
        serve.hup("reload.done")
        assert rcpt(port) == 250  # the new allowlist rule

        conf.write_text(conf.read_text() + "\n[server.oops]\n")
        failed = serve.hup("reload.failed")
        assert "server.oops" in failed["error"]
        assert rcpt(port) == 250  # the running config stays

        held.sendmail("a@sender.test", ["b@example.test"], b"Subject: held\r\n\r\nacross reloads\r\n")
        held.quit()
        assert serve.proc.poll() is None
    finally:
        serve.stop()
    assert any(b"across reloads" in m.content for m in recorder.messages)


def test_a_reload_that_adds_graylisting_opens_the_store(tmp_path: Path, recorder: Recorder, dns_server: Any) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "us.zone").write_text("127.0.0.0/8\n")
    conf, port = tmp_path / "c.toml", free_port()
    dns = f'[dns]\nservers = ["{dns_server.address}"]\n'
    write(conf, port, recorder.address, zones, dns)
    serve = Serve(conf)
    try:
        wait_port("127.0.0.1", port)
        assert rcpt(port) == 250
        write(conf, port, recorder.address, zones, dns + f'[state]\nurl = "sqlite:///{tmp_path}/state.db"\n'
              '[[rule]]\nname = "grey"\naction = "graylist"\n')
        serve.hup("reload.done")
        code, text = rcpt_reply(port)
        assert code == 451 and b"[GREY]" in text  # not GREY-STORE: the store was opened
    finally:
        serve.stop()
