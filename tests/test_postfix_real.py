"""smtpguard in front of a real Postfix (issue 11 items 1, 2 and 9).

A private Postfix instance (`postfix -c DIR`, its own queue, its own log
file, Maildir delivery through the virtual agent) listens on
127.0.0.1:<free port> and takes XCLIENT from smtpguard's address only; its
`mynetworks` does not include that address, so a client that XCLIENT did not
describe would be a stranger, never trusted. The main.cf and master.cf lines
are the ones examples/postfix/ documents (tests/fixtures_postfix.py,
`example=True`). A client on 127.0.0.5 sends through
smtpguard; Postfix's log and the delivered message's Received: line must
show the client's address, its confirmed name and its HELO; Postfix's own
550 for an unknown user reaches the client unchanged; relaying is refused.
"""

from __future__ import annotations

import re
import smtplib
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

import pytest

import tests.fixtures_postfix as fixture
from tests.fixtures_postfix import EXAMPLE, HOSTNAME, Postfix, example_services, instance_master_cf, read_main_cf, stop
from tests.fixtures_smtp import wait_for

CLIENT_IP = "127.0.0.5"
CLIENT_NAME = "client.example.test"
CLIENT_HELO = "helo.client.example.test"


@pytest.fixture
def postfix(postfix_factory: Callable[..., Postfix]) -> Postfix:
    """The private instance (tests/fixtures_postfix.py) with examples/postfix/'s main.cf and master.cf lines."""
    return postfix_factory(example=True)


@pytest.fixture
def guarded(postfix: Postfix, guard_factory: Callable[..., Any], dns_server: Any) -> tuple[Postfix, Any]:
    """smtpguard with --xclient in front of the Postfix instance; the client's rDNS is confirmed."""
    dns_server.set_ptr(CLIENT_IP, [CLIENT_NAME])
    dns_server.set(CLIENT_NAME, "A", [CLIENT_IP])
    dns_server.set(CLIENT_HELO, "A", [CLIENT_IP])
    guard = guard_factory(upstream=postfix.address, xclient=True)
    return postfix, guard


def _send(guard: Any, rcpts: list[str], body: bytes = b"Subject: through smtpguard\r\n\r\nhello\r\n") -> dict[str, Any]:
    with smtplib.SMTP(guard.host, guard.port, timeout=20, source_address=(CLIENT_IP, 0)) as s:
        s.ehlo(CLIENT_HELO)
        return s.sendmail("sender@elsewhere.test", rcpts, body)


def test_postfix_sees_the_client_and_delivers(guarded: tuple[Postfix, Any]) -> None:
    pf, guard = guarded
    refused = _send(guard, ["user@example.test"])
    assert refused == {}
    message = pf.wait_delivered("user")[0].decode(errors="replace")
    # Postfix's smtpd log: the client is 127.0.0.5 with its confirmed name, never smtpguard's 127.0.0.1
    wait_for(lambda: f"client={CLIENT_NAME}[{CLIENT_IP}]" in pf.log, timeout=20)
    assert "client=localhost[127.0.0.1]" not in pf.log
    assert "smtpd[" in pf.log and f"client={CLIENT_NAME}[{CLIENT_IP}]" in pf.log
    # Postfix's own Received: line (the topmost): the client's HELO, name and address (item 1)
    received = re.search(r"^Received: from .*?(?=^\S)", message, re.M | re.S)
    assert received is not None, message
    assert received.group(0).startswith(f"Received: from {CLIENT_HELO} ({CLIENT_NAME} [{CLIENT_IP}])\n")
    assert f"by {HOSTNAME} (Postfix)" in received.group(0)
    assert "mx.example.test" not in received.group(0).split("by ")[0]
    assert "status=sent" in pf.log and "delivered to maildir" in pf.log


def test_an_unknown_users_550_comes_back_unchanged_and_relaying_is_refused(guarded: tuple[Postfix, Any]) -> None:
    pf, guard = guarded
    with smtplib.SMTP(guard.host, guard.port, timeout=20, source_address=(CLIENT_IP, 0)) as s:
        s.ehlo(CLIENT_HELO)
        assert s.mail("sender@elsewhere.test")[0] == 250
        code, text = s.rcpt("nobody@example.test")
        relay_code, relay_text = s.rcpt("someone@elsewhere.test")
        ok_code, _ = s.rcpt("user@example.test")
    # Postfix's own reply, as its log has it
    wait_for(lambda: "User unknown in virtual mailbox table" in pf.log, timeout=20)
    logged = re.search(r"reject: RCPT from \S+: (550 5\.1\.1 <nobody@example\.test>: [^;]+);", pf.log)
    assert logged is not None, pf.log
    assert code == 550 and text.decode() == logged.group(1)[4:]
    assert relay_code in (550, 554) and ok_code == 250, (relay_code, relay_text)
    assert f"[{CLIENT_IP}]" in logged.group(0)   # rejected as the client, not as smtpguard
    line = next(x for x in pf.log.splitlines() if "reject: RCPT" in x and "nobody@" in x)
    assert f"helo=<{CLIENT_HELO}>" in line      # Postfix's log shows the client's HELO (item 1)
    assert pf.delivered("user") == []


def test_postfix_does_not_trust_smtpguards_own_address(postfix: Postfix) -> None:
    """examples/postfix/main.cf's mynetworks: a session from 127.0.0.1 that XCLIENT did not
    describe is a stranger to Postfix, so it cannot relay."""
    with smtplib.SMTP("127.0.0.1", postfix.port, timeout=20) as s:
        s.ehlo("mx.example.test")
        assert s.mail("sender@elsewhere.test")[0] == 250
        code, text = s.rcpt("someone@elsewhere.test")
    assert code == 554 and b"Relay access denied" in text


def test_the_example_smtpguard_config_loads_and_matches_master_cf() -> None:
    from smtpguard.config import load

    config = load(str(EXAMPLE / "smtpguard.toml"))
    assert config.upstream.xclient and not config.upstream.xforward
    assert f"{config.upstream.host}:{config.upstream.port}" in (EXAMPLE / "master.cf").read_text()
    assert "{session}" in config.server.resolution_url


def test_the_instance_runs_the_examples_settings_once_each(postfix: Postfix) -> None:
    """examples/postfix/main.cf's values are in force, each written once (Postfix warns
    about none), and master.cf has one smtpd listener: the example's, on the instance's port."""
    shown = postfix.postconf("-n")
    assert shown.returncode == 0 and shown.stderr == "", shown.stderr
    in_force = {key.strip(): value.strip() for key, _, value in (line.partition("=") for line in shown.stdout.splitlines())}
    for key, value in read_main_cf(EXAMPLE / "main.cf").items():
        assert in_force[key] == value, key
    assert (postfix.etc / "main.cf").read_text().count("\nmynetworks =") == 1
    services = postfix.postconf("-M")
    assert services.stderr == "", services.stderr
    listeners = [line for line in services.stdout.splitlines() if line.split()[1] == "inet"]
    assert len(listeners) == 1 and listeners[0].startswith(f"{postfix.address} inet")
    assert "smtpd_client_connection_count_limit=0" in listeners[0]
    assert "10025" not in services.stdout   # the example's port, which concurrent instances would share


def test_a_service_written_twice_is_refused_before_postfix_sees_it() -> None:
    twice = example_services(2525) + ["127.0.0.1:2525 inet n - n - - smtpd"]
    with pytest.raises(ValueError, match="two entries for the service 127.0.0.1:2525 inet"):
        instance_master_cf(twice)
    once = instance_master_cf(example_services(2525))
    assert once.count("127.0.0.1:2525 inet") == 1 and "10025" not in once
    assert once.count("\npostlog ") + once.startswith("postlog ") == 1


def test_stopping_the_instance_is_bounded_and_leaves_no_master(postfix: Postfix) -> None:
    pid = postfix.master_pid()
    assert pid is not None
    assert stop(postfix) is None        # the master went away by itself, within the bound
    assert postfix.master_pid() is None and not Path(f"/proc/{pid}").exists()


def test_a_hung_postfix_command_is_killed_with_its_children(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A command that hangs (as `postfix stop` waiting on `master -t` can) is killed, with
    the scripts it started, after COMMAND_TIMEOUT; the caller gets TimeoutExpired."""
    pids = tmp_path / "pids"
    hang = tmp_path / "hang"
    hang.write_text(f"#!/bin/sh\nsleep 600 &\necho $$ $! > {pids}\nwait\n")
    hang.chmod(0o755)
    monkeypatch.setattr(fixture, "COMMAND_TIMEOUT", 1)
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        Postfix(tmp_path, 0).run(str(hang), "stop")
    assert time.monotonic() - started < 10
    for pid in pids.read_text().split():
        wait_for(lambda: not Path(f"/proc/{pid}").exists() or " Z " in Path(f"/proc/{pid}/stat").read_text(), timeout=5)


def test_an_ipv6_clients_address_reaches_postfix_through_xclient(
        postfix: Postfix, guard_factory: Callable[..., Any]) -> None:
    """Found by hand: with inet_protocols = ipv4 Postfix refuses XCLIENT
    ADDR=IPV6:... (501 Bad ADDR syntax) and every IPv6 sender is deferred.
    examples/postfix/main.cf keeps inet_protocols = all; with it an IPv6
    client is delivered under its own address."""
    import socket

    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        guard = guard_factory(upstream=postfix.address, xclient=True, listen=["[::1]:0"])
    except OSError:
        pytest.skip("::1 not available here")
    with smtplib.SMTP("::1", guard.port, timeout=20) as s:
        s.ehlo("v6.client.example.test")
        assert s.sendmail("sender@elsewhere.test", ["user@example.test"], b"Subject: v6\r\n\r\nhello\r\n") == {}
    message = postfix.wait_delivered("user")[0].decode(errors="replace")
    assert message.split("Received: ", 2)[1].startswith("from v6.client.example.test (unknown [IPv6:::1])"), message
    assert not guard.events("upstream.xclient_refused")
