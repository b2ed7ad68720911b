"""The promises behind a real Postfix (issues: the two promises, items 2–4;
ESMTP transparency; XCLIENT that Postfix believes).

A private Postfix 3.x instance (tests/fixtures_postfix.py) sits behind
smtpguard; clients connect from 127.0.0.5 as a stranger would. Where the
issue saw Postfix queue relayed mail, these tests use Postfix's most
trusting set-up (mynetworks covering smtpguard's address, no XCLIENT).
"""

from __future__ import annotations

import signal
import smtplib
import socket
import subprocess
from typing import Any

import pytest

from tests.fixtures_postfix import Postfix
from tests.fixtures_smtp import Guard, wait_for
from tests.test_promises import read_reply

CLIENT = ("127.0.0.5", 0)
MESSAGE = b"From: a@sender.test\r\nSubject: through Postfix\r\n\r\nbody\r\n"


def connect(g: Guard) -> tuple[socket.socket, Any]:
    sock = socket.create_connection((g.host, g.port), timeout=15, source_address=CLIENT)
    f = sock.makefile("rb")
    code, _ = read_reply(f)
    assert code == 220
    return sock, f


def say(sock: socket.socket, f: Any, line: bytes) -> tuple[int, str]:
    sock.sendall(line)
    return read_reply(f)


@pytest.mark.parametrize("rcpt", [
    "user%evil.test%example.test@example.test",
    '"user@evil.test@example.test"@example.test',
    "example.test!evil.test!user@example.test",
    '"user%evil.test"%example.test@example.test',
    "@evil.test:user@example.test",
], ids=lambda v: v)
def test_multi_hop_forms_never_reach_a_trusting_postfix(postfix_factory: Any, guard_factory: Any, rcpt: str) -> None:
    pf: Postfix = postfix_factory(mynetworks="127.0.0.0/8")  # Postfix trusts smtpguard: the worst case
    g = guard_factory({"pregreet": {"wait": "0s"}}, upstream=pf.address)
    sock, f = connect(g)
    with sock, f:
        say(sock, f, b"EHLO attacker.test\r\n")
        assert say(sock, f, b"MAIL FROM:<a@sender.test>\r\n")[0] == 250
        code, text = say(sock, f, f"RCPT TO:<{rcpt}>\r\n".encode())
        assert code == 550 and "[RELAY] relay to evil.test is not allowed here" in text, text
        assert say(sock, f, b"RCPT TO:<user@example.test>\r\n")[0] == 250
        assert say(sock, f, b"DATA\r\n")[0] == 354
        assert say(sock, f, MESSAGE + b".\r\n")[0] == 250
    pf.wait_delivered("user")
    assert "evil.test" not in pf.log


def test_untrusted_proxy_headers_never_reach_postfix(postfix_factory: Any, guard_factory: Any) -> None:
    pf: Postfix = postfix_factory(xclient=True, mynetworks="127.0.0.1/32")
    g = guard_factory({"server": {"proxy_protocol": True, "proxy_trusted": ["127.0.0.2/32"]},
                       "upstream": {"xclient": True}, "pregreet": {"wait": "0s"}}, upstream=pf.address)
    with socket.create_connection((g.host, g.port), timeout=10, source_address=CLIENT) as sock:
        sock.sendall(b"PROXY TCP4 127.0.0.1 127.0.0.1 4000 25\r\nEHLO x\r\n")
        try:
            banner = sock.recv(100)
        except ConnectionResetError:  # closed with our bytes unread: a reset
            banner = b""
        assert banner == b""  # closed without a banner
    # an untrusted stranger never became 127.0.0.1 (trusted by mynetworks) at Postfix
    assert "client=localhost[127.0.0.1]" not in pf.log


def test_hostile_sessions_leak_no_postfix_connection(postfix_factory: Any, guard_factory: Any) -> None:
    pf: Postfix = postfix_factory()
    g = guard_factory({"upstream": {"pool_size": 0}, "pregreet": {"wait": "0s"}}, upstream=pf.address)
    for i in range(10):
        sock, f = connect(g)
        with sock, f:
            say(sock, f, b"EHLO c.test\r\n")
            say(sock, f, b"MAIL FROM:<a@sender.test>\r\n")
            assert say(sock, f, b"RCPT TO:<user@example.test>\r\n")[0] == 250
            assert say(sock, f, b"RCPT TO:<bad\x01x@example.test>\r\n")[0] == 501
        # the client vanishes in the middle of its transaction
    # every connection smtpguard opened to Postfix is closed again
    wait_for(lambda: pf.log.count("connect from localhost") > 0
             and pf.log.count("disconnect from localhost") == pf.log.count("]: connect from localhost"), timeout=15)
    # and a legitimate client still gets through at once
    with smtplib.SMTP(g.host, g.port, timeout=15, source_address=CLIENT) as s:
        s.sendmail("a@sender.test", ["bob@example.test"], MESSAGE)
    pf.wait_delivered("bob")
    assert pf.delivered("user") == []


def test_a_stalled_postfix_mid_transaction_loses_no_recipient(postfix_factory: Any, guard_factory: Any) -> None:
    pf: Postfix = postfix_factory()
    g = guard_factory({"upstream": {"timeout": "1s", "pool_size": 0}, "pregreet": {"wait": "0s"}},
                      upstream=pf.address)
    with smtplib.SMTP(g.host, g.port, timeout=30, source_address=CLIENT) as s:
        s.ehlo("c.test")
        s.mail("a@sender.test")
        assert s.rcpt("user@example.test")[0] == 250
        pids = subprocess.run(["pgrep", "-f", f"smtpd -n 127.0.0.1:{pf.port}"], capture_output=True,
                              text=True).stdout.split()
        assert pids
        for pid in pids:
            subprocess.run(["kill", f"-{signal.SIGSTOP.value}", pid])
        try:
            assert s.rcpt("bob@example.test")[0] == 451  # the MTA did not answer in time
        finally:
            for pid in pids:
                subprocess.run(["kill", f"-{signal.SIGCONT.value}", pid])
        assert s.rcpt("postmaster@example.test")[0] == 250  # a new transaction, user@ carried into it
        code, _ = s.data(MESSAGE)
        assert code == 250
    assert len(pf.wait_delivered("user")) == 1 and len(pf.wait_delivered("postmaster")) == 1
    assert pf.delivered("bob") == []


def test_an_eai_message_reaches_postfix(postfix_factory: Any, guard_factory: Any) -> None:
    pf: Postfix = postfix_factory()
    g = guard_factory({"pregreet": {"wait": "0s"}}, upstream=pf.address)
    with smtplib.SMTP(g.host, g.port, timeout=15, source_address=CLIENT) as s:
        s.ehlo("c.test")
        assert s.has_extn("smtputf8") and s.has_extn("dsn")
        s.sendmail("用户@sender.test", ["user@example.test"], "Subject: EAI\r\n\r\nHallo\r\n".encode(),
                   mail_options=["SMTPUTF8"], rcpt_options=["NOTIFY=FAILURE"])
    pf.wait_delivered("user")
    assert "from=<用户@sender.test>" in pf.log


def test_postfix_sees_the_clients_address_and_helo_through_xclient(postfix_factory: Any, guard_factory: Any) -> None:
    pf: Postfix = postfix_factory(xclient=True, mynetworks="127.0.0.9/32")
    g = guard_factory({"upstream": {"xclient": True}, "pregreet": {"wait": "0s"}}, upstream=pf.address)
    with smtplib.SMTP(g.host, g.port, timeout=15, source_address=CLIENT) as s:
        s.ehlo("client.sender.test")
        s.sendmail("a@sender.test", ["user@example.test"], MESSAGE)
        s.mail("a@sender.test")
        assert s.rcpt("nobody@example.test")[0] == 550  # Postfix logs the refusal with the client's HELO
    message = pf.wait_delivered("user")[0]
    assert b"Received: from client.sender.test (unknown [127.0.0.5])" in message
    assert "client=unknown[127.0.0.5]" in pf.log
    assert "RCPT from unknown[127.0.0.5]" in pf.log and "helo=<client.sender.test>" in pf.log


def test_each_client_keeps_its_own_identity_on_postfix_across_pooled_connections(
        postfix_factory: Any, guard_factory: Any) -> None:
    """Found by hand: Postfix authorises XCLIENT against the client it names,
    so a pooled connection that had named 127.0.0.7 silently kept that name
    for the next client from 127.0.0.5. Postfix's own Received line and log
    must name each client, in any order of clients."""
    pf: Postfix = postfix_factory(xclient=True, mynetworks="127.0.0.9/32")
    g = guard_factory({"upstream": {"xclient": True}, "pregreet": {"wait": "0s"}}, upstream=pf.address)
    order = ["127.0.0.7", "127.0.0.5", "127.0.0.7", "127.0.0.6"]
    for i, ip in enumerate(order):
        with smtplib.SMTP(g.host, g.port, timeout=15, source_address=(ip, 0)) as s:
            s.ehlo(f"h{ip.rsplit('.', 1)[1]}.sender.test")
            s.sendmail("a@sender.test", ["user@example.test"], MESSAGE.replace(b"body", f"message {i}".encode()))
    delivered = pf.wait_delivered("user", count=len(order))
    by_body = {int(m.rsplit(b"message ", 1)[1].split()[0]): m for m in delivered}
    for i, ip in enumerate(order):
        first_received = by_body[i].split(b"Received: ", 2)[1]   # Postfix's, on top
        assert f"(unknown [{ip}])".encode() in first_received, (i, ip, first_received)
    assert "insufficient authorization" not in pf.log


def test_an_ipv4_only_postfix_refusing_an_ipv6_xclient_is_a_451_with_the_fix_in_the_log(
        postfix_factory: Any, guard_factory: Any) -> None:
    # Postfix with inet_protocols = ipv4 answers XCLIENT ADDR=IPV6:... with
    # 501 Bad ADDR syntax: the sender is deferred, never relayed as us, and
    # the log names the setting to change.
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    pf: Postfix = postfix_factory(xclient=True, mynetworks="127.0.0.0/8")   # the worst case if XCLIENT were skipped
    try:
        g = guard_factory({"upstream": {"xclient": True}, "pregreet": {"wait": "0s"}}, upstream=pf.address,
                          listen=["[::1]:0"])
    except OSError:
        pytest.skip("::1 not available here")
    with smtplib.SMTP("::1", g.port, timeout=15) as s:
        s.ehlo("v6.sender.test")
        assert s.mail("a@sender.test")[0] == 250
        code, text = s.rcpt("user@example.test")
    assert code == 451 and b"[UPSTREAM]" in text
    refused = g.events("upstream.xclient_refused")
    assert refused and "inet_protocols" in refused[0]["hint"]
    assert "client=localhost[127.0.0.1]" not in pf.log and pf.delivered("user") == []
    # said at start-up already, before any IPv6 sender was deferred
    [early] = g.events("upstream.xclient_ipv6_refused")
    assert "inet_protocols" in early["hint"] and early["ts"] <= g.events("listening")[0]["ts"]


def test_an_ipv6_listener_asks_postfix_at_start_up_whether_it_takes_ipv6_clients(
        postfix_factory: Any, guard_factory: Any) -> None:
    """Only when IPv6 clients can come (an IPv6 listener, or PROXY), and
    silent when Postfix takes them; the probe's connection is never pooled."""
    pf: Postfix = postfix_factory(xclient=True, params={"inet_protocols": "all"})
    try:
        g6 = guard_factory({"upstream": {"xclient": True}}, upstream=pf.address, listen=["[::1]:0"])
    except OSError:
        pytest.skip("::1 not available here")
    g4 = guard_factory({"upstream": {"xclient": True}}, upstream=pf.address)
    assert not g6.events("upstream.xclient_ipv6_refused") and not g4.events("upstream.xclient_ipv6_refused")
    wait_for(lambda: pf.log.count("disconnect from unknown[2001:db8::25]") == 1)   # asked once, by g6 only
    assert all(c.identity is None for c in g6.services.upstream._idle)


def test_postfixs_unknown_reverse_hostname_check_sees_each_client_as_if_direct(
        postfix_factory: Any, guard_factory: Any, dns_server: Any) -> None:
    """Found by hand: without REVERSE_NAME in XCLIENT, Postfix kept the reverse
    name of its real client (smtpguard, "localhost"), so its
    reject_unknown_reverse_client_hostname passed a client with no PTR at
    all, and a DNS fault was a permanent [UNAVAILABLE]. Behind smtpguard the
    restriction must answer as it would for the client itself."""
    from tests.fixtures_dns import ptr_name

    pf: Postfix = postfix_factory(xclient=True, mynetworks="127.0.0.9/32")
    r = pf.postconf("-e", "smtpd_client_restrictions = reject_unknown_reverse_client_hostname",
                    "unknown_client_reject_code = 550")
    assert r.returncode == 0 and pf.postfix("reload").returncode == 0, r.stderr
    dns_server.set_ptr("127.0.0.5", ["unconfirmed.sender.test"])
    dns_server.set("unconfirmed.sender.test", "A", ["192.0.2.1"])   # a PTR that does not confirm: reverse is fine
    dns_server.nxdomain(ptr_name("127.0.0.6"))                     # no PTR: refused
    dns_server.servfail(ptr_name("127.0.0.7"))                     # a DNS fault: deferred, never refused
    g = guard_factory({"upstream": {"xclient": True}, "pregreet": {"wait": "0s"}}, upstream=pf.address)
    got = {}
    for ip in ("127.0.0.5", "127.0.0.6", "127.0.0.7"):
        with smtplib.SMTP(g.host, g.port, timeout=15, source_address=(ip, 0)) as s:
            s.ehlo("h.sender.test")
            assert s.mail("a@sender.test")[0] == 250
            code, text = s.rcpt("user@example.test")
            got[ip] = (code, text.decode())
    assert got["127.0.0.5"][0] == 250, got
    assert got["127.0.0.6"][0] == 550 and "cannot find your reverse hostname" in got["127.0.0.6"][1], got
    assert got["127.0.0.7"][0] == 450 and "cannot find your reverse hostname" in got["127.0.0.7"][1], got


def test_a_client_with_an_invalid_helo_is_not_greeted_to_postfix_under_our_name(
        postfix_factory: Any, guard_factory: Any) -> None:
    """Found by hand: after XCLIENT smtpguard greeted Postfix with its own
    host name when the client's HELO was not a valid EHLO argument, so
    Postfix's HELO checks (check_helo_access "you are not me") saw us. The
    client's address literal is greeted instead (RFC 5321 §4.1.3)."""
    pf: Postfix = postfix_factory(xclient=True, mynetworks="127.0.0.9/32")
    g = guard_factory({"upstream": {"xclient": True}, "pregreet": {"wait": "0s"}}, upstream=pf.address)
    sock, f = connect(g)
    with sock:
        assert say(sock, f, b"EHLO bad\x01helo (x)\r\n")[0] == 250
        assert say(sock, f, b"MAIL FROM:<a@sender.test>\r\n")[0] == 250
        assert say(sock, f, b"RCPT TO:<user@example.test>\r\n")[0] == 250
        assert say(sock, f, b"DATA\r\n")[0] == 354
        assert say(sock, f, MESSAGE + b".\r\n")[0] == 250
    message = pf.wait_delivered("user")[0]
    assert message.split(b"Received: ", 2)[1].startswith(b"from [127.0.0.5] (unknown [127.0.0.5])"), message
    assert g.config.server.hostname not in message.split(b"Received: ", 2)[1].split(b"by ")[0].decode()


def test_an_unknown_users_550_comes_back_unchanged(postfix_factory: Any, guard_factory: Any) -> None:
    pf: Postfix = postfix_factory(xclient=True)
    g = guard_factory({"upstream": {"xclient": True}, "pregreet": {"wait": "0s"}}, upstream=pf.address)
    with smtplib.SMTP(g.host, g.port, timeout=15, source_address=CLIENT) as s:
        s.ehlo("client.sender.test")
        s.mail("a@sender.test")
        code, text = s.rcpt("nobody@example.test")
    assert code == 550 and text.startswith(b"5.1.1 <nobody@example.test>: Recipient address rejected")


@pytest.mark.parametrize("xclient", [False, True], ids=["plain", "xclient"])
def test_one_clients_refusals_and_aborts_are_never_charged_to_the_next_client(
        postfix_factory: Any, guard_factory: Any, xclient: bool) -> None:
    """Found behind a real Postfix: Postfix counts a session's refused
    commands and RSETs until its next delivery, sleeps 1 s before every reply
    past smtpd_soft_error_limit and cuts the session at the hard limit. On one
    pooled connection, ten dictionary-attack clients made every next client
    wait 3 s. Now a connection that had a refusal, or a transaction that ended
    without delivery, is closed with QUIT: each such Postfix session carries
    one transaction and no RSET, and the clean delivery after them is on a
    session of its own."""
    pf: Postfix = postfix_factory(xclient=xclient, mynetworks="127.0.0.9/32")
    g = guard_factory({"upstream": {"xclient": xclient}, "pregreet": {"wait": "0s"}}, upstream=pf.address)
    for i in range(3):   # unknown users: Postfix's 550, one error each
        with smtplib.SMTP(g.host, g.port, timeout=15, source_address=CLIENT) as s:
            s.ehlo("client.sender.test")
            s.mail("a@sender.test")
            assert s.rcpt(f"nobody{i}@example.test")[0] == 550
    with smtplib.SMTP(g.host, g.port, timeout=15, source_address=CLIENT) as s:   # an address probe
        s.ehlo("client.sender.test")
        s.mail("")
        assert s.rcpt("user@example.test")[0] == 250
        assert s.rset()[0] == 250
    with smtplib.SMTP(g.host, g.port, timeout=15, source_address=CLIENT) as s:
        s.ehlo("client.sender.test")
        s.sendmail("a@sender.test", ["user@example.test"], MESSAGE)
    pf.wait_delivered("user")

    def ended() -> list[str]:
        return [line.split(" disconnect from ", 1)[1] for line in pf.log.splitlines() if " disconnect from " in line]

    wait_for(lambda: len(ended()) >= 4, timeout=10)   # the delivering session may still be pooled
    refused = [s for s in ended() if "rcpt=0/1" in s]
    aborted = [s for s in ended() if "rcpt=1 " in s and "data" not in s]
    assert len(refused) == 3 and len(aborted) == 1, ended()
    for stats in refused + aborted:
        assert " mail=1 " in stats and " quit=1 " in stats and "rset" not in stats, stats
    assert [s for s in ended() if "data=1" in s and "rcpt=0/1" in s] == []


def test_a_client_slower_than_postfixs_timeout_still_delivers_to_every_recipient(
        postfix_factory: Any, guard_factory: Any) -> None:
    """Found behind a real Postfix: the upstream connection sits idle while
    the client takes its time (between RCPTs, or uploading a large message
    steadily over a slow link), Postfix closes it at smtpd_timeout (300 s),
    and every DATA of that message got 451, so it was never delivered. Now
    the transaction is rebuilt on a fresh connection (MAIL and each recipient
    accepted again) when the client goes on. Here smtpd_timeout is 2 s and
    the client goes on only after Postfix has logged each timeout."""
    pf: Postfix = postfix_factory(xclient=True, params={"smtpd_timeout": "2s"})
    g = guard_factory({"upstream": {"xclient": True}, "pregreet": {"wait": "0s"}}, upstream=pf.address)

    def postfix_timed_out(times: int) -> None:
        wait_for(lambda: pf.log.count("timeout after RCPT from unknown[127.0.0.5]") >= times, timeout=20)

    sock, f = connect(g)
    with sock, f:
        say(sock, f, b"EHLO client.sender.test\r\n")
        assert say(sock, f, b"MAIL FROM:<a@sender.test>\r\n")[0] == 250
        assert say(sock, f, b"RCPT TO:<user@example.test>\r\n")[0] == 250
        postfix_timed_out(1)                       # dawdling between recipients
        assert say(sock, f, b"RCPT TO:<postmaster@example.test>\r\n")[0] == 250
        assert say(sock, f, b"DATA\r\n")[0] == 354
        sock.sendall(b"From: a@sender.test\r\nSubject: slow upload\r\n\r\nfirst half\r\n")
        postfix_timed_out(2)                       # in the middle of the upload
        code, text = say(sock, f, b"second half\r\n.\r\n")
        assert code == 250 and "queued as" in text, text
    for box in ("user", "postmaster"):
        [message] = pf.wait_delivered(box)
        assert b"first half\nsecond half\n" in message.replace(b"\r\n", b"\n")
    assert [e["rcpts"] for e in g.events("relay.idle_closed")] == [1, 2]


def test_idle_connections_of_other_clients_never_keep_a_new_client_from_postfix(
        postfix_factory: Any, guard_factory: Any) -> None:
    """Found behind a real Postfix: with XCLIENT an idle pooled connection
    serves only the client it named, yet holds one of Postfix's smtpd
    processes (default_process_limit). When they filled Postfix's processes,
    the next client's connection waited past connect_timeout: 451
    UPSTREAM-TIMEOUT, with Postfix idle. Now the least recently used of them
    is closed before a new connection is opened. Postfix here has 3 smtpd
    processes; five clients deliver one after the other."""
    pf: Postfix = postfix_factory(xclient=True, params={"default_process_limit": "3"})
    g = guard_factory({"upstream": {"xclient": True, "connect_timeout": "5s"}, "pregreet": {"wait": "0s"}},
                      upstream=pf.address)
    for n in range(5, 10):
        with smtplib.SMTP(g.host, g.port, timeout=30, source_address=(f"127.0.0.{n}", 0)) as s:
            s.ehlo(f"h{n}.sender.test")
            assert s.sendmail("a@sender.test", ["user@example.test"], MESSAGE) == {}
    assert len(pf.wait_delivered("user", count=5)) == 5
    assert len(g.services.upstream._idle) <= 3


def test_the_health_probes_noops_never_share_a_postfix_session_with_a_client(
        postfix_factory: Any, guard_factory: Any) -> None:
    """Found by reading what Postfix is told: /healthz's NOOP went on a pooled
    connection, and Postfix counts NOOP against the session until a delivery
    (smtpd_junk_command_limit 100, then an error each, then a 1 s sleep per
    reply), for whichever client took the connection next. Now the probe
    keeps a connection of its own, replaced after HEALTH_NOOPS."""
    from smtpguard.adapters.upstream import HEALTH_NOOPS

    pf: Postfix = postfix_factory(mynetworks="127.0.0.9/32")   # no XCLIENT: any idle connection serves anyone
    g = guard_factory({"pregreet": {"wait": "0s"}}, upstream=pf.address)
    probes = HEALTH_NOOPS + 10
    for i in range(probes):
        assert g._loop.run(g.services.probe_upstream(5.0)) is True
        if i % 20 == 0:
            with smtplib.SMTP(g.host, g.port, timeout=15, source_address=CLIENT) as s:
                s.ehlo("client.sender.test")
                s.sendmail("a@sender.test", ["user@example.test"], MESSAGE)
    g._loop.run(g.services.upstream.close())   # every session ends: Postfix logs its commands
    wait_for(lambda: pf.log.count(" connect from ") == pf.log.count(" disconnect from "), timeout=10)
    sessions = [line.split(" disconnect from ", 1)[1] for line in pf.log.splitlines() if " disconnect from " in line]
    with_noop = [s for s in sessions if "noop=" in s]
    assert with_noop and all(" mail=" not in s for s in with_noop), sessions
    assert sum(int(s.split("noop=", 1)[1].split()[0]) for s in with_noop) == probes
    assert max(int(s.split("noop=", 1)[1].split()[0]) for s in with_noop) <= HEALTH_NOOPS
    assert len(pf.wait_delivered("user", count=3)) == 3


def test_a_strangers_message_is_not_made_a_local_submission_by_the_example_postfix(
        postfix_factory: Any, guard_factory: Any) -> None:
    """Found comparing what a bare Postfix delivers with what it delivers
    behind smtpguard: Postfix's local_header_rewrite_clients (default
    permit_inet_interfaces) matched smtpguard's 127.0.0.1, so a stranger's
    message lacking From:, Date: and Message-Id: got them added (From: being
    the unverified envelope sender) and `To: bob` became `To: bob@<myorigin>`.
    examples/postfix/master.cf now empties it on smtpguard's listener."""
    pf: Postfix = postfix_factory(example=True)
    g = guard_factory({"upstream": {"xclient": True}, "pregreet": {"wait": "0s"}}, upstream=pf.address)
    with smtplib.SMTP(g.host, g.port, timeout=15, source_address=CLIENT) as s:
        s.ehlo("client.sender.test")
        s.sendmail("a@sender.test", ["user@example.test"], b"To: bob\r\nSubject: bare\r\n\r\nbody\r\n")
    [message] = pf.wait_delivered("user")
    headers = message.split(b"\n\n", 1)[0]
    assert b"\nTo: bob\n" in headers, headers
    assert not any(h in headers.lower() for h in (b"\nfrom:", b"\ndate:", b"\nmessage-id:")), headers


def test_a_sending_postfix_delivers_through_smtpguard_into_postfix(postfix_factory: Any, guard_factory: Any) -> None:
    """A real MTA as the client (Postfix's smtp(8): pipelining, its own
    EHLO, connection reuse): each good recipient gets each message once, the
    unknown one is bounced with the receiving Postfix's own 5.1.1, nothing is
    deferred."""
    pf: Postfix = postfix_factory(xclient=True)
    g = guard_factory({"upstream": {"xclient": True}, "pregreet": {"wait": "0s"}}, upstream=pf.address)
    sender: Postfix = postfix_factory(mynetworks="127.0.0.0/8", params={
        "myhostname": "out.sender.test", "virtual_mailbox_domains": "", "virtual_mailbox_maps": "",
        "relayhost": f"[127.0.0.1]:{g.port}", "default_transport": "smtp", "relay_transport": "smtp",
        "smtp_bind_address": "127.0.0.6"})
    with smtplib.SMTP("127.0.0.1", sender.port, timeout=15) as s:
        s.ehlo("inject.sender.test")
        for i in range(3):
            s.sendmail("", ["user@example.test", "bob@example.test", "nobody@example.test"],
                       f"From: a@sender.test\r\nSubject: via postfix {i}\r\n\r\nbody {i}\r\n".encode())
    for box in ("user", "bob"):
        got = pf.wait_delivered(box, count=3)
        assert sorted(int(m.rsplit(b"body ", 1)[1].split()[0]) for m in got) == [0, 1, 2]
        assert all(b"(unknown [127.0.0.6])" in m.split(b"Received: ", 2)[1] for m in got)   # Postfix saw the client
    wait_for(lambda: sender.log.count("status=") >= 9)
    log = sender.log
    assert log.count("status=sent") == 6 and log.count("status=deferred") == 0
    assert log.count("to=<nobody@example.test>") == 3 and log.count("dsn=5.1.1, status=bounced") == 3
