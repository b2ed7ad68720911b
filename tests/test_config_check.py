"""`smtpguard config check` (issue 11 item 8) and start-up honesty (issue 11 item 7)."""

from __future__ import annotations

import io
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from smtpguard import config as cfg
from smtpguard.errors import ConfigError
from tests.fixtures_smtp import free_port, wait_for

BASE = """
[server]
listen = ["127.0.0.1:2525"]
hostname = "mx.example.test"
domains = ["example.test"]
[upstream]
address = "127.0.0.1:10025"
xclient = true
"""


def config_check(conf: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "smtpguard", "config", "check", "--config", str(conf), *flags],
                          capture_output=True, text=True, timeout=60)


def test_a_good_config_prints_a_summary_and_exits_0(tmp_path: Path) -> None:
    zones = tmp_path / "zones"
    zones.mkdir()
    (zones / "us.zone").write_text("192.0.2.0/24\n")
    (zones / "de.zone").write_text("198.51.100.0/24\n")
    conf = tmp_path / "c.toml"
    conf.write_text(BASE + f"""
[geo]
zones = "{zones}"
allow = ["US"]
[state]
url = "sqlite:///{tmp_path}/state.db"
[[dnsbl]]
zone = "bl.test"
weight = 3
[[rule]]
name = "no-rdns"
stage = "connect"
when = {{ rdns = "none" }}
action = "reject"
""")
    r = config_check(conf)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert f"config     {conf}: ok" in out
    assert "upstream   127.0.0.1:10025 xclient=on xforward=off tls=none" in out
    assert "geo        2 countries" in out and "allow US" in out
    assert "dnsbl      bl.test(+3)" in out
    assert "connect  reject    no-rdns [POLICY] reads rdns" in out
    assert "state      sqlite:///" in out and "answers" in out
    assert len(out.splitlines()) <= 24          # one screen
    assert not (tmp_path / "state.db").exists() or (tmp_path / "state.db").stat().st_size >= 0
    assert r.stderr == ""


@pytest.mark.parametrize("extra, key", [
    ('[[rule]]\nname = "x"\nstage = "connect"\nwhen = { nosuchfact = 1 }\naction = "reject"\n', "rule"),
    ('[geo]\nzones = "/nonexistent/zones"\n', "geo.zones"),
    ('[state]\nurl = "redis://127.0.0.1:{port}/0"\n', "state.url"),
])
def test_a_bad_config_is_one_line_naming_the_key_and_exit_2(tmp_path: Path, extra: str, key: str) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(BASE + extra.replace("{port}", str(free_port())))
    r = config_check(conf)
    assert r.returncode == 2, r.stdout
    assert len(r.stderr.strip().splitlines()) == 1 and key in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_config_check_warns_about_a_hostname_that_is_not_fully_qualified(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text(BASE.replace("mx.example.test", "vm"))
    r = config_check(conf)
    assert r.returncode == 0 and "warning    config.hostname_not_fqdn" in r.stdout


# --- issue 11 item 7 ----------------------------------------------------------------------

def test_serve_warns_at_start_up_about_a_hostname_that_is_not_fully_qualified() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "smtpguard", "serve", "--listen", f"127.0.0.1:{free_port()}",
                             "--upstream", "127.0.0.1:1", "--domain", "example.test", "--hostname", "vm"],
                            stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        lines.extend(proc.stderr)

    threading.Thread(target=read, daemon=True).start()
    try:
        wait_for(lambda: any(" listening " in line for line in lines), timeout=30)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert any(" warning config.hostname_not_fqdn " in line and "'vm'" in line for line in lines), lines


def test_a_missing_sqlite_directory_is_created_0750(tmp_path: Path) -> None:
    from smtpguard.services import build_services

    directory = tmp_path / "smtpguard"     # its parent exists, as /var/lib does
    config = cfg.build({}, {"upstream": "127.0.0.1:1", "domain": ["example.test"], "hostname": "mx.example.test",
                            "state": f"sqlite:///{directory}/state.db"})
    services = build_services(config)
    try:
        assert directory.is_dir()
        assert stat.S_IMODE(directory.stat().st_mode) == 0o750
    finally:
        import asyncio

        asyncio.run(services.close())


@pytest.mark.parametrize("where", ["file/sub", "missing/sub"])
def test_a_sqlite_directory_that_cannot_be_created_is_exit_2_saying_how(tmp_path: Path, where: str) -> None:
    (tmp_path / "file").write_text("not a directory")
    r = subprocess.run([sys.executable, "-m", "smtpguard", "serve", "--listen", "127.0.0.1:0", "--upstream",
                        "127.0.0.1:1", "--domain", "example.test", "--hostname", "mx.example.test",
                        "--state", f"sqlite:///{tmp_path}/{where}/state.db"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    assert "state.url" in r.stderr and "install -d -m 0750" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "missing").exists()     # no tree made from a typo


def test_a_rule_on_country_without_country_data_is_a_config_error() -> None:
    doc: dict[str, Any] = {"rule": [{"name": "no-cn", "stage": "connect", "action": "reject",
                                     "when": {"country": "CN"}}]}
    with pytest.raises(ConfigError) as e:
        cfg.build(doc, {"upstream": "127.0.0.1:1", "domain": ["example.test"], "hostname": "mx.example.test"})
    assert e.value.key == 'rule "no-cn".when.country' and "country data" in e.value.message


def test_text_logs_quote_values_instead_of_hex_escaping_quotes() -> None:
    from smtpguard.observe import log

    out = io.StringIO()
    log.setup("text", "info", stream=out)
    try:
        log.event("helo", helo='say "hi"', path="C:\\x", plain='a"b', ctl="x\ny")
    finally:
        log.setup("text", "info")
    line = out.getvalue()
    assert 'helo="say \\"hi\\""' in line
    assert "path=C:\\\\x" in line          # a backslash doubled: never read as an escape
    assert 'plain="a\\"b"' in line
    assert "ctl=x\\x0ay" in line
    assert "\\x22" not in line and len(line.strip().splitlines()) == 1


# --- issue 11 item 2: XCLIENT and XFORWARD from the command line ----------------------------

@pytest.mark.parametrize("flags, env, xclient, xforward", [
    (["--xclient"], {}, True, False),          # XCLIENT no longer turns XFORWARD on
    (["--xforward"], {}, False, True),
    (["--xclient", "--xforward"], {}, True, True),
    ([], {"SMTPGUARD_XCLIENT": "true"}, True, False),
    ([], {}, False, False),
])
def test_xclient_and_xforward_flags(recorder_factory: Any, flags: list[str], env: dict[str, str],
                                    xclient: bool, xforward: bool) -> None:
    import smtplib

    from tests.fixtures_smtp import wait_port

    up = recorder_factory(xclient=True, xforward=True)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "smtpguard", "serve", "--listen", f"127.0.0.1:{port}",
                             "--upstream", up.address, "--domain", "example.test", "--hostname", "mx.example.test",
                             "--pregreet-wait", "0s", *flags], stderr=subprocess.DEVNULL,
                            env={**os.environ, **env})
    try:
        wait_port("127.0.0.1", port, timeout=30)
        with smtplib.SMTP("127.0.0.1", port, timeout=20, source_address=("127.0.0.5", 0)) as s:
            s.ehlo("helo.client.test")
            s.sendmail("a@sender.test", ["b@example.test"], b"Subject: x\r\n\r\nbody\r\n")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    [message] = up.messages
    assert (message.xclient.get("ADDR") == "127.0.0.5") is xclient, message.xclient
    assert (message.xforward.get("ADDR") == "127.0.0.5") is xforward, message.xforward


# --- issue 11 items 4 and 10: the README's operator sections ---------------------------------

def _readme_section(title: str) -> str:
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def test_readme_running_it_for_real_names_only_files_in_the_repository() -> None:
    import re

    root = Path(__file__).resolve().parent.parent
    section = _readme_section("Running it for real")
    named = set(re.findall(r"\b((?:examples|scripts|tests)/[\w./-]+)", section))
    assert {"examples/postfix/main.cf", "examples/postfix/master.cf", "examples/postfix/smtpguard.toml"} <= named
    assert [p for p in named if not (root / p.rstrip(".")).exists()] == []
    assert "{session}" in (root / "examples/postfix/smtpguard.toml").read_text()
    assert "smtpguard config check" in section and "net_bind_service" in section
    for key in ("upstream.xclient", "upstream.xforward", "upstream.tls"):
        assert f"| `{key}` |" in section
    # what a SIGHUP reloads, and what needs a restart
    assert "| `server.listen`, `server.workers`, `http.listen` | need a restart |" in section
    assert "read again even at the same path" in section
