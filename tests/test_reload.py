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

import pytest

from tests.fixtures_dns import DnsServer, ptr_name
from tests.fixtures_smtp import Recorder, free_port, wait_for, wait_port


class Serve:
    """`smtpguard serve` as a process, its JSON log collected line by line."""

    def __init__(self, conf: Path, *flags: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "smtpguard", "serve", "--config", str(conf),
                                      *(flags or ("--log-format", "json"))], stderr=subprocess.PIPE, text=True)
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.raw.append(line)
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
              '[[rule]]\nname = "graylist"\naction = "graylist"\n')
        serve.hup("reload.done")
        code, text = rcpt_reply(port)
        assert code == 451 and b"[GRAYLIST]" in text  # not GRAYLIST-STORE: the store was opened
    finally:
        serve.stop()


def _plain(port: int) -> str:
    """One session: the conf for the tests below has no zones and no rules."""
    return f"""
[server]
listen = ["127.0.0.1:{port}"]
hostname = "mx.example.test"
domains = ["example.test"]
[pregreet]
wait = "0s"
"""


def test_a_reload_uses_new_dns_servers(tmp_path: Path, recorder_factory: Any, dns_server: Any) -> None:
    """Issue 11 item 4: [dns] servers changed on SIGHUP are the ones asked afterwards."""
    recorder = recorder_factory(xclient=True)   # an MTA that takes XCLIENT from us
    second = DnsServer().start()
    try:
        conf, port = tmp_path / "c.toml", free_port()
        ptr = ptr_name("127.0.0.1")
        base = _plain(port) + f'[upstream]\naddress = "{recorder.address}"\nxclient = true\n'  # XCLIENT asks rDNS
        conf.write_text(base + f'[dns]\nservers = ["{dns_server.address}"]\n')
        serve = Serve(conf)
        try:
            wait_port("127.0.0.1", port)
            assert rcpt(port) == 250
            assert dns_server.queries(ptr, "PTR") >= 1 and second.queries(ptr, "PTR") == 0
            conf.write_text(base + f'[dns]\nservers = ["{second.address}"]\n')
            done = serve.hup("reload.done")
            assert "dns" in done["reloaded"].split(",")
            before = dns_server.queries(ptr, "PTR")
            assert rcpt(port) == 250
            assert second.queries(ptr, "PTR") >= 1
            assert dns_server.queries(ptr, "PTR") == before   # not from the old resolver or its cache
        finally:
            serve.stop()
    finally:
        second.stop()


def _served_cert(port: int) -> str:
    import ssl

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s.starttls(context=ctx)
        der = s.sock.getpeercert(binary_form=True)
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    return str(cert.subject.rfc4514_string()) + " " + str(cert.serial_number)


def test_a_certificate_renewed_in_place_is_used_after_a_reload(tmp_path: Path, recorder: Recorder) -> None:
    trustme = pytest.importorskip("trustme")
    pem = tmp_path / "cert.pem"
    first = trustme.CA().issue_cert("mx.example.test")
    first.private_key_and_cert_chain_pem.write_to_path(str(pem))
    conf, port = tmp_path / "c.toml", free_port()
    conf.write_text(_plain(port).replace("[pregreet]", f'tls_cert = "{pem}"\ntls_key = "{pem}"\n[pregreet]')
                    + f'[upstream]\naddress = "{recorder.address}"\n')
    serve = Serve(conf)
    try:
        wait_port("127.0.0.1", port)
        before = _served_cert(port)
        assert str(first.cert_chain_pems[0].bytes()) and before
        renewed = trustme.CA().issue_cert("mx.example.test")
        renewed.private_key_and_cert_chain_pem.write_to_path(str(pem))   # same path, new certificate
        done = serve.hup("reload.done")
        assert "tls" in done["reloaded"].split(",")
        after = _served_cert(port)
        assert after != before
        from cryptography import x509

        assert after.endswith(" " + str(x509.load_pem_x509_certificate(renewed.cert_chain_pems[0].bytes()).serial_number))
    finally:
        serve.stop()


def test_a_reload_applies_log_settings_and_names_what_needs_a_restart(tmp_path: Path, recorder: Recorder) -> None:
    conf, port = tmp_path / "c.toml", free_port()
    up = f'[upstream]\naddress = "{recorder.address}"\n'
    conf.write_text(_plain(port) + up + '[log]\nformat = "json"\n')
    serve = Serve(conf, "--log-level", "info")
    try:
        wait_port("127.0.0.1", port)
        other = free_port()
        conf.write_text(_plain(port).replace(f"127.0.0.1:{port}", f"127.0.0.1:{other}")
                        + up + '[log]\nformat = "text"\n')
        serve.proc.send_signal(signal.SIGHUP)   # the lines after the switch are text
        wait_for(lambda: any(" reload.done " in line and "reloaded=log" in line for line in serve.raw), timeout=30)
        assert any(" warning reload.needs_restart keys=server.listen " in line for line in serve.raw)
        mark = len(serve.raw)
        assert rcpt(port) == 250     # still on the old address: a restart moves it
        wait_for(lambda: any(" info " in line and "session=" in line for line in serve.raw[mark:]))
        assert not any(line.startswith("{") for line in serve.raw[mark:])
    finally:
        serve.stop()


def test_a_reload_applies_the_junk_command_limit_to_new_sessions(tmp_path: Path, recorder: Recorder) -> None:
    """[limits] junk_commands is reloaded, as the README's table says of [limits]."""
    import socket

    from tests.test_promises import read_reply

    conf, port = tmp_path / "c.toml", free_port()
    base = _plain(port).replace("[server]\n", "[server]\nmax_errors = 1\n") + \
        f'[upstream]\naddress = "{recorder.address}"\n'

    def replies(lines: list[bytes]) -> list[int]:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock, sock.makefile("rb") as f:
            read_reply(f)
            codes = []
            for line in [b"EHLO c.test\r\n", *lines]:
                sock.sendall(line)
                codes.append(read_reply(f)[0])
            return codes[1:]

    conf.write_text(base + "[limits]\njunk_commands = 2\n")
    serve = Serve(conf)
    try:
        wait_port("127.0.0.1", port)
        # the third NOOP is the first error past the limit: its 250, then 421 where QUIT's 221 would be
        assert replies([b"NOOP\r\n"] * 3 + [b"QUIT\r\n"]) == [250, 250, 250, 421]
        conf.write_text(base + "[limits]\njunk_commands = 10\n")
        serve.hup("reload.done")
        assert replies([b"NOOP\r\n"] * 3 + [b"QUIT\r\n"]) == [250, 250, 250, 221]
    finally:
        serve.stop()
