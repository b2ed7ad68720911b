"""The two promises under faults and attack (issue: the two promises).

1. smtpguard never answers 250 at the end of DATA unless the MTA accepted
   the message for every recipient the client was told 250 for: when the
   upstream transaction fails, the accepted recipients are carried into a
   new one, or the client is told so.
2. It is never an open relay: only a plain local part at a served domain is
   passed upstream.

Each case drives a real client against smtpguard in front of a real
fault-injecting upstream (tests/fixtures_faults.py) on loopback.
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtpguard.core.address import DomainSet, Recipient, check_recipient
from tests.fixtures_faults import FAULTS, FaultyUpstream
from tests.fixtures_smtp import Guard, raw_ehlo, wait_for

MESSAGE = b"From: a@sender.test\r\nSubject: promise\r\n\r\nbody line\r\n.leading dot\r\n"


def read_reply(f: Any) -> tuple[int, str]:
    lines = []
    while True:
        line = f.readline()
        if not line:
            return 0, "connection closed"
        lines.append(line.decode("ascii", "replace").rstrip("\r\n"))
        if line[3:4] != b"-":
            return int(line[:3]), "\n".join(lines)


def transaction(g: Guard, rcpts: list[str], pipelined: bool, message: bytes = MESSAGE) -> tuple[list[int], int | None]:
    """MAIL, the RCPTs and DATA; the RCPT codes and the final code (None when DATA got no 354)."""
    with socket.create_connection((g.host, g.port), timeout=20) as sock:
        f = sock.makefile("rb")
        assert read_reply(f)[0] == 220
        raw_ehlo(sock, f)
        commands = [b"MAIL FROM:<a@sender.test>\r\n"] + [f"RCPT TO:<{r}>\r\n".encode() for r in rcpts] + [b"DATA\r\n"]
        if pipelined:
            sock.sendall(b"".join(commands))
            codes = [read_reply(f)[0] for _ in commands]
        else:
            codes = []
            for c in commands:
                sock.sendall(c)
                codes.append(read_reply(f)[0])
        final = None
        if codes[-1] == 354:
            sock.sendall(message + b".\r\n")
            final = read_reply(f)[0]
        sock.sendall(b"QUIT\r\n")
        read_reply(f)
    return codes[1:-1], final


def check_promise(up: FaultyUpstream, g: Guard, rcpts: list[str], codes: list[int], final: int | None) -> None:
    told = sorted(r for r, c in zip(rcpts, codes) if c == 250)
    if final == 250:
        assert len(up.messages) == 1, "one message delivered, exactly once"
        assert sorted(up.messages[0].rcpts) == told, "every recipient told 250 is in the delivered transaction"
    else:
        assert up.messages == [], "nothing delivered when the client was not told 250"
    # every path out of a transaction leaves its upstream connection clean or closed
    wait_for(lambda: up.mid_transaction() == 0, timeout=5)
    assert not g.events("internal_error"), "no traceback"


@pytest.fixture
def faulty_guard(faulty_upstream: FaultyUpstream, guard_factory: Any) -> Guard:
    return guard_factory({"upstream": {"timeout": "0.5s"}}, upstream=faulty_upstream.address)


RCPT_SETS = {1: ["r1@example.test"], 2: ["r1@example.test", "r2@example.test"],
             4: [f"r{i}@example.test" for i in range(1, 5)]}
CASES = [(point, n, kind, size) for size in RCPT_SETS for kind in FAULTS
         for point, n in [("MAIL", 1), ("RCPT", 1), ("RCPT", size), ("DATA", 1), ("EOD", 1)]
         + ([("RCPT", 2)] if size == 4 else [])]


@pytest.mark.parametrize("pipelined", [False, True], ids=["one-by-one", "pipelined"])
@pytest.mark.parametrize("point,n,kind,size", CASES,
                         ids=[f"{k}-at-{p}{n}-{s}rcpt" for p, n, k, s in CASES])
def test_no_250_for_a_recipient_the_mta_did_not_get(faulty_upstream: FaultyUpstream, faulty_guard: Guard,
                                                    point: str, n: int, kind: str, size: int,
                                                    pipelined: bool) -> None:
    faulty_upstream.fail(point, n, kind)
    rcpts = RCPT_SETS[size]
    codes, final = transaction(faulty_guard, rcpts, pipelined)
    check_promise(faulty_upstream, faulty_guard, rcpts, codes, final)
    if point == "RCPT" and n < size:
        # a recipient after the failed one rebuilds the transaction: the
        # recipients told 250 before are carried into it, and the message goes
        assert codes[n - 1] // 100 == 4 and final == 250
        assert len(faulty_upstream.messages[0].rcpts) == size - 1
    if point in ("DATA", "EOD"):
        assert final is not None and final // 100 == 4 and faulty_upstream.messages == []


def test_a_lost_transaction_that_cannot_be_rebuilt_is_told_at_data(faulty_upstream: FaultyUpstream,
                                                                   faulty_guard: Guard) -> None:
    # RCPT 2 drops the connection; the rebuild's replay of r1 is then refused:
    # r1 was told 250 but cannot be carried over, so DATA must not say 250.
    faulty_upstream.fail("RCPT", 2, "drop")
    faulty_upstream.fail("RCPT", 3, "550 5.1.1 no longer")
    rcpts = ["r1@example.test", "r2@example.test", "r3@example.test"]
    codes, final = transaction(faulty_guard, rcpts, pipelined=False)
    assert codes[0] == 250 and codes[1] // 100 == 4 and codes[2] // 100 == 4
    assert final is None  # DATA itself refused: nothing for the client to send
    assert faulty_upstream.messages == []
    assert faulty_guard.events("relay.lost")


def test_the_upstream_failing_twice_tells_the_client(faulty_upstream: FaultyUpstream, faulty_guard: Guard) -> None:
    # one rebuild per transaction, then the client is told rather than kept waiting
    faulty_upstream.fail("RCPT", 2, "drop")
    faulty_upstream.fail("RCPT", 4, "drop")  # the rebuild: MAIL, RCPT r1 (3), then r3 (4) fails
    rcpts = ["r1@example.test", "r2@example.test", "r3@example.test", "r4@example.test"]
    codes, final = transaction(faulty_guard, rcpts, pipelined=True)
    check_promise(faulty_upstream, faulty_guard, rcpts, codes, final)
    assert final != 250


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=st.lists(st.sampled_from(["rcpt-good", "rcpt-relay", "rcpt-refused", "data", "rset", "noop", "mail"]),
                      min_size=1, max_size=12),
       faults=st.dictionaries(st.tuples(st.sampled_from(["MAIL", "RCPT", "DATA", "EOD"]), st.integers(1, 6)),
                              st.sampled_from(FAULTS[:2] + ("garbage", "451 4.3.0 later")), max_size=3))
def test_random_sessions_under_random_faults_keep_the_promise(guard_factory: Any, steps: list[str],
                                                             faults: dict[tuple[str, int], str]) -> None:
    up = FaultyUpstream()
    try:
        g = guard_factory({"upstream": {"timeout": "0.5s"}}, upstream=up.address)
        up.plan.update(faults)
        delivered_expected: list[list[str]] = []
        with socket.create_connection((g.host, g.port), timeout=20) as sock:
            f = sock.makefile("rb")
            read_reply(f)
            raw_ehlo(sock, f)
            told: list[str] = []
            in_mail = False
            n = 0
            for step in steps:
                if step == "mail" or (step.startswith("rcpt") and not in_mail):
                    sock.sendall(b"MAIL FROM:<a@sender.test>\r\n")
                    if read_reply(f)[0] == 250:
                        in_mail, told = True, []
                    # else: a nested MAIL is refused (503) and the transaction goes on
                if step.startswith("rcpt") and in_mail:
                    n += 1
                    rcpt = {"rcpt-good": f"u{n}@example.test", "rcpt-relay": f"u{n}%evil.test@example.test",
                            "rcpt-refused": f"u{n}@elsewhere.test"}[step]
                    sock.sendall(f"RCPT TO:<{rcpt}>\r\n".encode())
                    if read_reply(f)[0] == 250:
                        told.append(rcpt)
                elif step == "data":
                    sock.sendall(b"DATA\r\n")
                    if read_reply(f)[0] == 354:
                        sock.sendall(MESSAGE + b".\r\n")
                        if read_reply(f)[0] == 250:
                            delivered_expected.append(sorted(told))
                    in_mail, told = False, []
                elif step == "rset":
                    sock.sendall(b"RSET\r\n")
                    read_reply(f)
                    in_mail, told = False, []
                elif step == "noop":
                    sock.sendall(b"NOOP\r\n")
                    read_reply(f)
            sock.sendall(b"QUIT\r\n")
            read_reply(f)
        # every 250 at the end of DATA is one delivery with exactly the recipients told 250; no duplicate
        assert [sorted(m.rcpts) for m in up.messages] == delivered_expected
        assert all("%" not in r for m in up.messages for r in m.rcpts)
        wait_for(lambda: up.mid_transaction() == 0, timeout=5)
        assert not g.events("internal_error")
    finally:
        up.stop()


# --- never a relay ----------------------------------------------------------

SERVED = DomainSet.parse(["example.test"])


@pytest.mark.parametrize("address,target", [
    ("user%evil.test%example.test@example.test", "evil.test"),
    ('"user@evil.test@example.test"@example.test', "evil.test"),
    ("example.test!evil.test!user@example.test", "evil.test"),
    ('"user%evil.test"%example.test@example.test', "evil.test"),
    ("user%example.test@example.test", "example.test"),
    ("@relay.test:user@example.test", "relay.test"),
    ("user@[127.0.0.1]", "[127.0.0.1]"),
], ids=lambda v: v)
def test_multi_hop_forms_are_relay_naming_the_real_target(address: str, target: str) -> None:
    refused = check_recipient(address, SERVED)
    assert not isinstance(refused, Recipient)
    assert refused.reason == "RELAY" and refused.domain == target


_LOCAL = st.text(alphabet=st.sampled_from(list("abz09.%!@\"\\:, _+-")), min_size=1, max_size=20)
_DOMAIN = st.sampled_from(["example.test", "EXAMPLE.test", "evil.test", "[127.0.0.1]", "example.test.evil",
                           "sub.example.test", ""])


@settings(max_examples=500, deadline=None)
@given(local=_LOCAL, domain=_DOMAIN, route=st.sampled_from(["", "@evil.test:", "@example.test,@evil.test:"]))
def test_nothing_but_a_plain_local_part_at_a_served_domain_passes(local: str, domain: str, route: str) -> None:
    checked = check_recipient(f"{route}{local}@{domain}", SERVED)
    if isinstance(checked, Recipient):
        assert not route
        assert checked.domain == "example.test"
        assert not any(c in checked.local for c in "%!@")
        unquoted = checked.local
        assert unquoted == local


@pytest.mark.parametrize("rcpt", [
    "user%evil.test%example.test@example.test",
    '"user@evil.test@example.test"@example.test',
    "example.test!evil.test!user@example.test",
    '"user%evil.test"%example.test@example.test',
], ids=lambda v: v)
def test_relay_forms_are_refused_live_and_never_reach_the_mta(faulty_upstream: FaultyUpstream,
                                                              faulty_guard: Guard, rcpt: str) -> None:
    with socket.create_connection((faulty_guard.host, faulty_guard.port), timeout=10) as sock:
        f = sock.makefile("rb")
        read_reply(f)
        raw_ehlo(sock, f)
        sock.sendall(b"MAIL FROM:<a@sender.test>\r\n")
        read_reply(f)
        sock.sendall(f"RCPT TO:<{rcpt}>\r\n".encode())
        code, text = read_reply(f)
    assert code == 550 and "[RELAY] relay to evil.test is not allowed here" in text
    assert faulty_upstream.counts["RCPT"] == 0
    assert faulty_guard.events("reject")[-1]["reason"] == "RELAY"
