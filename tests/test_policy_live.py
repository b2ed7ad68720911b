"""Policy in live sessions: real clients, smtpguard, a recording upstream and
a DNS server of its own on loopback. The client is always 127.0.0.1."""

from __future__ import annotations

import smtplib
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_dns import DnsServer
from tests.fixtures_smtp import Recorder, wait_for

MESSAGE = b"Subject: policy\r\n\r\nbody\r\n"
URL = "https://help.example.test/smtp?code={code}&ip={ip}"
PTR = "1.0.0.127.in-addr.arpa"


def zones(tmp_path: Path, **countries: str) -> str:
    """A zone directory where each country file lists the given networks."""
    d = tmp_path / "zones"
    d.mkdir(exist_ok=True)
    for cc, nets in countries.items():
        (d / f"{cc}.zone").write_text(nets.replace(",", "\n") + "\n")
    return str(d)


def rules(*tables: dict[str, Any], **policy: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"rule": list(tables)}
    if policy:
        doc["policy"] = policy
    return doc


def test_connect_stage_runs_before_the_banner(recorder: Recorder, guard_factory: Any, tmp_path: Path) -> None:
    doc = {"geo": {"zones": zones(tmp_path, cn="127.0.0.0/8"), "allow": ["US"]}, "policy": {"reject_at": "connect"}}
    g = guard_factory(doc, upstream=recorder.address, resolution_url=URL)
    probed = recorder.connections  # the start-up probe of the MTA's extensions
    with socket.create_connection((g.host, g.port), timeout=10) as sock:
        f = sock.makefile("rb")
        banner = f.readline()
        assert banner == (b"554 5.7.1 [GEO] mail from this country is not accepted here "
                          b"https://help.example.test/smtp?code=GEO&ip=127.0.0.1\r\n")
        sock.sendall(b"EHLO c.test\r\nMAIL FROM:<a@sender.test>\r\nQUIT\r\n")
        assert f.readline().startswith(b"503 5.5.1 [GEO] ")  # RFC 5321 §3.1: only QUIT after a 554 greeting
        assert f.readline().startswith(b"503 5.5.1 [GEO] ")
        assert f.readline().startswith(b"221 ")
    assert recorder.connections == probed  # the refused client cost no upstream connection


def test_denied_country_is_refused_at_rcpt_but_postmaster_stays_reachable(
        recorder: Recorder, guard_factory: Any, tmp_path: Path) -> None:
    doc = {"geo": {"zones": zones(tmp_path, cn="127.0.0.0/8", us="192.0.2.0/24"), "allow": ["US", "CA", "MX"]}}
    g = guard_factory(doc, upstream=recorder.address, resolution_url=URL)
    with smtplib.SMTP(g.host, g.port, timeout=10) as s:
        assert s.ehlo("c.test")[0] == 250
        assert s.mail("a@sender.test")[0] == 250
        code, text = s.rcpt("b@example.test")
        assert (code, text) == (550, b"5.7.1 [GEO] mail from this country is not accepted here "
                                     b"https://help.example.test/smtp?code=GEO&ip=127.0.0.1")
        assert s.rcpt("postmaster@example.test")[0] == 250
        assert s.rcpt("c@example.test")[0] == 550  # the postmaster exception is per recipient
        s.data(MESSAGE)
    assert recorder.messages[0].rcpt_tos == ["postmaster@example.test"]
    [reject, *_] = g.events("reject")
    assert reject["reason"] == "GEO" and reject["rule"] == "geo-allow" and reject["sender"] == "a@sender.test"


def test_local_addresses_are_not_geoblocked_by_the_shorthand(recorder: Recorder, guard_factory: Any, tmp_path: Path) -> None:
    g = guard_factory({"geo": {"zones": zones(tmp_path, us="192.0.2.0/24"), "allow": ["US"]}}, upstream=recorder.address)
    with smtplib.SMTP(g.host, g.port, timeout=10) as s:
        s.sendmail("a@sender.test", ["b@example.test"], MESSAGE)
    assert len(recorder.messages) == 1


def test_no_ptr_is_refused_at_rcpt_with_reason_and_url(recorder: Recorder, guard_factory: Any, dns_server: DnsServer) -> None:
    dns_server.nxdomain(PTR)
    doc = rules({"name": "no-rdns", "stage": "connect", "when": {"rdns": "none"}, "action": "reject", "reason": "RDNS"})
    g = guard_factory(doc, upstream=recorder.address, resolution_url=URL)
    with smtplib.SMTP(g.host, g.port, timeout=10) as s:
        s.ehlo("c.test")
        s.mail("a@sender.test")
        code, text = s.rcpt("b@example.test")
    assert code == 550
    assert text == (b"5.7.25 [RDNS] the client address has no reverse DNS "
                    b"https://help.example.test/smtp?code=RDNS&ip=127.0.0.1")
    assert recorder.messages == []


def test_a_dns_outage_never_rejects(recorder: Recorder, guard_factory: Any, dns_server: DnsServer) -> None:
    dns_server.servfail(PTR)
    doc = rules({"name": "no-rdns", "stage": "connect", "when": {"rdns": "none"}, "action": "reject", "reason": "RDNS"},
                {"name": "rdns-temp", "stage": "connect", "when": {"rdns": "unknown"}, "action": "tempfail", "reason": "DNS-TEMP"})
    g = guard_factory(doc, upstream=recorder.address)
    with smtplib.SMTP(g.host, g.port, timeout=10) as s:
        s.ehlo("c.test")
        s.mail("a@sender.test")
        code, text = s.rcpt("b@example.test")
    assert code == 451 and text.startswith(b"4.4.3 [DNS-TEMP] ")


@pytest.mark.parametrize("kind", ["xclient", "xforward"])
def test_confirmed_rdns_is_passed_to_the_mta_and_the_trace(recorder_factory: Any, guard_factory: Any,
                                                           dns_server: DnsServer, kind: str) -> None:
    # XFORWARD is for the MTA's log (Postfix's orig_client=name[addr]): the name
    # is looked up for it too, though no rule reads rdns (found behind Postfix:
    # orig_client=unknown[...] for a confirmed client).
    up = recorder_factory(**{kind: True})
    dns_server.set(PTR, "PTR", ["mail.sender.test."])
    dns_server.set("mail.sender.test", "A", ["127.0.0.1"])
    g = guard_factory({"upstream": {kind: True}}, upstream=up.address)
    with smtplib.SMTP(g.host, g.port, timeout=10) as s:
        s.ehlo("mail.sender.test")
        s.sendmail("a@sender.test", ["b@example.test"], MESSAGE)
    seen = up.messages[0].xclient if kind == "xclient" else up.messages[0].xforward
    assert seen["NAME"] == "mail.sender.test"
    assert b"from mail.sender.test (mail.sender.test [127.0.0.1])" in up.messages[0].content


def test_xclient_tells_the_mta_the_ptr_name_and_a_failed_lookup_as_postfix_would_see_them(
        recorder_factory: Any, guard_factory: Any, dns_server: DnsServer) -> None:
    """NAME is the confirmed name, REVERSE_NAME the PTR name even when it does
    not confirm, and a lookup that failed temporarily is [TEMPUNAVAIL] in both
    (Postfix's XCLIENT_README), so the MTA's reject_unknown_* restrictions
    answer as they would for the client itself: 450, not 550, for a DNS fault."""
    from tests.fixtures_dns import ptr_name

    up = recorder_factory(xclient=True)
    dns_server.set_ptr("127.0.0.5", ["five.sender.test"])
    dns_server.set("five.sender.test", "A", ["127.0.0.5"])
    dns_server.set_ptr("127.0.0.6", ["six.sender.test"])
    dns_server.set("six.sender.test", "A", ["192.0.2.1"])      # does not confirm
    dns_server.nxdomain(ptr_name("127.0.0.7"))
    dns_server.servfail(ptr_name("127.0.0.8"))
    g = guard_factory({"upstream": {"xclient": True}}, upstream=up.address)
    for ip in ("127.0.0.5", "127.0.0.6", "127.0.0.7", "127.0.0.8"):
        with smtplib.SMTP(g.host, g.port, timeout=10, source_address=(ip, 0)) as s:
            s.ehlo("h.sender.test")
            s.sendmail("a@sender.test", ["b@example.test"], MESSAGE)
    assert [(m.xclient["ADDR"], m.xclient["NAME"], m.xclient["REVERSE_NAME"]) for m in up.messages] == [
        ("127.0.0.5", "five.sender.test", "five.sender.test"),
        ("127.0.0.6", "[UNAVAILABLE]", "six.sender.test"),
        ("127.0.0.7", "[UNAVAILABLE]", "[UNAVAILABLE]"),
        ("127.0.0.8", "[TEMPUNAVAIL]", "[TEMPUNAVAIL]")]


def test_dnsbl_listing_is_refused_naming_the_list(recorder: Recorder, guard_factory: Any, dns_server: DnsServer) -> None:
    dns_server.set("1.0.0.127.bl.test", "A", ["127.0.0.2"])
    dns_server.nxdomain(PTR)
    doc = {"dnsbl": [{"zone": "bl.test", "weight": 3}],
           **rules({"name": "dnsbl", "stage": "connect", "when": {"dnsbl_score_ge": 3}, "action": "reject", "reason": "DNSBL"})}
    g = guard_factory(doc, upstream=recorder.address)
    with smtplib.SMTP(g.host, g.port, timeout=10) as s:
        s.ehlo("c.test")
        s.mail("a@sender.test")
        code, text = s.rcpt("b@example.test")
    assert code == 550 and b"[DNSBL]" in text and b"bl.test (127.0.0.2)" in text


def test_observe_mode_logs_and_delivers(recorder: Recorder, guard_factory: Any) -> None:
    doc = rules({"name": "everyone", "when": {"ip_in": ["127.0.0.0/8"]}, "action": "reject", "observe": True})
    g = guard_factory(doc, upstream=recorder.address)
    with smtplib.SMTP(g.host, g.port, timeout=10) as s:
        s.sendmail("a@sender.test", ["b@example.test"], MESSAGE)
    assert len(recorder.messages) == 1
    [seen] = g.events("observe")
    assert seen["rule"] == "everyone" and seen["would"] == "reject" and seen["rcpt"] == "b@example.test"


def test_helo_claiming_to_be_us_is_refused(recorder: Recorder, guard_factory: Any, dns_server: DnsServer) -> None:
    dns_server.nxdomain(PTR)
    doc = rules({"name": "helo-forged", "stage": "helo", "when": {"helo_is_us": True}, "action": "reject", "reason": "HELO-FORGED"})
    g = guard_factory(doc, upstream=recorder.address)
    with smtplib.SMTP(g.host, g.port, timeout=10) as s:
        assert s.ehlo("MX.Example.TEST")[0] == 250  # held back to RCPT (reject_at = "rcpt")
        s.mail("a@sender.test")
        code, text = s.rcpt("b@example.test")
    assert code == 550 and text.startswith(b"5.7.1 [HELO-FORGED] ")
    with smtplib.SMTP(g.host, g.port, timeout=10) as s:
        s.ehlo("mail.other.test")  # a mismatching HELO alone is fine (RFC 5321 §4.1.4)
        s.sendmail("a@sender.test", ["b@example.test"], MESSAGE)
    assert len(recorder.messages) == 1


def test_accept_rule_is_an_allowlist_for_the_session(recorder: Recorder, guard_factory: Any) -> None:
    doc = rules({"name": "friends", "stage": "connect", "when": {"ip_in": ["127.0.0.1/32"]}, "action": "accept"},
                {"name": "nobody", "stage": "rcpt", "action": "reject"})
    g = guard_factory(doc, upstream=recorder.address)
    with smtplib.SMTP(g.host, g.port, timeout=10) as s:
        s.sendmail("a@sender.test", ["b@example.test"], MESSAGE)
        code, _ = s.docmd("MAIL", "FROM:<a@sender.test>")
        assert s.rcpt("x@other.test")[0] == 550  # an allowlist never makes an open relay
    assert len(recorder.messages) == 1


def test_graylisting_defers_the_first_attempt_and_passes_the_retry(recorder: Recorder, guard_factory: Any) -> None:
    now = [1_000_000.0]
    doc = {"state": {"url": "memory://"}, "graylist": {"delay": "180s"},
           **rules({"name": "graylist", "action": "graylist"})}
    g = guard_factory(doc, clock=lambda: now[0], upstream=recorder.address, resolution_url=URL)
    with smtplib.SMTP(g.host, g.port, timeout=10) as s:
        s.ehlo("c.test")
        s.mail("a@sender.test")
        code, text = s.rcpt("b@example.test")
        assert code == 451
        assert text == (b"4.7.1 [GRAYLIST] graylisted, try again in 180 seconds "
                        b"https://help.example.test/smtp?code=GRAYLIST&ip=127.0.0.1")
    now[0] += 60
    with smtplib.SMTP(g.host, g.port, timeout=10) as s:
        s.ehlo("c.test")
        s.mail("a@sender.test")
        assert s.rcpt("b@example.test") == (451, b"4.7.1 [GRAYLIST] graylisted, try again in 120 seconds "
                                                  b"https://help.example.test/smtp?code=GRAYLIST&ip=127.0.0.1")
    now[0] += 121
    with smtplib.SMTP(g.host, g.port, timeout=10) as s:
        s.sendmail("a@sender.test", ["b@example.test"], MESSAGE)
    assert len(recorder.messages) == 1
    assert [e["wait"] for e in g.events("graylist.defer")] == [180, 120]


def _connect_with_ttl(host: str, port: int, ttl: int | None) -> None:
    sock = socket.socket()
    if ttl is not None:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
    sock.settimeout(10)
    sock.connect((host, port))
    with sock, smtplib.SMTP() as s:
        s.sock = sock
        s.file = None
        s.getreply()
        s.ehlo("c.test")
        s.quit()


def test_os_fingerprint_tells_ttl_128_from_the_default(recorder: Recorder, guard_factory: Any) -> None:
    doc = rules({"name": "see-os", "stage": "connect", "when": {"os": "windows"}, "action": "reject", "observe": True})
    g = guard_factory(doc, upstream=recorder.address)
    _connect_with_ttl(g.host, g.port, None)
    _connect_with_ttl(g.host, g.port, 128)
    closes = wait_for(lambda: len(g.events("close")) == 2 and g.events("close"))
    digests = [c.get("facts", "") for c in closes]
    assert "os=linux" in digests[0]
    assert "os=linux" not in digests[1] and "os=unknown" in digests[1]


def test_tarpit_slows_every_later_reply(recorder: Recorder, guard_factory: Any) -> None:
    import time
    doc = rules({"name": "slow", "stage": "connect", "when": {"ip_in": ["127.0.0.0/8"]}, "action": "tarpit",
                 "delay": "0.3s"})
    g = guard_factory(doc, upstream=recorder.address)
    start = time.monotonic()
    with smtplib.SMTP(g.host, g.port, timeout=10) as s:
        s.ehlo("c.test")
        s.mail("a@sender.test")
    # banner, EHLO and MAIL each waited the stutter time (spamd -S), and mail still flows
    assert time.monotonic() - start >= 0.9
    assert len(recorder.messages) == 0
