"""A hostile client and hostile settings (issue: the two promises, items 4 and 6–10).

Live on loopback: malformed commands get our 5xx and no traceback, control
characters never reach the MTA or the log raw, upstream connections are not
leaked by hostile sessions, a slow but steady DATA is not cut, and settings
that would put bytes on the wire or break the service are refused at start.
"""

from __future__ import annotations

import json
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_faults import FaultyUpstream
from tests.fixtures_smtp import Guard, Recorder, free_port, raw_ehlo, wait_for
from tests.test_cli import port_is_free, run
from tests.test_promises import read_reply

OK = ["--upstream", "127.0.0.1:2526", "--domain", "example.test"]
BAD = [
    ("[server]\nresolution_url = \"https://x.test/smtp?code={code}\\r\\n250 forged\"\n", OK, "server.resolution_url"),
    ("", [*OK, "--resolution-url", "https://x.test/a b"], "--resolution-url"),
    ("[server]\nidle_timeout = '0s'\n", OK, "server.idle_timeout"),
    ("[server]\nidle_timeout = nan\n", OK, "server.idle_timeout"),
    ("[server]\ndata_timeout = '400d'\n", OK, "server.data_timeout"),
    ("[upstream]\ntimeout = inf\n", OK, "upstream.timeout"),
    ("[server]\nmax_message_size = 0\n", OK, "server.max_message_size"),
    ("", ["--upstream", "127.0.0.1:2526", "--domain", "com"], "--domain"),
    ("", ["--upstream", "127.0.0.1:2526", "--domain", "co.uk"], "--domain"),
    ("", ["--upstream", "127.0.0.1:2526", "--domain", ".com"], "--domain"),
    ("\x00\x01\xff\xfe binary", [], "--config"),
    ("", [*OK, "--hostname", ".mx.example.test"], "--hostname"),
    ("[server]\nhostname = \"mx.example.test\\r\\n250 forged\"\n", OK, "server.hostname"),
]


@pytest.mark.parametrize("toml,flags,key", BAD, ids=[b[2] + ":" + (b[0][:25] or " ".join(b[1])[-20:]) for b in BAD])
def test_harmful_settings_are_one_line_naming_the_key_and_exit_2(tmp_path: Path, toml: str, flags: list[str],
                                                                 key: str) -> None:
    port = free_port()
    args = ["serve", "--listen", f"127.0.0.1:{port}", *flags]
    if toml:
        (tmp_path / "c.toml").write_bytes(toml.encode("utf-8", "surrogateescape") if "\x00" not in toml
                                          else b"\x00\x01\xff\xfe binary")
        args += ["--config", str(tmp_path / "c.toml")]
    r = run(*args)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert port_is_free(port)


def test_a_garbage_or_mismatched_certificate_is_exit_2_naming_the_key(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    one, other = trustme.CA().issue_cert("a.test"), trustme.CA().issue_cert("b.test")
    one.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    other.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    for cert, key in (("garbage.pem", "garbage.pem"), ("cert.pem", "key.pem")):
        r = run("serve", "--listen", f"127.0.0.1:{free_port()}", *OK,
                "--tls-cert", str(tmp_path / cert), "--tls-key", str(tmp_path / key))
        assert r.returncode == 2 and "--tls-cert" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def session(g: Guard) -> tuple[socket.socket, Any]:
    sock = socket.create_connection((g.host, g.port), timeout=10)
    f = sock.makefile("rb")
    assert read_reply(f)[0] == 220
    return sock, f


def say(sock: socket.socket, f: Any, line: bytes) -> tuple[int, str]:
    sock.sendall(line)
    return read_reply(f)


@pytest.mark.parametrize("line,code", [
    (b"MAIL FROM:<\r\n", 501), (b"MAIL FROM:a@\r\n", 501),
    (b"MAIL FROM:<<>>\r\n", 501), (b"MAIL FROM:<a@b>>\r\n", 501), (b"VRFY <\r\n", 501),
], ids=lambda v: repr(v))
def test_malformed_addresses_are_syntax_errors_not_tracebacks(guard: Guard, line: bytes, code: int) -> None:
    sock, f = session(guard)
    with sock:
        raw_ehlo(sock, f)
        got, text = say(sock, f, line)
        assert got // 100 == 5 and "[" in text, text
        assert say(sock, f, b"NOOP\r\n")[0] == 250  # the session goes on
    assert not guard.events("internal_error")


@pytest.mark.parametrize("sender,code", [
    # refused at MAIL as Postfix refuses them there (valid_hostname), not as the
    # MTA's refusal of our MAIL answered to each RCPT
    ("a@-b.test", 501), ("a@b-.test", 501), ("a@1.2.3.4", 501), ("a@[300.1.1.1]", 501),
    # the address parser quoted these into another address ("a b"@b.test)
    ("a b@b.test", 553), ("a\tb@b.test", 553), ('a b@b.test> ENVID=x"y', 553),
    # what Postfix takes, so do we: underscores, a numeric label, RFC-breaking local parts, literals
    ("a@b_c.test", 250), ("a@b.123", 250), ("foo.@docomo.ne.jp", 250), ("a..b@b.test", 250),
    ('"a b"@b.test', 250), ("a@[127.0.0.1]", 250), ("a@[IPv6:::1]", 250), ("postmaster", 250), ("", 250),
], ids=repr)
def test_a_sender_is_refused_at_mail_when_postfix_would_and_never_rewritten(recorder: Recorder, guard: Guard,
                                                                            sender: str, code: int) -> None:
    """Found comparing replies with a bare Postfix, command by command."""
    sock, f = session(guard)
    with sock, f:
        raw_ehlo(sock, f)
        got, text = say(sock, f, f"MAIL FROM:<{sender}>\r\n".encode())
        assert got == code, text
        if code == 250:
            assert say(sock, f, b"RCPT TO:<b@example.test>\r\n")[0] == 250
            assert say(sock, f, b"DATA\r\n")[0] == 354
            assert say(sock, f, b"Subject: x\r\n\r\nbody\r\n.\r\n")[0] == 250
        else:
            assert "[BAD-ADDRESS]" in text, text
    assert [m.mail_from for m in recorder.messages] == ([sender or "<>"] if code == 250 else [])


def test_rcpt_parser_crash_is_a_syntax_error(guard: Guard) -> None:
    sock, f = session(guard)
    with sock:
        raw_ehlo(sock, f)
        assert say(sock, f, b"MAIL FROM:<a@sender.test>\r\n")[0] == 250
        got, text = say(sock, f, b"RCPT TO:<\r\n")
        assert got // 100 == 5 and "[SYNTAX]" in text or "[BAD-ADDRESS]" in text, text
    assert not guard.events("internal_error")


@pytest.mark.parametrize("line", [b"EHLO nul\x00pro\r\n", b"MAIL FROM:<nul\x00x@sender.test>\r\n",
                                  b"NOOP bare\rcr\r\n", b"NOOP\n"], ids=["nul-ehlo", "nul-mail", "bare-cr", "bare-lf"])
def test_nul_bare_cr_and_bare_lf_in_a_command_are_refused(guard: Guard, recorder: Recorder, line: bytes) -> None:
    sock, f = session(guard)
    with sock:
        if not line.startswith(b"EHLO"):
            raw_ehlo(sock, f)
        code, text = say(sock, f, line)
        assert code == 500 and "5.5.2 [SYNTAX]" in text, text
        assert say(sock, f, b"NOOP\r\n")[0] == 250
    assert guard.events("syntax.bad_line")


def test_control_characters_in_addresses_are_refused_and_never_sent_on(faulty_upstream: FaultyUpstream,
                                                                       guard_factory: Any) -> None:
    guard = guard_factory(upstream=faulty_upstream.address)
    sock, f = session(guard)
    with sock:
        raw_ehlo(sock, f)
        code, text = say(sock, f, b"MAIL FROM:<a\x01b@sender.test>\r\n")
        assert code == 501, text  # aiosmtpd's parser or ours: a syntax error either way
        assert say(sock, f, b"MAIL FROM:<a@sender.test>\r\n")[0] == 250
        code, text = say(sock, f, b"RCPT TO:<x\x01y@example.test>\r\n")
        assert code == 501 and "5.1.3 [BAD-ADDRESS]" in text, text
        code, text = say(sock, f, b"RCPT TO:<x\x1b[31m@example.test>\r\n")
        assert code == 501, text
    assert faulty_upstream.counts["MAIL"] == faulty_upstream.counts["RCPT"] == 0  # nothing reached the MTA


def test_hostile_sessions_leak_no_upstream_connection(faulty_upstream: FaultyUpstream, guard_factory: Any) -> None:
    g = guard_factory({"upstream": {"pool_size": 2}}, upstream=faulty_upstream.address)
    for i in range(10):
        sock, f = session(g)
        with sock:
            raw_ehlo(sock, f)
            say(sock, f, b"MAIL FROM:<a@sender.test>\r\n")
            assert say(sock, f, f"RCPT TO:<ok{i}@example.test>\r\n".encode())[0] == 250
            assert say(sock, f, b"RCPT TO:<bad\x01x@example.test>\r\n")[0] == 501
            f.close()  # the socket closes only when its file object does
        # the client vanishes without QUIT, in the middle of its transaction
    wait_for(lambda: faulty_upstream.mid_transaction() == 0 and len(faulty_upstream.open) <= 2, timeout=5)
    assert faulty_upstream.messages == []


def test_second_starttls_is_refused(recorder: Recorder, guard_factory: Any, tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    cert = trustme.CA().issue_cert("mx.example.test")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "c.pem"))
    g = guard_factory(upstream=recorder.address, tls_cert=str(tmp_path / "c.pem"), tls_key=str(tmp_path / "c.pem"))
    raw = socket.create_connection((g.host, g.port), timeout=10)
    f = raw.makefile("rb")
    read_reply(f)
    raw_ehlo(raw, f)
    assert say(raw, f, b"STARTTLS\r\n")[0] == 220
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with ctx.wrap_socket(raw) as tls:
        tf = tls.makefile("rb")
        raw_ehlo(tls, tf)  # type: ignore[arg-type]
        code, text = say(tls, tf, b"STARTTLS\r\n")  # type: ignore[arg-type]
        assert code == 503 and "[SEQUENCE]" in text, text
        assert say(tls, tf, b"NOOP\r\n")[0] == 250  # type: ignore[arg-type]
    assert not g.events("internal_error")


def test_library_warnings_go_through_our_formatter_escaped(guard: Guard) -> None:
    sock, f = session(guard)
    with sock:
        for _ in range(3):
            say(sock, f, b"\x1b[31mBOGUS\r\n")
    lines = guard.log.getvalue().splitlines()
    # one JSON object per line, whatever aiosmtpd logged about the bogus command
    assert lines and all(json.loads(line) for line in lines)
    assert not any("\x1b" in line for line in lines)


def test_a_steady_slow_data_transfer_is_not_cut_by_the_idle_timer(recorder: Recorder, guard_factory: Any) -> None:
    g = guard_factory({"server": {"idle_timeout": "0.5s", "data_timeout": "5s"}}, upstream=recorder.address)
    sock, f = session(g)
    with sock:
        raw_ehlo(sock, f)
        say(sock, f, b"MAIL FROM:<a@sender.test>\r\n")
        say(sock, f, b"RCPT TO:<b@example.test>\r\n")
        assert say(sock, f, b"DATA\r\n")[0] == 354
        sock.sendall(b"Subject: slow\r\n\r\n")
        # 2 s of data at a trickle: four times the idle timeout, each pause
        # shorter than the data timeout. Waiting on the server's silence is
        # the point of this test: nothing must arrive while data flows.
        sock.settimeout(0.25)
        for i in range(8):
            sock.sendall(b"line %d\r\n" % i)
            with pytest.raises(socket.timeout):
                sock.recv(1)
        sock.settimeout(10)
        code, _ = say(sock, f, b".\r\n")
        assert code == 250
    assert len(recorder.messages) == 1


def test_a_stalled_data_transfer_ends_with_421_after_the_data_timeout(recorder: Recorder, guard_factory: Any) -> None:
    g = guard_factory({"server": {"idle_timeout": "60s", "data_timeout": "0.5s"}}, upstream=recorder.address)
    sock, f = session(g)
    with sock:
        raw_ehlo(sock, f)
        say(sock, f, b"MAIL FROM:<a@sender.test>\r\n")
        say(sock, f, b"RCPT TO:<b@example.test>\r\n")
        assert say(sock, f, b"DATA\r\n")[0] == 354
        sock.sendall(b"Subject: stalled\r\n")
        code, text = read_reply(f)  # nothing more is sent: the server must end it
        assert code == 421, text
    assert recorder.messages == []


@pytest.mark.parametrize("helo", ["evil (x [10.0.0.1])", "a b [1.2.3.4]", "[999.1.1.1]"])
def test_a_hostile_helo_never_reaches_the_received_header_as_written(recorder: Recorder, guard: Guard, helo: str) -> None:
    sock, f = session(guard)
    with sock:
        sock.sendall(f"EHLO {helo}\r\n".encode())
        while not f.readline().startswith(b"250 "):
            pass
        say(sock, f, b"MAIL FROM:<a@sender.test>\r\n")
        say(sock, f, b"RCPT TO:<b@example.test>\r\n")
        say(sock, f, b"DATA\r\n")
        assert say(sock, f, b"Subject: x\r\n\r\nbody\r\n.\r\n")[0] == 250
    received = recorder.messages[0].content.split(b"\r\n\t")[0].decode()
    # the first bracketed address is the real client's
    assert received.startswith("Received: from [127.0.0.1] (unknown [127.0.0.1] helo=")
    assert "(" not in received.split("helo=")[1] and " " not in received.split("helo=")[1].rstrip(")")


def test_an_escaped_ptr_name_is_not_used(recorder_factory: Any, guard_factory: Any, dns_server: Any) -> None:
    from tests.fixtures_dns import ptr_name

    up = recorder_factory(xclient=True)
    # A forward-confirmed name whose label carries a space and parentheses (DNS allows any octet).
    dns_server.set(ptr_name("127.0.0.1"), "PTR", ["evil\\032\\(x\\).sender.test."])
    dns_server.set("evil\\032\\(x\\).sender.test", "A", ["127.0.0.1"])
    g = guard_factory({"upstream": {"xclient": True}}, upstream=up.address)
    sock, f = session(g)
    with sock:
        raw_ehlo(sock, f, "mail.sender.test")
        say(sock, f, b"MAIL FROM:<a@sender.test>\r\n")
        say(sock, f, b"RCPT TO:<b@example.test>\r\n")
        say(sock, f, b"DATA\r\n")
        assert say(sock, f, b"Subject: x\r\n\r\nbody\r\n.\r\n")[0] == 250
    assert up.messages[0].xclient["NAME"] == "[UNAVAILABLE]"
    assert up.messages[0].xclient["REVERSE_NAME"] == "[UNAVAILABLE]"   # nor as the unverified name
    assert up.messages[0].content.startswith(b"Received: from mail.sender.test (unknown [127.0.0.1])")


def test_a_large_message_over_tls_arrives_whole_with_the_small_tls_buffer(recorder: Recorder, guard_factory: Any,
                                                                         tmp_path: Path) -> None:
    import smtplib

    trustme = pytest.importorskip("trustme")
    trustme.CA().issue_cert("mx.example.test").private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "c.pem"))
    g = guard_factory(upstream=recorder.address, tls_cert=str(tmp_path / "c.pem"), tls_key=str(tmp_path / "c.pem"))
    body = b"".join(b"line %06d " % i + b"x" * 60 + b"\r\n" for i in range(20000))  # 1.4 MB, many TLS records
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    with smtplib.SMTP(g.host, g.port, timeout=30) as s:
        s.starttls(context=ctx)
        s.sendmail("a@sender.test", ["b@example.test"], b"Subject: big\r\n\r\n" + body)
    assert recorder.messages[0].content.endswith(body)


def test_helo_and_ehlo_are_counted_per_session(guard: Guard) -> None:
    sock, f = session(guard)
    with sock:
        for i in range(5):
            raw_ehlo(sock, f, f"name{i}.test")
        code, text = say(sock, f, b"EHLO sixth.test\r\n")
        assert code == 421 and "[HELO-LIMIT]" in text, text
        assert f.readline() == b""  # closed
    assert any(e.get("reason") == "HELO-LIMIT" for e in guard.events("defer"))


def test_a_thousand_pipelined_recipients_get_100_accepted_and_the_message_relayed(recorder: Recorder,
                                                                                    guard: Guard) -> None:
    # RFC 5321 §4.5.3.1.8 / Postfix's smtpd_recipient_overshoot_limit: the 452s
    # for recipients over max_recipients are not errors that end the session.
    sock, f = session(guard)
    with sock, f:
        raw_ehlo(sock, f)
        commands = [b"MAIL FROM:<a@sender.test>\r\n"] + [b"RCPT TO:<r%d@example.test>\r\n" % i for i in range(1000)]
        sock.sendall(b"".join(commands))
        codes = [read_reply(f)[0] for _ in commands]
        assert codes[0] == 250
        assert codes[1:].count(250) == 100 and codes[1:].count(452) == 900
        assert say(sock, f, b"DATA\r\n")[0] == 354
        assert say(sock, f, b"Subject: many\r\n\r\nbody\r\n.\r\n")[0] == 250
    assert len(recorder.messages[0].rcpt_tos) == 100


def test_past_the_recipient_overshoot_the_452s_count_as_errors(recorder: Recorder, guard_factory: Any) -> None:
    g = guard_factory({"server": {"max_recipients": 2, "max_errors": 3}, "limits": {"recipient_overshoot": 2}},
                      upstream=recorder.address)
    sock, f = session(g)
    with sock, f:
        raw_ehlo(sock, f)
        say(sock, f, b"MAIL FROM:<a@sender.test>\r\n")
        codes = [say(sock, f, b"RCPT TO:<r%d@example.test>\r\n" % i)[0] for i in range(7)]
        closing = read_reply(f)[0]
    # 2 accepted, 2 overshoot 452s not counted, then three counted: the third error closes with 421
    assert codes == [250, 250, 452, 452, 452, 452, 452] and closing == 421


JUNK = [b"NOOP\r\n", b"RSET\r\n", b"VRFY user\r\n", b"HELP\r\n"]


def test_junk_commands_cannot_hold_a_session_for_ever(recorder: Recorder, guard_factory: Any) -> None:
    """Postfix's smtpd_junk_command_limit: NOOP, RSET, VRFY and HELP are
    answered, but past the limit each counts as an error, and the error
    limit closes the session. Before, a client could send NOOP for ever."""
    g = guard_factory({"server": {"max_errors": 3}, "limits": {"junk_commands": 4}}, upstream=recorder.address)
    sock, f = session(g)
    with sock, f:
        raw_ehlo(sock, f)
        codes = [say(sock, f, JUNK[i % 4])[0] for i in range(7)]
        closing = read_reply(f)
        assert f.readline() == b""   # closed
    # 4 free, then the 5th, 6th and 7th count: the third error closes with 421
    assert codes == [250, 250, 252, 250, 250, 250, 252], codes
    assert closing[0] == 421 and "[ERRORS]" in closing[1], closing
    [closed] = g.events("close.errors")
    assert closed["errors"] == 3 and closed["junk"] == 7


def test_a_delivery_resets_the_junk_count_and_exempt_networks_have_none(recorder: Recorder,
                                                                       guard_factory: Any) -> None:
    g = guard_factory({"server": {"max_errors": 1}, "limits": {"junk_commands": 2}}, upstream=recorder.address)
    sock, f = session(g)
    with sock, f:
        raw_ehlo(sock, f)
        for _ in range(2):   # two rounds of the limit, a delivery between them
            assert [say(sock, f, b"NOOP\r\n")[0] for _ in range(2)] == [250, 250]
            say(sock, f, b"MAIL FROM:<a@sender.test>\r\n")
            say(sock, f, b"RCPT TO:<b@example.test>\r\n")
            assert say(sock, f, b"DATA\r\n")[0] == 354
            assert say(sock, f, b"Subject: x\r\n\r\nbody\r\n.\r\n")[0] == 250
        assert say(sock, f, b"NOOP\r\n")[0] == 250
    assert len(recorder.messages) == 2 and not g.events("close.errors")
    exempt = guard_factory({"server": {"max_errors": 1}, "limits": {"junk_commands": 2, "exempt": ["127.0.0.0/8"]}},
                           upstream=recorder.address)
    sock, f = session(exempt)
    with sock, f:
        raw_ehlo(sock, f)
        assert {say(sock, f, b"NOOP\r\n")[0] for _ in range(50)} == {250}   # your monitoring
    assert not exempt.events("close.errors")


def test_a_mail_rcpt_rset_loop_makes_the_mta_open_a_bounded_number_of_connections(
        recorder: Recorder, guard_factory: Any) -> None:
    """An aborted transaction closes its upstream connection (the MTA would
    charge its RSET to the next client), so each MAIL/RCPT/RSET round opens
    one: the junk limit bounds how many rounds one session gets."""
    g = guard_factory({"server": {"max_errors": 2}, "limits": {"junk_commands": 5}}, upstream=recorder.address)
    sock, f = session(g)
    with sock, f:
        raw_ehlo(sock, f)
        for _ in range(7):   # 5 free RSETs, then 2 that count as errors
            assert say(sock, f, b"MAIL FROM:<a@sender.test>\r\n")[0] == 250
            assert say(sock, f, b"RCPT TO:<b@example.test>\r\n")[0] == 250
            assert say(sock, f, b"RSET\r\n")[0] == 250
        code, text = read_reply(f)   # the second error: 421 and closed
        assert code == 421 and "[ERRORS]" in text and f.readline() == b""
    wait_for(lambda: recorder.quits >= 7)
    assert recorder.connections <= 8 and recorder.rsets == 0 and recorder.messages == []


@pytest.mark.parametrize("stage,when", [("helo", {"helo": "bot.test"}), ("mail", {"sender_domain": "bot.test"}),
                                        ("rcpt", {"rcpt_local": "trap"})], ids=["helo", "mail", "rcpt"])
def test_drop_after_the_connect_stage_is_521_and_close(recorder: Recorder, guard_factory: Any, stage: str,
                                                       when: dict[str, str]) -> None:
    doc = {"rule": [{"name": "drop-bots", "stage": stage, "when": when, "action": "drop"}]}
    g = guard_factory(doc, upstream=recorder.address, resolution_url="https://help.example.test/smtp?code={code}")
    sock, f = session(g)
    with sock, f:
        steps = [b"EHLO bot.test\r\n", b"MAIL FROM:<a@bot.test>\r\n", b"RCPT TO:<trap@example.test>\r\n"]
        for line in steps[: ["helo", "mail", "rcpt"].index(stage) + 1]:
            sock.sendall(line)
            code, text = read_reply(f)
        # postscreen's drop: 521, then the connection is closed
        assert code == 521 and text.startswith("521 5.7.1 [POLICY]") and "https://help.example.test/" in text, text
        assert f.readline() == b""
    assert recorder.messages == []


def test_aiosmtpds_own_refusals_carry_reason_url_and_are_logged(recorder: Recorder, guard_factory: Any) -> None:
    g = guard_factory(upstream=recorder.address, resolution_url="https://help.example.test/smtp?code={code}")
    sock, f = session(g)
    with sock, f:
        raw_ehlo(sock, f)
        code, text = say(sock, f, b"MAIL FROM:<\r\n")  # refused by aiosmtpd's own parser
    assert code == 553 and "[BAD-ADDRESS]" in text and "https://help.example.test/smtp?code=BAD-ADDRESS" in text
    assert any(e.get("reason") == "BAD-ADDRESS" and e.get("reply") == text for e in g.events("reject"))
