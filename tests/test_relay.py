"""The foundation end to end: real clients -> smtpguard -> a real upstream, on loopback."""

from __future__ import annotations

import smtplib
import socket
import ssl
from typing import Any

import pytest

from tests.fixtures_smtp import Guard, Recorder, free_port, raw_ehlo, wait_for

MESSAGE = (b"From: a@sender.test\r\nTo: b@example.test\r\nSubject: hello\r\n\r\n"
           b"first line\r\n.a line starting with a dot\r\n..two dots\r\n.\tdot tab\r\nlast line\r\n")


def client(g: Guard, **kw: Any) -> smtplib.SMTP:
    s = smtplib.SMTP(g.host, g.port, timeout=10, **kw)
    return s


def strip_received(content: bytes) -> bytes:
    """The upstream's copy minus the Received and Authentication-Results headers smtpguard added on top."""
    assert content.startswith(b"Received: ")
    end = content.index(b"\r\n", content.index(b";\r\n") + 3) + 2
    rest = content[end:]
    assert rest.startswith(b"Authentication-Results: mx.example.test;")
    while True:  # the field and its continuation lines
        rest = rest[rest.index(b"\r\n") + 2:]
        if not rest.startswith((b"\t", b" ")):
            return rest


def test_message_is_relayed_byte_for_byte_with_a_received_header(guard: Guard, recorder: Recorder) -> None:
    with client(guard) as s:
        s.ehlo("client.sender.test")
        s.sendmail("a@sender.test", ["b@example.test"], MESSAGE)
    [m] = recorder.messages
    assert m.mail_from == "a@sender.test" and m.rcpt_tos == ["b@example.test"]
    assert strip_received(m.content) == MESSAGE  # dot-stuffing undone exactly once
    head = m.content.split(b";\r\n")[0].decode()
    assert "from client.sender.test (unknown [127.0.0.1])" in head
    assert "by mx.example.test (smtpguard) with ESMTP id " in head
    assert "for <b@example.test>" in head


def test_upstream_rcpt_refusal_is_passed_through_verbatim(guard: Guard, recorder: Recorder) -> None:
    recorder.refuse_rcpt["nobody@example.test"] = "550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown"
    with client(guard) as s:
        s.ehlo("c.test")
        s.mail("a@sender.test")
        code, text = s.rcpt("nobody@example.test")
        assert (code, text) == (550, b"5.1.1 <nobody@example.test>: Recipient address rejected: User unknown")
        assert s.rcpt("b@example.test")[0] == 250
        s.data(MESSAGE)
    assert recorder.messages[0].rcpt_tos == ["b@example.test"]


def test_upstream_sender_refusal_answers_each_rcpt(guard: Guard, recorder: Recorder) -> None:
    recorder.refuse_mail["spam@sender.test"] = "553 5.7.1 <spam@sender.test>: Sender address rejected"
    with client(guard) as s:
        s.ehlo("c.test")
        assert s.mail("spam@sender.test")[0] == 250
        assert s.rcpt("b@example.test") == (553, b"5.7.1 <spam@sender.test>: Sender address rejected")
        assert s.rcpt("c@example.test")[0] == 553
    assert recorder.messages == []


def test_upstream_data_refusal_is_the_clients_answer(guard: Guard, recorder: Recorder) -> None:
    recorder.data_reply = "554 5.7.1 message content rejected"
    with client(guard) as s:
        s.ehlo("c.test")
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail("a@sender.test", ["b@example.test"], MESSAGE)
        assert e.value.smtp_code == 554
    assert recorder.messages == []


def test_upstream_down_gives_451_never_250(guard_factory: Any) -> None:
    g = guard_factory(upstream=f"127.0.0.1:{free_port()}")
    with client(g) as s:
        s.ehlo("c.test")
        s.mail("a@sender.test")
        code, text = s.rcpt("b@example.test")
    assert code == 451
    assert text.startswith(b"4.4.1 [UPSTREAM] ")


def test_upstream_timeout_gives_451(recorder: Recorder, guard_factory: Any) -> None:
    recorder.delay_rcpt = 3
    g = guard_factory({"upstream": {"timeout": "0.5s"}}, upstream=recorder.address)
    with client(g) as s:
        s.ehlo("c.test")
        s.mail("a@sender.test")
        code, text = s.rcpt("b@example.test")
    assert code == 451 and b"[UPSTREAM-TIMEOUT]" in text


@pytest.mark.parametrize("rcpt,code", [
    ("b@example.test", 250),
    ("B@EXAMPLE.TEST", 250),
    ("b@other.test", 550),
    ("b@sub.example.test", 550),
    ("b%other.test@example.test", 550),
    ("other.test!b@example.test", 550),
    ('"b@other.test"@example.test', 550),
    ("b@[127.0.0.1]", 550),
    ("@example.test:b@other.test", 550),
    # Refused whatever the hops say, as Postfix's allow_untrusted_routing = no:
    # an MTA behind may route such a form onwards once it is accepted.
    ("@relay.test:b@example.test", 550),
    ("b%example.test@example.test", 550),
], ids=lambda v: str(v))
def test_only_served_domains_are_accepted(guard: Guard, rcpt: str, code: int) -> None:
    with client(guard) as s:
        s.ehlo("c.test")
        s.mail("a@sender.test")
        got, text = s.docmd("RCPT", f"TO:<{rcpt}>")  # as written: smtplib would rewrite source routes
    if code == 250:
        assert got == 250, text
    else:
        # refused, with the proxy's own reason code (553 when the form itself is malformed)
        assert got in (550, 553), text
        assert text.startswith((b"5.7.1 [RELAY] ", b"5.1.3 [BAD-ADDRESS] "))


def test_subdomains_when_the_domain_starts_with_a_dot(recorder: Recorder, guard_factory: Any) -> None:
    g = guard_factory(upstream=recorder.address, domain=[".example.test"])
    with client(g) as s:
        s.ehlo("c.test")
        s.mail("a@sender.test")
        assert s.rcpt("b@deep.sub.example.test")[0] == 250
        assert s.rcpt("b@notexample.test")[0] == 550


def test_refusals_carry_reason_and_resolution_url(recorder: Recorder, guard_factory: Any) -> None:
    g = guard_factory(upstream=recorder.address,
                      resolution_url="https://help.example.test/smtp?code={code}&ip={ip}&rcpt={rcpt}")
    with client(g) as s:
        s.ehlo("c.test")
        s.mail("a@sender.test")
        code, text = s.rcpt("x y@other.test")
    assert code in (550, 553)
    s2 = client(g)
    s2.ehlo("c.test")
    s2.mail("a@sender.test")
    code, text = s2.rcpt("b@other.test")
    s2.quit()
    assert code == 550
    assert text == (b"5.7.1 [RELAY] relay to other.test is not allowed here "
                    b"https://help.example.test/smtp?code=RELAY&ip=127.0.0.1&rcpt=b%40other.test")


def test_declared_size_too_large_is_refused_at_mail(recorder: Recorder, guard_factory: Any) -> None:
    g = guard_factory(upstream=recorder.address, max_message_size="64KiB")
    with client(g) as s:
        s.ehlo("c.test")
        assert "size" in s.esmtp_features and s.esmtp_features["size"] == "65536"
        code, text = s.mail("a@sender.test", ["SIZE=70000"])
    assert code == 552 and text.startswith(b"5.3.4 [SIZE] ")


def test_oversize_data_is_refused_and_nothing_relayed(recorder: Recorder, guard_factory: Any) -> None:
    g = guard_factory(upstream=recorder.address, max_message_size="64KiB")
    with client(g) as s:
        s.ehlo("c.test")
        s.mail("a@sender.test")  # no SIZE declared: the limit is found in DATA
        s.rcpt("b@example.test")
        code, text = s.data(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 1000)
        assert code == 552 and text.startswith(b"5.3.4 [SIZE] message size exceeds the limit of 65536 bytes")
        # the session goes on
        s.sendmail("a@sender.test", ["b@example.test"], MESSAGE)
    assert len(recorder.messages) == 1


def test_the_mtas_smaller_size_is_announced_and_named_in_the_refusal(
        recorder_factory: Any, guard_factory: Any) -> None:
    # Found behind a real Postfix: EHLO said SIZE 10240000 (Postfix's), the
    # refusal said "the limit of 35000000 bytes" (ours). The number must be
    # the one announced: the smaller of ours and the MTA's (RFC 1870).
    up = recorder_factory(size=40000)
    g = guard_factory(upstream=up.address, max_message_size="64KiB")
    with client(g) as s:
        s.ehlo("c.test")
        assert s.esmtp_features["size"] == "40000"
        code, text = s.mail("a@sender.test", ["SIZE=50000"])
        assert code == 552 and b"exceeds the limit of 40000 bytes" in text, text
        s.rset()
        s.mail("a@sender.test")
        s.rcpt("b@example.test")
        code, text = s.data(b"Subject: big\r\n\r\n" + (b"x" * 70 + b"\r\n") * 700)
        assert code == 552 and b"exceeds the limit of 40000 bytes" in text, text
    assert up.messages == []


def test_recipient_limit(recorder: Recorder, guard_factory: Any) -> None:
    g = guard_factory(upstream=recorder.address, max_recipients="3")
    with client(g) as s:
        s.ehlo("c.test")
        s.mail("a@sender.test")
        assert [s.rcpt(f"u{i}@example.test")[0] for i in range(3)] == [250, 250, 250]
        code, text = s.rcpt("u4@example.test")
        assert code == 452 and text.startswith(b"4.5.3 [RCPT-LIMIT] ")
        s.data(MESSAGE)
    assert len(recorder.messages[0].rcpt_tos) == 3


def test_several_transactions_rset_and_connection_reuse(guard: Guard, recorder: Recorder) -> None:
    for n in range(2):
        with client(guard) as s:
            s.ehlo("c.test")
            s.sendmail("a@sender.test", ["b@example.test"], MESSAGE)
            s.mail("a@sender.test")
            s.rcpt("c@example.test")
            assert s.rset()[0] == 250
            s.sendmail("d@sender.test", ["e@example.test"], MESSAGE)
    assert [m.mail_from for m in recorder.messages] == ["a@sender.test", "d@sender.test"] * 2
    # Deliveries share a connection across clients; an aborted transaction
    # ends with QUIT, never an RSET the MTA would charge to the next client
    # (Postfix's smtpd_junk_command_limit): three connections, no RSET.
    assert recorder.connections == 3 and recorder.rsets == 0


def test_pipelined_commands_are_answered_in_order(guard: Guard, recorder: Recorder) -> None:
    with socket.create_connection((guard.host, guard.port), timeout=10) as sock:
        f = sock.makefile("rb")
        assert f.readline().startswith(b"220 ")
        raw_ehlo(sock, f)
        sock.sendall(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.test>\r\nRCPT TO:<x@other.test>\r\n"
                     b"RCPT TO:<c@example.test>\r\nDATA\r\n")
        codes = [f.readline()[:3] for _ in range(5)]
        assert codes == [b"250", b"250", b"550", b"250", b"354"]
        sock.sendall(b"Subject: p\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        assert f.readline().startswith(b"250 ")
        assert f.readline().startswith(b"221 ")
    assert recorder.messages[0].rcpt_tos == ["b@example.test", "c@example.test"]


def test_garbage_binary_and_overlong_lines_get_5xx_and_the_server_goes_on(guard: Guard, recorder: Recorder) -> None:
    with socket.create_connection((guard.host, guard.port), timeout=10) as sock:
        f = sock.makefile("rb")
        f.readline()
        for line in (b"\x00\xff\xfe garbage\r\n", b"HELO\r\n", b"X" * 5000 + b"\r\n", b"\xc3\xa9HLO x\r\n",
                     b"MAIL FROM:<a@x.test>\r\n"):
            sock.sendall(line)
            reply = f.readline()
            assert reply[:1] == b"5", (line[:20], reply)
            assert b"[" in reply  # our format, with a reason code
    # another session is unaffected
    with client(guard) as s:
        s.ehlo("c.test")
        s.sendmail("a@sender.test", ["b@example.test"], MESSAGE)
    assert len(recorder.messages) == 1


def test_too_many_errors_closes_with_421(recorder: Recorder, guard_factory: Any) -> None:
    g = guard_factory({"server": {"max_errors": 3}}, upstream=recorder.address)
    with socket.create_connection((g.host, g.port), timeout=10) as sock:
        f = sock.makefile("rb")
        f.readline()
        sock.sendall(b"BOGUS\r\nBOGUS\r\nBOGUS\r\n")
        replies = [f.readline() for _ in range(4)]
        assert replies[-1].startswith(b"421 4.7.0 [ERRORS]")
        assert f.readline() == b""  # closed


def test_auth_is_not_offered_nor_accepted(guard: Guard) -> None:
    with client(guard) as s:
        s.ehlo("c.test")
        assert "auth" not in s.esmtp_features
        code, text = s.docmd("AUTH", "PLAIN AGFhAGI=")
        assert code == 502 and b"[NO-AUTH]" in text


def test_idle_timeout_says_421(recorder: Recorder, guard_factory: Any) -> None:
    g = guard_factory({"server": {"idle_timeout": "0.3s"}}, upstream=recorder.address)
    with socket.create_connection((g.host, g.port), timeout=10) as sock:
        f = sock.makefile("rb")
        f.readline()
        assert f.readline().startswith(b"421 4.4.2 [IDLE]")
        assert f.readline() == b""


def test_starttls_then_delivery_is_traced_as_esmtps(recorder: Recorder, guard_factory: Any, tmp_path: Any) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("mx.example.test", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "cert.pem"))
    g = guard_factory(upstream=recorder.address, tls_cert=str(tmp_path / "cert.pem"), tls_key=str(tmp_path / "cert.pem"))
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with client(g) as s:
        s.ehlo("c.test")
        assert "starttls" in s.esmtp_features
        s.starttls(context=ctx)
        s.ehlo("c.test")
        assert "auth" not in s.esmtp_features
        s.sendmail("a@sender.test", ["b@example.test"], MESSAGE)
    head = recorder.messages[0].content.split(b";\r\n")[0].decode()
    assert "with ESMTPS" in head and "(using TLSv1" in head


def test_no_starttls_without_a_certificate(guard: Guard) -> None:
    with client(guard) as s:
        s.ehlo("c.test")
        assert "starttls" not in s.esmtp_features


@pytest.mark.parametrize("kind", ["xclient", "xforward"])
def test_real_client_identity_reaches_the_mta(recorder_factory: Any, guard_factory: Any, kind: str) -> None:
    up = recorder_factory(**{kind: True})
    # upstream.xclient and upstream.xforward are separate settings
    g = guard_factory({"upstream": {kind: True}}, upstream=up.address)
    for helo in ("first.sender.test", "second.sender.test"):
        with client(g) as s:
            s.ehlo(helo)
            s.sendmail("a@sender.test", ["b@example.test"], MESSAGE)
    seen = [m.xclient if kind == "xclient" else m.xforward for m in up.messages]
    assert [x.get("ADDR") for x in seen] == ["127.0.0.1", "127.0.0.1"]
    # each client's own identity, never the previous client's
    assert [x.get("HELO") for x in seen] == ["first.sender.test", "second.sender.test"]
    assert all(x.get("NAME") == "[UNAVAILABLE]" and x.get("PROTO") == "ESMTP" for x in seen)
    if kind == "xclient":
        # After XCLIENT the proxy greets with the client's own HELO name, so
        # the MTA's logs and Received: line show it (nginx's mail proxy does the same).
        assert [m.helo for m in up.messages] == ["first.sender.test", "second.sender.test"]


def test_xclient_never_reuses_a_connection_that_named_another_client(
        recorder_factory: Any, guard_factory: Any) -> None:
    """Postfix authorises XCLIENT against the client it names, so a connection
    that named one client can name no other (the recorder does the same).
    Found behind a real Postfix: the second client's message went out under
    the first client's address. Each client must get its own identity; the
    same client's next session may reuse its connection. (A new client's
    connection replaces an idle one that named another: see
    test_postfix_live's process-limit test.)"""
    up = recorder_factory(xclient=True)
    g = guard_factory({"upstream": {"xclient": True}}, upstream=up.address)
    order = [("127.0.0.5", "five.sender.test"), ("127.0.0.7", "seven.sender.test"),
             ("127.0.0.7", "seven.sender.test"), ("127.0.0.5", "five.sender.test")]
    for ip, helo in order:
        with client(g, source_address=(ip, 0)) as s:
            s.ehlo(helo)
            s.sendmail("a@sender.test", ["b@example.test"], MESSAGE)
    assert [(m.xclient.get("ADDR"), m.helo) for m in up.messages] == order
    # 127.0.0.7's second session reused its own connection; 127.0.0.5 coming
    # back after it got a new one (the count of connections also holds the
    # start-up probe's, so XCLIENTs are counted)
    assert [x["ADDR"] for x in up.xclients] == ["127.0.0.5", "127.0.0.7", "127.0.0.5"]
    assert not g.events("upstream.xclient_refused")


def test_xclient_on_but_not_offered_is_a_loud_451_never_a_relay_as_ourselves(
        recorder_factory: Any, guard_factory: Any) -> None:
    # The MTA does not authorise us (smtpd_authorized_xclient_hosts): the mail
    # would pass as smtpguard's own address, which mynetworks may trust.
    up = recorder_factory(xclient=False)
    g = guard_factory({"upstream": {"xclient": True}}, upstream=up.address)
    with client(g) as s:
        s.ehlo("c.sender.test")
        assert s.mail("a@sender.test")[0] == 250
        code, text = s.rcpt("b@example.test")
    assert code == 451 and b"[UPSTREAM]" in text, (code, text)
    assert up.messages == [] and g.events("upstream.xclient_unavailable")


def test_no_xclient_unless_allowed(recorder_factory: Any, guard_factory: Any) -> None:
    up = recorder_factory(xclient=True)
    g = guard_factory(upstream=up.address)
    with client(g) as s:
        s.ehlo("c.test")
        s.sendmail("a@sender.test", ["b@example.test"], MESSAGE)
    assert up.xclients == [] and up.messages[0].xclient == {}


def test_ipv6_listener(recorder: Recorder, guard_factory: Any) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        g = guard_factory(upstream=recorder.address, listen=["[::1]:0"])
    except OSError:
        pytest.skip("::1 not available here")
    with smtplib.SMTP("::1", g.port, timeout=10) as s:
        s.ehlo("c.test")
        s.sendmail("a@sender.test", ["b@example.test"], MESSAGE)
    assert b"[IPv6:::1]" in recorder.messages[0].content.split(b";")[0]


def test_graceful_stop_lets_data_finish_then_421(recorder: Recorder, guard_factory: Any) -> None:
    g = guard_factory(upstream=recorder.address)
    busy = socket.create_connection((g.host, g.port), timeout=10)
    idle = socket.create_connection((g.host, g.port), timeout=10)
    fb, fi = busy.makefile("rb"), idle.makefile("rb")
    fb.readline(), fi.readline()
    busy.sendall(b"HELO c.test\r\nMAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\nSubject: x\r\n\r\n")
    for _ in range(4):
        fb.readline()
    import threading
    stopper = threading.Thread(target=lambda: g._loop.run(g.server.stop()))
    stopper.start()
    assert fi.readline().startswith(b"421 4.3.2 [SHUTDOWN]")
    busy.sendall(b"the end\r\n.\r\n")
    assert fb.readline().startswith(b"250 ")
    assert fb.readline().startswith(b"421 4.3.2 [SHUTDOWN]")
    stopper.join(10)
    assert len(recorder.messages) == 1
    busy.close(), idle.close()
    # stopped listening
    with pytest.raises(OSError):
        socket.create_connection((g.host, g.port), timeout=2).close()


def test_tcp_nodelay_on_both_sides(guard: Guard, recorder: Recorder) -> None:
    with client(guard) as s:
        s.ehlo("c.test")
        s.sendmail("a@sender.test", ["b@example.test"], MESSAGE)
        [session] = list(guard.server.sessions)
        inbound = session.transport.get_extra_info("socket")
        assert inbound.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        [pooled] = list(guard.services.upstream._idle)
        outbound = pooled.smtp.transport.get_extra_info("socket")
        assert outbound.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def _server_tls(tmp_path: Any) -> ssl.SSLContext:
    trustme = pytest.importorskip("trustme")
    cert = trustme.CA().issue_cert("recorder.test")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "up.pem"))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(tmp_path / "up.pem"))
    return ctx


@pytest.mark.parametrize("mode,offers,delivered,tls", [
    ("required", True, True, True),
    ("opportunistic", True, True, True),
    ("opportunistic", False, True, False),
    ("required", False, False, False),
    ("none", True, True, False),
], ids=lambda v: str(v))
def test_upstream_tls_modes(recorder_factory: Any, guard_factory: Any, tmp_path: Any,
                            mode: str, offers: bool, delivered: bool, tls: bool) -> None:
    up = recorder_factory(tls=_server_tls(tmp_path) if offers else None)
    g = guard_factory({"upstream": {"tls": mode}}, upstream=up.address)
    with client(g) as s:
        s.ehlo("c.test")
        s.mail("a@sender.test")
        code, text = s.rcpt("b@example.test")
        if delivered:
            assert code == 250
            s.data(MESSAGE)
        else:
            assert code == 451 and b"[UPSTREAM]" in text  # never delivered in clear when TLS is required
    assert [m.tls for m in up.messages] == ([tls] if delivered else [])


def test_a_client_vanishing_mid_transaction_ends_the_upstream_transaction(guard: Guard, recorder: Recorder) -> None:
    sock = socket.create_connection((guard.host, guard.port), timeout=10)
    f = sock.makefile("rb")
    f.readline()
    sock.sendall(b"HELO c.test\r\nMAIL FROM:<gone@sender.test>\r\nRCPT TO:<b@example.test>\r\n")
    assert [f.readline()[:3] for _ in range(3)] == [b"250", b"250", b"250"]
    f.close()
    sock.close()  # no QUIT, no DATA: the client is gone
    wait_for(lambda: recorder.quits == 1)  # its upstream transaction ended with QUIT
    with client(guard) as s:
        s.ehlo("c.test")
        s.sendmail("a@sender.test", ["c@example.test"], MESSAGE)
    [m] = recorder.messages
    assert m.mail_from == "a@sender.test" and m.rcpt_tos == ["c@example.test"]  # nothing of the vanished client
    assert recorder.connections == 2 and recorder.rsets == 0


def test_proxy_protocol_gives_the_real_client(recorder_factory: Any, guard_factory: Any) -> None:
    up = recorder_factory(xclient=True)
    g = guard_factory({"server": {"proxy_protocol": True, "proxy_trusted": ["127.0.0.0/8"]}, "upstream": {"xclient": True}}, upstream=up.address)
    with socket.create_connection((g.host, g.port), timeout=10) as sock:
        f = sock.makefile("rb")
        sock.sendall(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n")
        assert f.readline().startswith(b"220 ")
        raw_ehlo(sock, f)
        sock.sendall(b"MAIL FROM:<a@sender.test>\r\nRCPT TO:<b@example.test>\r\nDATA\r\n")
        assert [f.readline()[:3] for _ in range(3)] == [b"250", b"250", b"354"]
        sock.sendall(b"Subject: via a load balancer\r\n\r\nbody\r\n.\r\nQUIT\r\n")
        assert f.readline().startswith(b"250 ")
        f.close()
    [m] = up.messages
    assert m.xclient["ADDR"] == "192.0.2.7"
    assert b"(unknown [192.0.2.7])" in m.content.split(b";")[0]
    [close] = wait_for(lambda: g.events("close"))
    assert close["ip"] == "192.0.2.7"


def test_a_connection_without_a_proxy_header_is_dropped(guard_factory: Any, recorder: Recorder) -> None:
    g = guard_factory({"server": {"proxy_protocol": True, "proxy_trusted": ["127.0.0.0/8"], "proxy_timeout": "3s"}}, upstream=recorder.address)
    with socket.create_connection((g.host, g.port), timeout=10) as sock:
        sock.sendall(b"EHLO c.test\r\n")
        assert sock.recv(100) == b""  # no banner for a client that skipped the load balancer


class _BadUpstream:
    """A TCP server that greets like an MTA and then answers nonsense."""

    def __init__(self, script: list[bytes]) -> None:
        import threading
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.address = "127.0.0.1:%d" % self.sock.getsockname()[1]
        self.script = script
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                for reply in self.script:
                    try:
                        conn.sendall(reply)
                        if not conn.recv(4096):
                            break
                    except OSError:
                        break


@pytest.mark.parametrize("script", [
    [b"220 up ESMTP\r\n", b"this is not SMTP\r\n"],
    [b"220 up ESMTP\r\n", b"250 up\r\n", b"250 ok\r\n", b""],          # closes at RCPT
    [b"554 go away\r\n"],                                                 # refuses to talk
    [b"\x00\xff\xfe garbage\r\n"],
], ids=["nonsense after the greeting", "connection dropped at RCPT", "554 greeting", "binary greeting"])
def test_a_misbehaving_upstream_gives_451_never_250(guard_factory: Any, script: list[bytes]) -> None:
    up = _BadUpstream(script)
    try:
        g = guard_factory({"upstream": {"timeout": "2s"}}, upstream=up.address)
        with client(g) as s:
            s.ehlo("c.test")
            s.mail("a@sender.test")
            code, text = s.rcpt("b@example.test")
            assert code == 451 and text.startswith((b"4.4.1 [UPSTREAM]", b"4.4.2 [UPSTREAM-TIMEOUT]")), text
            assert s.noop()[0] == 250  # the session goes on
    finally:
        up.sock.close()
