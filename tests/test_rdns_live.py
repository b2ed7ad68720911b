"""HELO-aware generic rDNS in live sessions (issue 14): the `rdns_generic`
fact is gathered at connect, before the client names itself; from the HELO
stage on it is classified again with the HELO name (sources/rdns.with_helo),
so a forward-confirmed name that the client also gives as its HELO name
needs one more piece of evidence. Real smtplib clients, smtpguard, a
recording upstream and the loopback DNS server; the client is 127.0.0.1."""

from __future__ import annotations

import smtplib
from typing import Any

import pytest

from tests.fixtures_dns import DnsServer
from tests.fixtures_smtp import Recorder

PTR = "1.0.0.127.in-addr.arpa"
# Forward-confirmed, hand-named with two pool words: score 3, generic on its
# own; the same name as the client's HELO name scores 2 (core/rdns.py).
NAME = "static1-res.company.test"
MESSAGE = b"Subject: rdns\r\n\r\nbody\r\n"


def _rule(stage: str) -> dict[str, Any]:
    return {"rule": [{"name": "generic-rdns", "stage": stage, "when": {"rdns_generic": True},
                      "action": "reject", "reason": "RDNS-GENERIC"}]}


def _rcpt_reply(g: Any, helo: str) -> tuple[int, bytes]:
    with smtplib.SMTP(g.host, g.port, timeout=10) as s:
        assert s.ehlo(helo)[0] == 250
        assert s.mail("a@sender.test")[0] == 250
        return s.rcpt("b@example.test")


@pytest.mark.parametrize("stage", ["helo", "rcpt"])
def test_a_confirmed_name_given_as_helo_is_not_generic_at_rcpt(
        stage: str, recorder: Recorder, guard_factory: Any, dns_server: DnsServer) -> None:
    dns_server.set(PTR, "PTR", [NAME + "."])
    dns_server.set(NAME, "A", ["127.0.0.1"])
    g = guard_factory(_rule(stage), upstream=recorder.address)

    # HELO with another name: the connect-stage verdict (generic) stands
    code, text = _rcpt_reply(g, "mail.other.test")
    assert code == 550 and text.startswith(b"5.7.1 [RDNS-GENERIC] "), (code, text)

    # HELO with that very name (case and trailing dot aside): not generic
    code, text = _rcpt_reply(g, NAME.upper() + ".")
    assert code == 250, (code, text)
    with smtplib.SMTP(g.host, g.port, timeout=10) as s:
        s.ehlo(NAME)
        s.sendmail("a@sender.test", ["b@example.test"], MESSAGE)
    assert len(recorder.messages) == 1


def test_a_second_ehlo_with_another_name_makes_it_generic_again(
        recorder: Recorder, guard_factory: Any, dns_server: DnsServer) -> None:
    dns_server.set(PTR, "PTR", [NAME + "."])
    dns_server.set(NAME, "A", ["127.0.0.1"])
    g = guard_factory(_rule("rcpt"), upstream=recorder.address)
    with smtplib.SMTP(g.host, g.port, timeout=10) as s:
        assert s.ehlo(NAME)[0] == 250
        assert s.ehlo("mail.other.test")[0] == 250   # RFC 5321 §4.1.4: a new EHLO resets the session
        s.mail("a@sender.test")
        code, text = s.rcpt("b@example.test")
    assert code == 550 and b"[RDNS-GENERIC]" in text, (code, text)


def test_an_address_pool_name_stays_generic_whatever_the_helo(
        recorder: Recorder, guard_factory: Any, dns_server: DnsServer) -> None:
    pool = "dyn-127-0-0-1.isp.test"   # the whole address and a dynamic word: score 6, 5 with the HELO
    dns_server.set(PTR, "PTR", [pool + "."])
    dns_server.set(pool, "A", ["127.0.0.1"])
    g = guard_factory(_rule("rcpt"), upstream=recorder.address)
    code, text = _rcpt_reply(g, pool)
    assert code == 550 and b"[RDNS-GENERIC]" in text, (code, text)
