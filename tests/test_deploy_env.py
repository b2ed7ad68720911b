"""Configuration by SMTPGUARD_* variables (flags > environment > file) and
`smtpguard health`, as a container uses them: the real CLI in a subprocess,
real listeners on loopback."""

from __future__ import annotations

import http.server
import os
import signal
import smtplib
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest

from smtpguard import config as cfg
from smtpguard.cli import build_parser
from smtpguard.commands.serve import apply_env
from smtpguard.errors import ConfigError
from tests.fixtures_smtp import Recorder, free_port, wait_for, wait_port

SMTPGUARD = [sys.executable, "-m", "smtpguard"]


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without any SMTPGUARD_* of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SMTPGUARD_")}
    env.update(extra)
    return env


def run(*args: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SMTPGUARD, *args], capture_output=True, text=True, timeout=timeout, env=env)


def config_from(argv: list[str], environ: dict[str, str], toml: str = "", tmp_path: Path | None = None) -> cfg.Config:
    """The Config that `smtpguard serve ARGV` builds with ENVIRON (and a file)."""
    parser = build_parser()
    if toml and tmp_path is not None:
        path = tmp_path / "smtpguard.toml"
        path.write_text(toml)
        argv = [*argv, "--config", str(path)]
    args = parser.parse_args(["serve", *argv])
    apply_env(args, parser, environ)
    return cfg.load(args.config, vars(args))


BASE = {"SMTPGUARD_HOSTNAME": "mx.example.test"}


def test_variables_alone_configure_serve_and_lists_are_comma_separated() -> None:
    c = config_from([], {**BASE, "SMTPGUARD_UPSTREAM": "mta:2525", "SMTPGUARD_DOMAIN": "example.test, .example.org",
                         "SMTPGUARD_LISTEN": "127.0.0.1:2626,[::1]:2626", "SMTPGUARD_MAX_RECIPIENTS": "50",
                         "SMTPGUARD_LOG_FORMAT": "json"})
    assert (c.upstream.host, c.upstream.port) == ("mta", 2525)
    assert c.server.domains == ("example.test", ".example.org")
    assert c.server.listen == (("127.0.0.1", 2626), ("::1", 2626))
    assert c.server.max_recipients == 50 and c.log.format == "json"
    assert c.server.hostname == "mx.example.test"


def test_a_flag_beats_its_variable_and_a_variable_beats_the_file(tmp_path: Path) -> None:
    toml = "[server]\ndomains = ['file.example.test']\nmax_recipients = 7\n[upstream]\naddress = 'file-mta:25'\n"
    env = {**BASE, "SMTPGUARD_UPSTREAM": "env-mta:25", "SMTPGUARD_DOMAIN": "env.example.test"}
    c = config_from(["--domain", "flag.example.test"], env, toml, tmp_path)
    assert c.server.domains == ("flag.example.test",)      # flag > environment
    assert c.upstream.host == "env-mta"                     # environment > file
    assert c.server.max_recipients == 7                     # the file where neither says otherwise


def test_smtpguard_config_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "f.toml"
    path.write_text("[server]\ndomains = ['example.test']\n[upstream]\naddress = 'file-mta:25'\n")
    c = config_from([], {**BASE, "SMTPGUARD_CONFIG": str(path)})
    assert c.upstream.host == "file-mta" and c.path == str(path)


def test_an_empty_variable_counts_as_unset() -> None:
    c = config_from(["--upstream", "mta:25"], {**BASE, "SMTPGUARD_DOMAIN": "example.test", "SMTPGUARD_STATE": "",
                                               "SMTPGUARD_LISTEN": "  "})
    assert c.server.listen == cfg.ServerSettings().listen


def test_variables_apply_only_to_the_commands_that_read_the_configuration() -> None:
    parser = build_parser()
    args = parser.parse_args(["zones", "info"])
    # `zones info` has a --zones flag but no --config: SMTPGUARD_ZONES is not its business.
    assert not hasattr(args, "config")
    health = parser.parse_args(["health"])
    assert apply_env(health, parser, {"SMTPGUARD_LISTEN": "127.0.0.1:2626", "SMTPGUARD_UPSTREAM": "mta:25"}) == \
        {"--listen": "SMTPGUARD_LISTEN", "server.listen": "SMTPGUARD_LISTEN"}
    assert health.listen == ["127.0.0.1:2626"] and not hasattr(health, "upstream")


BAD_VARIABLES = [
    ("SMTPGUARD_UPSTREAM", "mta:99999", "port must be 0-65535"),
    ("SMTPGUARD_LISTEN", "::1:25", "brackets"),
    ("SMTPGUARD_DOMAIN", "example.test,com", "public suffix"),
    ("SMTPGUARD_LOG_FORMAT", "xml", "expected one of"),
    ("SMTPGUARD_MAX_RECIPIENTS", "0", "whole number"),
    ("SMTPGUARD_UPSTREEM", "mta:25", "unknown variable"),
    ("SMTPGUARD_HOSTNAME", "mx.example.test\r\nX-Injected: 1", "control characters"),
]


@pytest.mark.parametrize("var,value,why", BAD_VARIABLES, ids=[f"{v} = {x!r} is refused" for v, x, _ in BAD_VARIABLES])
def test_a_bad_variable_is_one_line_naming_it_and_exit_2(var: str, value: str, why: str) -> None:
    env = clean_env(SMTPGUARD_UPSTREAM="127.0.0.1:2526", SMTPGUARD_DOMAIN="example.test",
                    SMTPGUARD_HOSTNAME="mx.example.test", SMTPGUARD_LISTEN=f"127.0.0.1:{free_port()}")
    env[var] = value
    r = run("serve", env=env, timeout=20)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert lines[0].startswith(f"smtpguard: config error: {var}: ") and why in lines[0]


def test_the_flag_is_named_when_the_bad_value_came_from_the_flag() -> None:
    env = clean_env(SMTPGUARD_UPSTREAM="127.0.0.1:2526", SMTPGUARD_DOMAIN="example.test")
    r = run("serve", "--upstream", "127.0.0.1:99999", env=env, timeout=20)
    assert r.returncode == 2 and r.stderr.startswith("smtpguard: config error: --upstream: ")


def test_check_reads_the_variables_too() -> None:
    env = clean_env(SMTPGUARD_DOMAIN="example.test", SMTPGUARD_ZONES="/nonexistent-zones", SMTPGUARD_ALLOW_COUNTRY="US")
    r = run("check", "192.0.2.7", env=env)
    assert r.returncode == 2 and r.stderr.strip() == \
        "smtpguard: config error: SMTPGUARD_ZONES: /nonexistent-zones: no such directory or file"


def test_every_variable_the_docs_and_examples_name_exists() -> None:
    import re

    root = Path(__file__).resolve().parent.parent
    known = {f"SMTPGUARD_{d.upper()}" for d in (*cfg.FLAG_KEYS, "config")}
    files = ["README.md", "Dockerfile", "examples/compose/compose.yaml", "scripts/image-test.sh"]
    named = {(f, v) for f in files for v in re.findall(r"SMTPGUARD_[A-Z_]*[A-Z]", (root / f).read_text())}
    assert named and {(f, v) for f, v in named if v not in known} == set()


def test_apply_env_refuses_unknown_variables_before_anything() -> None:
    parser = build_parser()
    args = parser.parse_args(["serve"])
    with pytest.raises(ConfigError) as e:
        apply_env(args, parser, {"SMTPGUARD_DOMAINS": "example.test"})
    assert e.value.key == "SMTPGUARD_DOMAINS" and "SMTPGUARD_DOMAIN," in e.value.message


# --- `smtpguard health` against a real smtpguard serve configured by variables only ---

def test_serve_from_variables_only_is_healthy_relays_and_turns_unhealthy_when_stopped(dns_server: Any) -> None:
    upstream = Recorder()
    port = free_port()
    env = clean_env(SMTPGUARD_LISTEN=f"127.0.0.1:{port}", SMTPGUARD_UPSTREAM=upstream.address,
                    SMTPGUARD_DOMAIN="example.test", SMTPGUARD_HOSTNAME="mx.example.test",
                    SMTPGUARD_DNS_SERVER=dns_server.address, SMTPGUARD_STATE="memory://")
    proc = subprocess.Popen([*SMTPGUARD, "serve"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_port("127.0.0.1", port, timeout=20)
        h = run("health", env=env)          # finds the listener from SMTPGUARD_LISTEN, as the image's HEALTHCHECK does
        assert h.returncode == 0, h.stdout + h.stderr
        assert h.stdout.startswith(f"healthy: 127.0.0.1:{port} greets: 220") and "mx.example.test" in h.stdout
        with smtplib.SMTP("127.0.0.1", port, local_hostname="client.example.net", timeout=20) as s:
            s.sendmail("a@example.net", ["postmaster@example.test"], b"Subject: env\r\n\r\nbody\r\n")
        wait_for(lambda: upstream.messages)
        assert upstream.messages[0].rcpt_tos == ["postmaster@example.test"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=40)
        upstream.stop()
    assert proc.returncode == 0
    h = run("health", env=env)
    assert h.returncode == 1 and h.stdout.startswith(f"unhealthy: 127.0.0.1:{port}: ")


def test_with_the_http_server_on_health_asks_healthz_and_smtp_on_request(dns_server: Any) -> None:
    upstream = Recorder()
    port, http_port = free_port(), free_port()
    env = clean_env(SMTPGUARD_LISTEN=f"127.0.0.1:{port}", SMTPGUARD_UPSTREAM=upstream.address,
                    SMTPGUARD_DOMAIN="example.test", SMTPGUARD_HOSTNAME="mx.example.test",
                    SMTPGUARD_DNS_SERVER=dns_server.address, SMTPGUARD_STATE="memory://",
                    SMTPGUARD_HTTP=f"0.0.0.0:{http_port}")
    proc = subprocess.Popen([*SMTPGUARD, "serve"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_port("127.0.0.1", http_port, timeout=20)
        # readiness: 200 once the listeners serve and the MTA answered its probe
        h = wait_for(lambda: (r := run("health", env=env)).returncode == 0 and r, timeout=20)
        assert h.stdout.strip() == f"healthy: http://127.0.0.1:{http_port}/healthz: HTTP 200"
        smtp = run("health", "--smtp", env=env)
        assert smtp.returncode == 0 and smtp.stdout.startswith(f"healthy: 127.0.0.1:{port} greets: 220")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=40)
        upstream.stop()
    assert proc.returncode == 0
    h = run("health", env=env)
    assert h.returncode == 1 and h.stdout.startswith(f"unhealthy: http://127.0.0.1:{http_port}/healthz: ")


# --- `smtpguard health` against listeners that behave in one way each ---

class OneGreeting:
    """A loopback listener that sends a fixed first line (or nothing) and then holds the connection."""

    def __init__(self, greeting: bytes | None) -> None:
        self.greeting = greeting
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        conn, _ = self.sock.accept()
        with conn:
            if self.greeting is None:
                conn.close()
            else:
                if self.greeting:
                    conn.sendall(self.greeting)
                conn.settimeout(5)
                try:
                    while chunk := conn.recv(100):   # until the checker closes
                        self.received.append(chunk)
                except OSError:
                    pass
        self.done.set()

    def close(self) -> None:
        self.sock.close()


GREETINGS = [
    (b"220 mx.example.test ESMTP\r\n", 0, "greets: 220 mx.example.test ESMTP"),
    (b"220-mx.example.test ESMTP\r\n", 0, "greets: 220-mx.example.test"),    # the early-talker wait's first line
    (b"421 4.3.2 busy\r\n", 1, "greets: 421 4.3.2 busy"),
    (b"554 5.7.1 go away\r\n", 1, "greets: 554"),
    (None, 1, "closed without a greeting"),
    (b"", 1, "no greeting within 0.5s"),
    (b"220 \x1b[31mred\x07\r\n", 0, "greets: 220 ?[31mred?"),               # a stranger's bytes, escaped
]


@pytest.mark.parametrize("greeting,code,shown", GREETINGS, ids=[
    "a 220 greeting is healthy", "a 220- first line (pregreet wait) is healthy", "a 421 busy banner is unhealthy",
    "a 554 banner is unhealthy", "a close without greeting is unhealthy", "silence is unhealthy within the timeout",
    "control characters in the banner are escaped"])
def test_health_reads_the_first_greeting_line_and_says_nothing(greeting: bytes | None, code: int, shown: str) -> None:
    server = OneGreeting(greeting)
    try:
        r = run("health", "--listen", f"127.0.0.1:{server.port}", "--timeout", "0.5s", env=clean_env())
        assert r.returncode == code, r.stdout + r.stderr
        assert shown in r.stdout and len(r.stdout.splitlines()) == 1
        assert server.done.wait(10)
        assert server.received == []          # it never talks: no command, not even QUIT
    finally:
        server.close()


def test_health_finds_the_listener_in_the_config_file_and_checks_a_wildcard_on_loopback(tmp_path: Path) -> None:
    server = OneGreeting(b"220 ok\r\n")
    path = tmp_path / "smtpguard.toml"
    path.write_text(f"[server]\nlisten = ['0.0.0.0:{server.port}']\n")
    try:
        r = run("health", env=clean_env(SMTPGUARD_CONFIG=str(path)))
        assert r.returncode == 0 and r.stdout.startswith(f"healthy: 127.0.0.1:{server.port} greets: 220 ok")
    finally:
        server.close()


@pytest.mark.parametrize("args,key", [(["--listen", "localhost"], "--listen"), (["--timeout", "soon"], "--timeout"),
                                      (["--http", "ftp://x/healthz"], "--http")],
                         ids=["a listen address without port", "a timeout that is no duration", "a non-HTTP URL"])
def test_health_bad_input_is_a_config_error(args: list[str], key: str) -> None:
    r = run("health", *args, env=clean_env())
    assert r.returncode == 2 and r.stderr.startswith(f"smtpguard: config error: {key}: ")


class Healthz(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        code = self.status if self.path == "/healthz" else 404
        self.send_response(code)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def healthz() -> Iterator[tuple[http.server.ThreadingHTTPServer, type[Healthz]]]:
    handler = type("H", (Healthz,), {"status": 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server, handler
    server.shutdown()
    server.server_close()


def test_health_over_http_wants_200_from_healthz(healthz: tuple[http.server.ThreadingHTTPServer, type[Healthz]],
                                                tmp_path: Path) -> None:
    server, handler = healthz
    url = f"http://127.0.0.1:{server.server_address[1]}/healthz"
    ok = run("health", "--http", url, env=clean_env(http_proxy="http://127.0.0.1:9", HTTP_PROXY="http://127.0.0.1:9"))
    assert ok.returncode == 0 and ok.stdout.strip() == f"healthy: {url}: HTTP 200"   # never through a proxy
    # HOST:PORT as serve's --http takes it, from the flag, the variable or [http] listen in the file
    path = tmp_path / "smtpguard.toml"
    path.write_text(f"[http]\nlisten = '0.0.0.0:{server.server_address[1]}'\n")
    for args, env in [(["--http", f"127.0.0.1:{server.server_address[1]}"], clean_env()),
                      ([], clean_env(SMTPGUARD_HTTP=f"0.0.0.0:{server.server_address[1]}")),
                      (["--config", str(path)], clean_env())]:
        r = run("health", *args, env=env)
        assert r.returncode == 0 and r.stdout.strip() == f"healthy: {url}: HTTP 200", (args, r.stdout, r.stderr)
    handler.status = 503
    bad = run("health", "--http", url, env=clean_env())
    assert bad.returncode == 1 and bad.stdout.strip() == f"unhealthy: {url}: HTTP 503"
    gone = run("health", "--http", url.replace("/healthz", "/nope"), env=clean_env())
    assert gone.returncode == 1 and "HTTP 404" in gone.stdout
