"""DKIM results reach the MTA behind: an Authentication-Results header
(RFC 8601) on every relayed message, forged ones with our authserv-id
removed (§5). Live: keys made in the test, published in the loopback DNS
server; the recording upstream keeps the message byte for byte."""

from __future__ import annotations

import smtplib
from typing import Any

from tests.fixtures_dns import DnsServer
from tests.fixtures_smtp import Recorder
from tests import test_dkim
from tests.test_dkim import publish, signed

key = test_dkim.key  # the RSA key fixture, shared with test_dkim.py

FORGED = (b"Authentication-Results: mx.example.test; dkim=pass header.d=bank.test\r\n"
          b"Authentication-Results: other.example; spf=pass\r\n")


def relay(g: Any, message: bytes) -> None:
    with smtplib.SMTP(g.host, g.port, timeout=10) as s:
        s.sendmail("a@sender.test", ["b@example.test"], message)


def headers_of(recorder: Recorder) -> bytes:
    return recorder.messages[-1].content.split(b"\r\n\r\n", 1)[0]


def test_a_passing_signature_is_reported_and_forgeries_removed(recorder: Recorder, guard_factory: Any,
                                                               dns_server: DnsServer, key: Any) -> None:
    publish(dns_server, key)
    g = guard_factory(upstream=recorder.address)
    relay(g, FORGED + signed(key))
    head = headers_of(recorder)
    ours = [line for line in head.split(b"\r\n") if line.startswith(b"Authentication-Results: mx.example.test;")]
    assert len(ours) == 1, head  # the forged one with our authserv-id is gone, ours is there
    assert b"dkim=pass" in head and b"header.d=sender.test" in head and b"header.s=s1" in head
    assert b"bank.test" not in head
    assert b"Authentication-Results: other.example; spf=pass" in head  # another authserv-id is kept
    # the signature still verifies at the MTA: the signed header fields are untouched
    assert b"DKIM-Signature:" in head


def test_a_tampered_body_is_reported_as_a_failure(recorder: Recorder, guard_factory: Any,
                                                  dns_server: DnsServer, key: Any) -> None:
    publish(dns_server, key)
    g = guard_factory(upstream=recorder.address)
    relay(g, signed(key).replace(b"Hello", b"Howdy"))
    head = headers_of(recorder)
    assert b"Authentication-Results: mx.example.test;" in head and b"dkim=fail" in head


def test_an_unsigned_message_gets_dkim_none(recorder: Recorder, guard_factory: Any) -> None:
    g = guard_factory(upstream=recorder.address)
    relay(g, b"From: a@sender.test\r\nSubject: plain\r\n\r\nbody\r\n")
    assert b"Authentication-Results: mx.example.test;\r\n\tdkim=none" in headers_of(recorder)


def test_each_message_of_a_session_carries_its_own_dkim_results(recorder: Recorder, guard_factory: Any,
                                                                dns_server: DnsServer, key: Any,
                                                                monkeypatch: Any) -> None:
    # a signed message, then one too large to verify (no DKIM result of its
    # own): the second must not carry the first one's pass
    from smtpguard import session as session_module

    monkeypatch.setattr(session_module, "CONTENT_LIMIT", 4000)   # the limit, small enough for a test
    publish(dns_server, key)
    g = guard_factory(upstream=recorder.address)
    with smtplib.SMTP(g.host, g.port, timeout=10) as s:
        s.sendmail("a@sender.test", ["b@example.test"], signed(key))
        s.sendmail("a@sender.test", ["b@example.test"], b"From: a@sender.test\r\n\r\n" + (b"x" * 70 + b"\r\n") * 120 + b"\r\n")
    first, second = (m.content.split(b"\r\n\r\n", 1)[0] for m in recorder.messages[-2:])
    assert b"dkim=pass" in first
    assert b"dkim=pass" not in second and b"header.d=sender.test" not in second, second
