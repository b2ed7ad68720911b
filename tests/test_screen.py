"""The screen, live on loopback: the pregreet wait and its pass cache, the
limits, drop, a refusal at connect, and the PROXY header ahead of it all
(issue 10; issue 9 item 3; issue 19 item 7).

Every test talks to a real smtpguard over real sockets, with a recording
upstream; waits are short ([pregreet] wait = 0.3 s) and every wait on the
client side is a bounded read, never a sleep.
"""

from __future__ import annotations

import shutil
import smtplib
import socket
import struct
import subprocess
import sys
import tomllib
from typing import Any

import pytest

from tests.fixtures_policy import default_rules_toml
from tests.fixtures_smtp import Guard, Recorder, wait_for

WAIT = "0.3s"
PREGREET_RULE = {"name": "pregreet", "stage": "connect", "when": {"pregreet": True},
                 "action": "reject", "reason": "PREGREET"}
DROP_RULE = {"name": "pregreet-drop", "stage": "connect", "when": {"pregreet": True},
             "action": "drop", "reason": "PREGREET"}


class Client:
    """A raw SMTP client that reads line by line, with a bounded timeout."""

    def __init__(self, g: Guard, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((g.host, g.port), timeout=timeout)
        self.f = self.sock.makefile("rb")

    def line(self) -> str:
        return self.f.readline().decode("ascii", "replace").rstrip("\r\n")

    def reply(self) -> list[str]:
        """One whole (multi-line) reply."""
        lines = [self.line()]
        while len(lines[-1]) > 3 and lines[-1][3] == "-":
            lines.append(self.line())
        return lines

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode("ascii"))

    def closed(self) -> bool:
        """True when the server closed the connection (EOF, or a reset: it
        closed with our bytes unread); False when it kept it open (timeout)."""
        try:
            self.f.read()
            return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.f.close()
        self.sock.close()


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes (a reset after our unread bytes counts as closing)."""
    f = sock.makefile("rb")
    try:
        return f.read()
    except ConnectionResetError:
        return b""


def pregreet_doc(*rules: dict[str, Any], **more: Any) -> dict[str, Any]:
    return {"pregreet": {"wait": WAIT}, "state": {"url": "memory://"}, "rule": list(rules), **more}


# --- the pregreet wait ---------------------------------------------------------

def test_a_client_that_waits_sees_220_dash_then_220_and_mail_goes_through(recorder: Recorder,
                                                                           guard_factory: Any) -> None:
    g = guard_factory(pregreet_doc(PREGREET_RULE), upstream=recorder.address)
    s = smtplib.SMTP(timeout=10)
    code, banner = s.connect(g.host, g.port)
    # smtplib joins the lines of one reply: the screen's 220- and aiosmtpd's 220
    assert code == 220
    assert banner.decode().split("\n") == ["mx.example.test ESMTP", "mx.example.test ESMTP smtpguard"]
    s.sendmail("a@sender.test", ["u@example.test"], b"Subject: t\r\n\r\nbody\r\n")
    s.quit()
    assert [m.rcpt_tos for m in recorder.messages] == [["u@example.test"]]
    assert g.events("connect")[-1].get("ip") == "127.0.0.1"


def test_swaks_waits_for_the_last_220_line(recorder: Recorder, guard_factory: Any) -> None:
    swaks = shutil.which("swaks")
    if swaks is None:
        pytest.skip("swaks (Debian package swaks) is not installed")
    g = guard_factory(pregreet_doc(PREGREET_RULE), upstream=recorder.address)
    r = subprocess.run([swaks, "--to", "u@example.test", "--from", "a@sender.test", "--server",
                        f"{g.host}:{g.port}", "--body", "via swaks"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = [ln.strip() for ln in r.stdout.splitlines()]
    assert "<-  220-mx.example.test ESMTP" in lines
    assert "<-  220 mx.example.test ESMTP smtpguard" in lines
    assert len(recorder.messages) == 1


def test_an_early_talker_is_refused_at_rcpt_with_pregreet(recorder: Recorder, guard_factory: Any) -> None:
    # the shipped policy, as is
    g = guard_factory({**pregreet_doc(), **tomllib.loads(default_rules_toml())}, upstream=recorder.address)
    c = Client(g)
    assert c.line() == "220-mx.example.test ESMTP"
    c.send("EHLO bot.test\r\n")          # before the last line: an early talker
    assert c.line() == "220 mx.example.test ESMTP smtpguard"
    assert c.reply()[-1].startswith("250 ")
    c.send("MAIL FROM:<a@sender.test>\r\n")
    assert c.line().startswith("250")
    c.send("RCPT TO:<u@example.test>\r\n")
    refusal = c.line()
    assert refusal.startswith("550 5.5.1 [PREGREET] ")
    c.send("RCPT TO:<postmaster@example.test>\r\n")   # postmaster stays reachable
    assert c.line().startswith("250")
    c.send("QUIT\r\n")
    c.close()
    assert recorder.messages == []
    rejects = [e for e in g.events("reject") if e.get("reason") == "PREGREET"]
    assert len(rejects) == 1 and rejects[0]["stage"] == "rcpt"


def test_a_rule_may_drop_an_early_talker_with_521(recorder: Recorder, guard_factory: Any) -> None:
    g = guard_factory(pregreet_doc(DROP_RULE), upstream=recorder.address)
    c = Client(g)
    assert c.line() == "220-mx.example.test ESMTP"
    c.send("EHLO bot.test\r\nMAIL FROM:<a@b.test>\r\n")
    assert c.line().startswith("521 5.7.1 [PREGREET] ")
    assert c.closed()
    events = [e for e in g.events() if e.get("session") == g.events("reject")[-1]["session"]]
    # one log line for the refused client (the connect line is debug)
    assert [e["event"] for e in events if e["level"] != "debug"] == ["reject"]
    assert events[-1]["action"] == "drop"


def test_a_client_talking_before_any_line_is_an_early_talker_too(recorder: Recorder, guard_factory: Any) -> None:
    g = guard_factory(pregreet_doc(DROP_RULE), upstream=recorder.address)
    sock = socket.create_connection((g.host, g.port), timeout=5)
    sock.sendall(b"EHLO fast.bot\r\n")   # most likely before the first line is written
    lines = [ln.decode().rstrip() for ln in read_all(sock).splitlines()]
    sock.close()
    assert lines[-1].startswith("521 5.7.1 [PREGREET]")


def test_a_passed_client_does_not_wait_again(recorder: Recorder, guard_factory: Any) -> None:
    g = guard_factory(pregreet_doc(PREGREET_RULE), upstream=recorder.address)
    c = Client(g)
    assert c.reply() == ["220-mx.example.test ESMTP", "220 mx.example.test ESMTP smtpguard"]
    c.close()
    # the pass is written off the client's path: wait for it, bounded
    wait_for(lambda: g._loop.run(g.services.pregreet_passed("127.0.0.1")), timeout=5)
    c = Client(g)
    assert c.line() == "220 mx.example.test ESMTP smtpguard"
    c.close()


def test_the_pass_cache_is_shared_by_two_proxies_on_one_redis(recorder: Recorder, guard_factory: Any,
                                                              redis_url: str) -> None:
    doc = {**pregreet_doc(PREGREET_RULE), "state": {"url": redis_url}}
    a = guard_factory(doc, upstream=recorder.address)
    b = guard_factory(doc, upstream=recorder.address)
    c = Client(b)
    assert c.line() == "220-mx.example.test ESMTP"
    c.close()
    c = Client(a)
    assert c.reply() == ["220-mx.example.test ESMTP", "220 mx.example.test ESMTP smtpguard"]
    c.close()
    wait_for(lambda: b._loop.run(b.services.pregreet_passed("127.0.0.1")), timeout=5)
    c = Client(b)                     # passed on a, known on b
    assert c.line() == "220 mx.example.test ESMTP smtpguard"
    c.close()


def test_exempt_networks_never_wait(recorder: Recorder, guard_factory: Any) -> None:
    g = guard_factory(pregreet_doc(PREGREET_RULE, limits={"exempt": ["127.0.0.0/8"]}), upstream=recorder.address)
    c = Client(g)
    assert c.line() == "220 mx.example.test ESMTP smtpguard"
    c.close()


# --- limits --------------------------------------------------------------------

def hold(g: Guard, n: int) -> list[Client]:
    """n sessions that got their greeting and stay open."""
    out = []
    for _ in range(n):
        c = Client(g)
        assert c.line().startswith("220 ")
        out.append(c)
    return out


@pytest.mark.parametrize("limits, expected", [
    ({"per_ip_sessions": 2}, "421 4.7.0 [BUSY] too many connections from your address"),
    ({"max_sessions": 2}, "421 4.3.2 [BUSY] too many connections"),
    ({"per_ip_rate": 2}, "421 4.7.0 [RATE] "),
], ids=["per-client concurrent sessions", "sessions of the process", "sessions per minute per client"])
def test_each_limit_refuses_the_next_session_and_exempt_networks_pass(
        recorder: Recorder, guard_factory: Any, limits: dict[str, Any], expected: str) -> None:
    doc = {"state": {"url": "memory://"}, "limits": {"per_ip_sessions": 0, **limits},
           "server": {"resolution_url": "https://help.test/?code={code}&ip={ip}"}}
    g = guard_factory(doc, upstream=recorder.address)
    held = hold(g, 2)
    c = Client(g)
    refusal = c.line()
    assert refusal.startswith(expected)
    assert refusal.endswith("https://help.test/?code=" + refusal.split("[")[1].split("]")[0] + "&ip=127.0.0.1")
    assert c.closed()
    # the refusal is one log line, with the limit and its running count
    (line,) = [e for e in g.events("defer") if e.get("stage") == "screen"]
    assert line["count"] == 1 and line["rule"] == next(iter(limits))
    for h in held:
        h.close()

    exempt = guard_factory({**doc, "limits": {**doc["limits"], "exempt": ["127.0.0.0/8"]}},
                           upstream=recorder.address)
    clients = hold(exempt, 3)
    for h in clients:
        h.close()


def test_a_closed_session_gives_its_place_back(recorder: Recorder, guard_factory: Any) -> None:
    g = guard_factory({"limits": {"per_ip_sessions": 1}}, upstream=recorder.address)
    for _ in range(3):
        with smtplib.SMTP(g.host, g.port, timeout=5) as s:
            assert s.noop()[0] == 250
        wait_for(lambda: g.services.clients.total == 0, timeout=5)


def test_the_rate_is_counted_across_two_proxies_sharing_redis(recorder: Recorder, guard_factory: Any,
                                                               redis_url: str) -> None:
    doc = {"state": {"url": redis_url}, "limits": {"per_ip_rate": 2}}
    a = guard_factory(doc, upstream=recorder.address)
    b = guard_factory(doc, upstream=recorder.address)
    for g in (a, b):
        c = Client(g)
        assert c.line().startswith("220 ")
        c.close()
    c = Client(a)
    assert c.line().startswith("421 4.7.0 [RATE]")
    c.close()


# --- refusal at connect and the minimal dialogue after it -----------------------------

def test_a_refusal_at_connect_answers_503_then_221_without_a_session(recorder: Recorder,
                                                                    guard_factory: Any) -> None:
    doc = {"policy": {"reject_at": "connect"},
           "rule": [{"name": "no-loopback", "stage": "connect", "when": {"ip_in": ["127.0.0.0/8"]},
                     "action": "reject"}]}
    g = guard_factory(doc, upstream=recorder.address)
    c = Client(g)
    assert c.line().startswith("554 5.7.1 [POLICY] ")
    c.send("EHLO x.test\r\nMAIL FROM:<a@b.test>\r\n")
    assert c.line().startswith("503 5.5.1 [POLICY] ")
    assert c.line().startswith("503 5.5.1 [POLICY] ")
    c.send("QUIT\r\n")
    assert c.line() == "221 2.0.0 Bye"
    assert c.closed()
    assert g.server.sessions == set()     # no SMTP object was made for it
    assert len(g.events("reject")) == 1


# --- the PROXY protocol ahead of the screen ---------------------------------------------

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def v2(command: int, family_proto: int, body: bytes) -> bytes:
    return V2_SIG + bytes([0x20 | command, family_proto]) + struct.pack("!H", len(body)) + body


PROXY_CASES = [
    ("v1 TCP4", b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 25\r\n", "192.0.2.7"),
    ("v1 TCP6 with an IPv4-mapped address", b"PROXY TCP6 ::ffff:192.0.2.7 ::1 40000 25\r\n", "192.0.2.7"),
    ("v1 TCP6", b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 25\r\n", "2001:db8::7"),
    ("v1 UNKNOWN keeps the peer", b"PROXY UNKNOWN\r\n", "127.0.0.1"),
    ("v2 TCP4", v2(1, 0x11, socket.inet_aton("192.0.2.9") + socket.inet_aton("198.51.100.1")
                   + struct.pack("!HH", 40000, 25)), "192.0.2.9"),
    ("v2 TCP6 mapped", v2(1, 0x21, socket.inet_pton(socket.AF_INET6, "::ffff:10.0.0.1")
                          + socket.inet_pton(socket.AF_INET6, "::1") + struct.pack("!HH", 40000, 25)), "10.0.0.1"),
    ("v2 LOCAL keeps the peer", v2(0, 0x00, b""), "127.0.0.1"),
    ("v2 AF_UNIX keeps the peer", v2(1, 0x31, b"/run/client.sock".ljust(108, b"\0") + b"/run/s".ljust(108, b"\0")),
     "127.0.0.1"),
]


@pytest.mark.parametrize("label, header, ip", PROXY_CASES, ids=[c[0] for c in PROXY_CASES])
def test_a_trusted_proxy_header_names_the_client(recorder: Recorder, guard_factory: Any, label: str,
                                                 header: bytes, ip: str) -> None:
    g = guard_factory({"server": {"proxy_protocol": True, "proxy_trusted": ["127.0.0.0/8"]}},
                      upstream=recorder.address)
    sock = socket.create_connection((g.host, g.port), timeout=5)
    sock.sendall(header)
    f = sock.makefile("rb")
    assert f.readline().startswith(b"220 ")
    sock.close()
    assert g.events("connect")[-1]["ip"] == ip


def test_a_proxy_header_from_an_untrusted_address_is_closed_without_a_banner(recorder: Recorder,
                                                                            guard_factory: Any) -> None:
    g = guard_factory({"server": {"proxy_protocol": True, "proxy_trusted": ["10.0.0.0/8"]}},
                      upstream=recorder.address)
    sock = socket.create_connection((g.host, g.port), timeout=5)
    sock.sendall(b"PROXY TCP4 127.0.0.1 127.0.0.1 40000 25\r\n")
    assert read_all(sock) == b""
    sock.close()
    (warned,) = g.events("proxy.untrusted")
    assert warned["ip"] == "127.0.0.1"
    assert g.events("connect") == []


@pytest.mark.parametrize("header", [
    b"PROXY TCP4 not-an-ip 127.0.0.1 1 25\r\n",
    b"PROXY TCP4 192.0.2.1 127.0.0.1 99999 25\r\n",
    b"EHLO no.proxy.header\r\n",
    V2_SIG + b"\x21\x11\x00\x02xx",
], ids=["bad address", "bad port", "no header", "v2 truncated address"])
def test_a_malformed_proxy_header_closes_without_a_banner(recorder: Recorder, guard_factory: Any,
                                                          header: bytes) -> None:
    g = guard_factory({"server": {"proxy_protocol": True, "proxy_trusted": ["127.0.0.0/8"]}},
                      upstream=recorder.address)
    sock = socket.create_connection((g.host, g.port), timeout=5)
    sock.sendall(header)
    assert read_all(sock) == b""
    sock.close()
    assert len(g.events("proxy.invalid")) == 1


def test_proxy_then_pregreet_then_limits_count_the_real_client(recorder: Recorder, guard_factory: Any) -> None:
    g = guard_factory({**pregreet_doc(PREGREET_RULE), "server": {"proxy_protocol": True,
                                                                 "proxy_trusted": ["127.0.0.0/8"]},
                       "limits": {"per_ip_sessions": 1}}, upstream=recorder.address)

    def proxied(ip: str) -> Client:
        c = Client(g)
        c.send(f"PROXY TCP4 {ip} 127.0.0.1 40000 25\r\n")
        return c

    first = proxied("192.0.2.1")
    assert first.reply() == ["220-mx.example.test ESMTP", "220 mx.example.test ESMTP smtpguard"]
    other = proxied("192.0.2.2")          # another client behind the same balancer
    assert other.line() == "220-mx.example.test ESMTP"
    again = proxied("192.0.2.1")          # the first client's second session
    assert again.line().startswith("421 4.7.0 [BUSY]")
    for c in (first, other, again):
        c.close()


# --- configuration -----------------------------------------------------------------

@pytest.mark.parametrize("args, key", [
    (["--upstream", "127.0.0.1:2526", "--domain", "example.test"], "server.proxy_trusted"),
    (["--upstream", "127.0.0.1:2526", "--domain", "example.test", "--proxy-trusted", "10.0.0.1/8"],
     "--proxy-trusted"),
], ids=["proxy_protocol without proxy_trusted", "a network with host bits"])
def test_proxy_settings_errors_are_one_line_exit_2(tmp_path: Any, args: list[str], key: str) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text("[server]\nproxy_protocol = true\nlisten = ['127.0.0.1:0']\n")
    r = subprocess.run([sys.executable, "-m", "smtpguard", "serve", "--config", str(conf), *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert key in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_an_ipv6_client_is_counted_per_64_and_named_as_itself(recorder: Recorder, guard_factory: Any) -> None:
    try:
        socket.create_server(("::1", 0), family=socket.AF_INET6).close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    g = guard_factory({"limits": {"per_ip_sessions": 1}}, upstream=recorder.address, listen=["[::1]:0"])
    first = Client(g)
    assert first.line().startswith("220 ")
    second = Client(g)
    assert second.line().startswith("421 4.7.0 [BUSY]")
    second.close()
    first.close()
    assert g.events("connect")[-1]["ip"] == "::1"
    (refusal,) = [e for e in g.events("defer") if e.get("stage") == "screen"]
    assert refusal["ip"] == "::1"


def test_the_pass_is_remembered_for_pass_ttl_by_the_injected_clock(recorder: Recorder, guard_factory: Any) -> None:
    now = [1_000_000.0]
    doc = {**pregreet_doc(PREGREET_RULE), "pregreet": {"wait": WAIT, "pass_ttl": "1h"}}
    g = guard_factory(doc, upstream=recorder.address, clock=lambda: now[0])
    c = Client(g)
    assert c.reply() == ["220-mx.example.test ESMTP", "220 mx.example.test ESMTP smtpguard"]
    c.close()
    wait_for(lambda: g._loop.run(g.services.pregreet_passed("127.0.0.1")), timeout=5)
    now[0] += 3599
    c = Client(g)
    assert c.line() == "220 mx.example.test ESMTP smtpguard"   # within pass_ttl
    c.close()
    now[0] += 2
    c = Client(g)
    assert c.line() == "220-mx.example.test ESMTP"              # expired: tested again
    c.close()


def test_bytes_after_the_proxy_header_reach_the_session(recorder: Recorder, guard_factory: Any) -> None:
    g = guard_factory({"server": {"proxy_protocol": True, "proxy_trusted": ["127.0.0.0/8"]}},
                      upstream=recorder.address)
    c = Client(g)
    c.send("PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\nEHLO pipelined.test\r\n")   # one segment
    assert c.line() == "220 mx.example.test ESMTP smtpguard"
    assert c.reply()[-1].startswith("250 ")
    c.send("QUIT\r\n")
    assert c.line().startswith("221")
    c.close()
    assert g.events("connect")[-1]["ip"] == "192.0.2.7"


def test_a_client_flooding_the_wait_is_paused_and_refused_not_buffered(recorder: Recorder,
                                                                       guard_factory: Any) -> None:
    g = guard_factory(pregreet_doc(DROP_RULE), upstream=recorder.address)
    sock = socket.create_connection((g.host, g.port), timeout=5)
    try:
        sock.sendall(b"X" * 200_000)      # more than the screen keeps
    except OSError:
        pass                               # the server may close first
    lines = [ln.decode().rstrip() for ln in read_all(sock).splitlines()]
    sock.close()
    assert not lines or lines[-1].startswith("521 5.7.1 [PREGREET]")
    wait_for(lambda: g.services.clients.total == 0, timeout=5)
