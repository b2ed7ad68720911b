"""Transparent to the MTA behind (issue: ESMTP transparency).

smtpguard mirrors the MTA's SMTPUTF8, DSN, 8BITMIME and SIZE where it can
carry them, and never offers what the MTA lacks. Live against the
recording upstream (aiosmtpd) and Postfix's smtp-sink, whose dump keeps
the MAIL and RCPT arguments byte for byte.
"""

from __future__ import annotations

import os
import shutil
import smtplib
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpguard.core.address import DomainSet, Recipient, check_recipient
from tests.fixtures_smtp import free_port, raw_ehlo, wait_for, wait_port
from tests.test_promises import read_reply

MESSAGE = "From: 用户@b.test\r\nSubject: EAI\r\n\r\nHallo München\r\n".encode()


def ehlo_lines(host: str, port: int) -> list[str]:
    with socket.create_connection((host, port), timeout=10) as sock:
        f = sock.makefile("rb")
        read_reply(f)
        sock.sendall(b"EHLO c.test\r\n")
        _, text = read_reply(f)
    return [line[4:] for line in text.split("\n")]


def test_utf8_sender_and_recipient_relayed_when_the_mta_offers_smtputf8(recorder_factory: Any,
                                                                       guard_factory: Any) -> None:
    up = recorder_factory(smtputf8=True)
    g = guard_factory(upstream=up.address)
    assert "SMTPUTF8" in ehlo_lines(g.host, g.port)
    with smtplib.SMTP(g.host, g.port, timeout=10) as s:
        s.ehlo("c.test")
        s.sendmail("用户@b.test", ["üser@example.test"], MESSAGE, mail_options=["SMTPUTF8"])
    m = up.messages[0]
    assert m.mail_from == "用户@b.test" and m.rcpt_tos == ["üser@example.test"]
    assert "SMTPUTF8" in m.mail_options
    # the trace names the protocol RFC 6531 §4.3 gives, in UTF-8
    assert m.content.startswith(b"Received: from c.test") and b"with UTF8SMTP id" in m.content
    assert "for <üser@example.test>".encode() in m.content


def test_no_smtputf8_offered_when_the_mta_lacks_it_and_a_clear_553(recorder: Any, guard: Any) -> None:
    assert "SMTPUTF8" not in ehlo_lines(guard.host, guard.port)
    with socket.create_connection((guard.host, guard.port), timeout=10) as sock:
        f = sock.makefile("rb")
        read_reply(f)
        raw_ehlo(sock, f)
        sock.sendall("MAIL FROM:<用户@b.test> SMTPUTF8\r\n".encode())
        code, text = read_reply(f)
        assert code in (501, 555) or code == 553, text
        sock.sendall("MAIL FROM:<用户@b.test>\r\n".encode())
        code, text = read_reply(f)
        assert code == 553 and "5.6.7 [NO-SMTPUTF8]" in text, text
        sock.sendall(b"MAIL FROM:<a@b.test>\r\n")
        assert read_reply(f)[0] == 250
        sock.sendall("RCPT TO:<üser@example.test>\r\n".encode())
        code, text = read_reply(f)
        assert code == 553 and "5.6.7" in text, text
    assert recorder.messages == []


def test_a_utf8_address_without_the_smtputf8_parameter_is_553(recorder_factory: Any, guard_factory: Any) -> None:
    up = recorder_factory(smtputf8=True)
    g = guard_factory(upstream=up.address)
    with socket.create_connection((g.host, g.port), timeout=10) as sock:
        f = sock.makefile("rb")
        read_reply(f)
        raw_ehlo(sock, f)
        sock.sendall("MAIL FROM:<用户@b.test>\r\n".encode())
        code, text = read_reply(f)
        assert code == 553 and "5.6.7 [NO-SMTPUTF8]" in text, text


@pytest.fixture
def sink_dump() -> Iterator[tuple[str, Path]]:
    """Postfix's smtp-sink, dumping each transaction with its MAIL and RCPT arguments."""
    path = "/usr/sbin/smtp-sink"
    if not os.path.exists(path):
        pytest.skip("smtp-sink (Debian package postfix) is not installed")
    # smtp-sink drops to `nobody`: its dump directory must be reachable by it
    # (pytest's tmp_path sits under a directory of mode 0700).
    dump = Path(tempfile.mkdtemp(prefix="smtpguard-sink-"))
    dump.chmod(0o777)
    port = free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    proc = subprocess.Popen([path, *user, "-D", str(dump / "all"), f"127.0.0.1:{port}", "10"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port("127.0.0.1", port)
        yield f"127.0.0.1:{port}", dump / "all"
    finally:
        proc.terminate()
        proc.wait(5)
        shutil.rmtree(dump, ignore_errors=True)


def expect_replies(g: Any, steps: list[tuple[bytes, int]]) -> None:
    """One session after EHLO: each line sent, its reply's code as expected."""
    with socket.create_connection((g.host, g.port), timeout=10) as sock, sock.makefile("rb") as f:
        read_reply(f)
        raw_ehlo(sock, f)
        for line, code in steps:
            sock.sendall(line)
            got, text = read_reply(f)
            assert got == code, (line, text)


def test_dsn_parameters_reach_the_mta_byte_for_byte(sink_dump: tuple[str, Path], guard_factory: Any) -> None:
    address, dump = sink_dump
    g = guard_factory(upstream=address)
    assert "DSN" in ehlo_lines(g.host, g.port)
    expect_replies(g, [(b"MAIL FROM:<a@b.test> RET=HDRS ENVID=Q+2Bx1\r\n", 250),
                       (b"RCPT TO:<b@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.test\r\n", 250),
                       (b"RCPT TO:<c@example.test> NOTIFY=bogus\r\n", 501),
                       (b"DATA\r\n", 354), (b"Subject: dsn\r\n\r\nbody\r\n.\r\n", 250)])
    wait_for(lambda: dump.exists() and b"X-Rcpt-Args" in dump.read_bytes())
    text = dump.read_text()
    assert "X-Mail-Args: <a@b.test> RET=HDRS ENVID=Q+2Bx1" in text
    assert "X-Rcpt-Args: <b@example.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.test" in text


def test_an_auth_parameter_is_taken_as_postfix_takes_it_and_never_passed_on(sink_dump: tuple[str, Path],
                                                                          guard_factory: Any) -> None:
    """RFC 4954's AUTH= on MAIL, sent by some clients although no AUTH is
    offered: Postfix without SASL accepts and ignores it, where we answered
    555. Now it is checked and dropped: the MTA never sees a stranger's claim
    to be an authenticated submitter."""
    address, dump = sink_dump
    g = guard_factory(upstream=address)
    expect_replies(g, [(b"MAIL FROM:<a@b.test> AUTH=bad\x01\r\n", 501),
                       (b"MAIL FROM:<a@b.test> AUTH=<> AUTH=<>\r\n", 501),
                       (b"MAIL FROM:<a@b.test> AUTH=boss+40example.test RET=HDRS\r\n", 250),
                       (b"RCPT TO:<b@example.test>\r\n", 250),
                       (b"DATA\r\n", 354), (b"Subject: auth\r\n\r\nbody\r\n.\r\n", 250)])
    wait_for(lambda: dump.exists() and b"X-Rcpt-Args" in dump.read_bytes())
    text = dump.read_text()
    assert "X-Mail-Args: <a@b.test> RET=HDRS\n" in text and "AUTH" not in text


def test_no_dsn_when_narrowed_by_upstream_extensions(sink_dump: tuple[str, Path], guard_factory: Any) -> None:
    address, _ = sink_dump
    g = guard_factory({"upstream": {"extensions": ["SMTPUTF8"]}}, upstream=address)
    assert "DSN" not in ehlo_lines(g.host, g.port)
    with socket.create_connection((g.host, g.port), timeout=10) as sock:
        f = sock.makefile("rb")
        read_reply(f)
        raw_ehlo(sock, f)
        sock.sendall(b"MAIL FROM:<a@b.test> RET=HDRS\r\n")
        assert read_reply(f)[0] == 555


def test_no_dsn_offered_when_the_mta_lacks_it(guard: Any) -> None:
    assert "DSN" not in ehlo_lines(guard.host, guard.port)


def test_the_advertised_size_follows_the_mtas(recorder_factory: Any, guard_factory: Any) -> None:
    up = recorder_factory(size=1_000_000)
    g = guard_factory(upstream=up.address)
    assert "SIZE 1000000" in ehlo_lines(g.host, g.port)
    big = recorder_factory(size=100_000_000)
    g2 = guard_factory(upstream=big.address)
    assert "SIZE 35000000" in ehlo_lines(g2.host, g2.port)


def test_u_label_and_a_label_served_domains_match_both_forms(recorder_factory: Any, guard_factory: Any) -> None:
    up = recorder_factory(smtputf8=True)
    for configured in ("münchen.example", "xn--mnchen-3ya.example"):
        g = guard_factory(upstream=up.address, domain=[configured])
        with smtplib.SMTP(g.host, g.port, timeout=10) as s:
            s.ehlo("c.test")
            s.mail("a@b.test", ["SMTPUTF8"])
            assert s.rcpt("a@münchen.example")[0] == 250
            assert s.rcpt("b@xn--mnchen-3ya.example")[0] == 250
            assert s.rcpt("c@MÜNCHEN.example")[0] == 250
            # a look-alike (Cyrillic а) and a zero-width space never pass
            assert s.rcpt("d@mцnchen.example")[0] == 550
            assert s.rcpt("e@mün\u200bchen.example")[0] in (550, 553)


SERVED = DomainSet.parse(["example.test", "münchen.example"])


@settings(max_examples=300, deadline=None)
@given(local=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x2FFF, blacklist_categories=("Cs",)),
                     min_size=1, max_size=20),
       domain=st.sampled_from(["example.test", "münchen.example", "xn--mnchen-3ya.example", "evil.test",
                               "exаmple.test", "example.test\u200b", "EXAMPLE.TEST"]))
def test_utf8_local_parts_never_open_the_relay(local: str, domain: str) -> None:
    checked = check_recipient(f"{local}@{domain}", SERVED)
    if isinstance(checked, Recipient):
        assert checked.domain in ("example.test", "münchen.example", "xn--mnchen-3ya.example")
        assert not any(c in checked.local for c in "%!@")


def test_the_trace_date_is_the_local_rfc5322_date_of_its_second() -> None:
    # formatted once per second (issue 15); it must stay the date of that second
    from email.utils import formatdate, parsedate_to_datetime

    from smtpguard.session import trace_date

    a, b, c = trace_date(1_700_000_000.1), trace_date(1_700_000_000.9), trace_date(1_700_000_001.0)
    assert a == b == formatdate(1_700_000_000, localtime=True)
    assert c == formatdate(1_700_000_001, localtime=True)
    assert parsedate_to_datetime(c).timestamp() == 1_700_000_001
