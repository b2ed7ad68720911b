"""The command line as an admin meets it: bad input is one line and exit 2; a real run with swaks."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path


import pytest

from tests.fixtures_smtp import free_port, wait_for, wait_port

SMTPGUARD = [sys.executable, "-m", "smtpguard"]


def run(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SMTPGUARD, *args], capture_output=True, text=True, timeout=timeout)


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


BAD_CONFIGS = [
    ("", ["--domain", "example.test"], "--upstream"),
    ("", ["--upstream", "127.0.0.1:2526"], "--domain"),
    ("", ["--upstream", "127.0.0.1:2526", "--domain", "example.test", "--max-message-size", "12QB"], "--max-message-size"),
    ("", ["--upstream", "localhost", "--domain", "example.test", "--listen", "::1:25"], "--listen"),
    ("", ["--upstream", "127.0.0.1:99999", "--domain", "example.test"], "--upstream"),
    ("", ["--upstream", "127.0.0.1:2526", "--domain", "bad_domain!", ], "--domain"),
    ("", ["--upstream", "127.0.0.1:2526", "--domain", "example.test", "--resolution-url", "https://x.test/?c={nope}"], "--resolution-url"),
    ("", ["--upstream", "127.0.0.1:2526", "--domain", "example.test", "--dns-server", "ns.example"], "--dns-server"),
    ("", ["--upstream", "127.0.0.1:2526", "--domain", "example.test", "--tls-cert", "/nonexistent.pem"], "--tls"),
    ("[server]\nlisen = ['127.0.0.1:25']\n", [], "server.lisen"),
    ("[server]\nidle_timeout = '5 parsecs'\n", [], "server.idle_timeout"),
    ("[upstream]\naddress = '127.0.0.1:2526'\ntls = 'sometimes'\n", ["--domain", "example.test"], "upstream.tls"),
    ("[serverr]\n", [], "serverr"),
    ("[state]\nurl = 'sqlite:////nonexistent-dir/sub/state.db'\n[[rule]]\nname = 'graylist'\naction = 'graylist'\n",
     ["--upstream", "127.0.0.1:2526", "--domain", "example.test"], "state.url"),
    ("[[rule]]\nname = 'foreign'\nwhen = { cuntry = 'US' }\naction = 'reject'\n", ["--upstream", "127.0.0.1:2526", "--domain", "example.test"], 'rule[1] "foreign".when.cuntry'),
    ("[[rule]]\nname = 'foreign'\nwhen = { country = 'XX' }\naction = 'reject'\n", ["--upstream", "127.0.0.1:2526", "--domain", "example.test"], 'rule[1] "foreign".when.country'),
    ("[[rule]]\nname = 'foreign'\naction = 'bounce'\n", ["--upstream", "127.0.0.1:2526", "--domain", "example.test"], 'rule[1] "foreign".action'),
    ("", ["--upstream", "127.0.0.1:2526", "--domain", "example.test", "--zones", "/nonexistent", "--allow-country", "US,ZZ"], "--allow-country"),
    ("this is = not toml [\n", [], "--config"),
]


@pytest.mark.parametrize("toml,flags,key", BAD_CONFIGS, ids=[c[2] + ":" + (c[0][:20] or " ".join(c[1])[-30:]) for c in BAD_CONFIGS])
def test_a_bad_setting_is_one_line_naming_the_key_and_exit_2(tmp_path: Path, toml: str, flags: list[str], key: str) -> None:
    port = free_port()
    args = ["serve", "--listen", f"127.0.0.1:{port}", *flags]
    if toml:
        (tmp_path / "c.toml").write_text(toml)
        args += ["--config", str(tmp_path / "c.toml")]
    r = run(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert port_is_free(port)  # nothing started


def test_unknown_flag_is_exit_2() -> None:
    r = run("serve", "--no-such-flag")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_help_lists_every_flag() -> None:
    top = run("--help").stdout
    assert "serve" in top and "sink" in top
    text = run("serve", "--help").stdout
    for flag in ("--config", "--listen", "--upstream", "--domain", "--hostname", "--resolution-url",
                 "--max-message-size", "--max-recipients", "--tls-cert", "--tls-key", "--dns-server",
                 "--log-format", "--log-level"):
        assert flag in text


def test_flag_overrides_the_file(tmp_path: Path) -> None:
    from smtpguard import config as cfg
    (tmp_path / "c.toml").write_text("[server]\nmax_recipients = 5\ndomains = ['a.test']\n[upstream]\naddress = '127.0.0.1:25'\n")
    c = cfg.load(str(tmp_path / "c.toml"), {"max_recipients": "7"})
    assert c.server.max_recipients == 7 and c.server.domains == ("a.test",)


@pytest.mark.parametrize("text,seconds", [("300", 300), ("30s", 30), ("5m", 300), ("2h", 7200), ("35d", 35 * 86400)])
def test_durations(text: str, seconds: float) -> None:
    from smtpguard.core.units import parse_duration
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text,size", [("1000", 1000), ("35MB", 35_000_000), ("10MiB", 10 * 2**20), ("512kb", 512_000)])
def test_sizes(text: str, size: int) -> None:
    from smtpguard.core.units import parse_size
    assert parse_size(text) == size


def _need(tool: str) -> str:
    path = shutil.which(tool) or (f"/usr/sbin/{tool}" if os.path.exists(f"/usr/sbin/{tool}") else None)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} is missing: .ci/run must install it")
        pytest.skip(f"{tool} is not installed")
    return path


def test_swaks_through_smtpguard_to_smtp_sink_with_a_json_decision_log(tmp_path: Path, smtp_sink: tuple[str, int]) -> None:
    swaks = _need("swaks")
    port = free_port()
    proc = subprocess.Popen([*SMTPGUARD, "serve", "--listen", f"127.0.0.1:{port}", "--upstream", f"{smtp_sink[0]}:{smtp_sink[1]}",
                             "--domain", "example.test", "--hostname", "mx.example.test", "--log-format", "json",
                             "--resolution-url", "https://example.test/smtp?code={code}&ip={ip}"],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_port("127.0.0.1", port)
        ok = subprocess.run([swaks, "--to", "postmaster@example.test", "--from", "a@sender.test", "--server",
                             f"127.0.0.1:{port}", "--helo", "client.sender.test"], capture_output=True, text=True, timeout=30)
        assert ok.returncode == 0, ok.stdout
        assert "<-  250 2.0.0 Ok: queued as" in ok.stdout or "<-  250 " in ok.stdout.split("DATA")[-1]
        bad = subprocess.run([swaks, "--to", "x@other.test", "--from", "a@sender.test", "--server", f"127.0.0.1:{port}",
                              "--helo", "client.sender.test"], capture_output=True, text=True, timeout=30)
        assert bad.returncode != 0
        assert "<** 550 5.7.1 [RELAY] relay to other.test is not allowed here https://example.test/smtp?code=RELAY&ip=127.0.0.1" in bad.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert "relay.accepted" in names and "reject" in names and "stopped" in names
    reject = next(e for e in events if e["event"] == "reject")
    assert reject["reason"] == "RELAY" and reject["stage"] == "rcpt" and reject["ip"] == "127.0.0.1"
    assert reject["session"] and reject["port"] and reject["reply"].startswith("550 5.7.1 [RELAY]")


def test_sink_stores_into_a_maildir(tmp_path: Path) -> None:
    swaks = _need("swaks")
    port = free_port()
    (tmp_path / "md").mkdir()  # an existing, empty directory, as `make run` leaves it
    proc = subprocess.Popen([*SMTPGUARD, "sink", "--listen", f"127.0.0.1:{port}", "--maildir", str(tmp_path / "md")],
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_port("127.0.0.1", port)
        r = subprocess.run([swaks, "--to", "u@example.test", "--server", f"127.0.0.1:{port}", "--body", "sink body"],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0
        files = wait_for(lambda: list((tmp_path / "md" / "new").iterdir()))
        assert b"sink body" in files[0].read_bytes() and b"X-Original-To: u@example.test" in files[0].read_bytes()
    finally:
        proc.terminate()
        proc.communicate(timeout=10)
