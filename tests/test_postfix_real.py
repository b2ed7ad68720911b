"""smtpguard in front of a real Postfix (issue 11 items 1, 2 and 9).

A private Postfix instance (`postfix -c DIR`, its own queue, its own log
file, Maildir delivery through the virtual agent) listens on
127.0.0.1:<free port> and takes XCLIENT from smtpguard's address only; its
`mynetworks` does not include that address, so a client that XCLIENT did not
describe would be a stranger, never trusted. The main.cf and master.cf lines
are the ones examples/postfix/ documents. A client on 127.0.0.5 sends through
smtpguard; Postfix's log and the delivered message's Received: line must
show the client's address, its confirmed name and its HELO; Postfix's own
550 for an unknown user reaches the client unchanged; relaying is refused.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import smtplib
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

from tests.fixtures_smtp import free_port, wait_for, wait_port

POSTFIX = shutil.which("postfix") or "/usr/sbin/postfix"
CLIENT_IP = "127.0.0.5"
CLIENT_NAME = "client.example.test"
CLIENT_HELO = "helo.client.example.test"


class Postfix:
    """A private Postfix instance under a world-traversable temp directory."""

    def __init__(self, root: Path, port: int) -> None:
        self.root, self.port = root, port
        self.etc, self.log, self.mail = root / "etc", root / "maillog", root / "mail"

    def write(self) -> None:
        owner = pwd.getpwnam("postfix")
        self.etc.mkdir()
        (self.root / "queue").mkdir(mode=0o755)   # root's; `postfix check` makes the rest
        (self.root / "data").mkdir()
        self.mail.mkdir()
        os.chown(self.mail, owner.pw_uid, owner.pw_gid)
        os.chown(self.root / "data", owner.pw_uid, owner.pw_gid)
        (self.etc / "vmailbox").write_text("user@example.test example.test/user/\n")
        example = Path(__file__).resolve().parent.parent / "examples" / "postfix"
        main_lines = _lines(example / "main.cf")
        master_lines = _lines(example / "master.cf").replace("127.0.0.1:10025", f"127.0.0.1:{self.port}")
        (self.etc / "main.cf").write_text(f"""
compatibility_level = 3.6
queue_directory = {self.root}/queue
data_directory = {self.root}/data
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = pf.example.test
mydomain = example.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
maillog_file = {self.log}
maillog_file_prefixes = {self.root}
syslog_name = pf-test
alias_maps =
alias_database =
smtp_dns_support_level = disabled
virtual_mailbox_domains = example.test
virtual_mailbox_base = {self.mail}
virtual_mailbox_maps = texthash:{self.etc}/vmailbox
virtual_uid_maps = static:{owner.pw_uid}
virtual_gid_maps = static:{owner.pw_gid}
{main_lines}
""")
        (self.etc / "master.cf").write_text(master_lines + """
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
""")

    def postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([POSTFIX, "-c", str(self.etc), *args], capture_output=True, text=True, timeout=60)

    def logged(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def delivered(self) -> list[bytes]:
        new = self.mail / "example.test" / "user" / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []


def _lines(path: Path) -> str:
    """The settings of an examples/postfix file, comments and blank lines left out."""
    return "\n".join(line for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#"))


@pytest.fixture
def postfix() -> Iterator[Postfix]:
    if not os.path.exists(POSTFIX):
        if os.environ.get("CI"):
            pytest.fail("postfix (Debian package postfix) is missing: scripts/system-deps.sh must install it")
        pytest.skip("postfix is not installed")
    if os.geteuid() != 0:
        pytest.skip("a private Postfix instance is started as root (postfix -c DIR start)")
    root = Path(tempfile.mkdtemp(prefix="pf-", dir="/tmp"))
    root.chmod(0o755)   # Postfix's daemons (user postfix) traverse it
    pf = Postfix(root, free_port())
    try:
        pf.write()
        checked = pf.postfix("check")
        assert checked.returncode == 0, pf.logged()
        started = pf.postfix("start")
        assert started.returncode == 0, pf.logged()
        wait_port("127.0.0.1", pf.port, timeout=20)
        yield pf
    finally:
        pf.postfix("stop")
        pid_file = root / "queue" / "pid" / "master.pid"
        wait_for(lambda: not _master_running(pid_file), timeout=20)
        if not os.environ.get("KEEP_POSTFIX"):   # set it to read the instance after a failure
            shutil.rmtree(root, ignore_errors=True)


def _master_running(pid_file: Path) -> bool:
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return False
    return os.path.exists(f"/proc/{pid}")


@pytest.fixture
def guarded(postfix: Postfix, guard_factory: Callable[..., Any], dns_server: Any) -> tuple[Postfix, Any]:
    """smtpguard with --xclient in front of the Postfix instance; the client's rDNS is confirmed."""
    dns_server.set_ptr(CLIENT_IP, [CLIENT_NAME])
    dns_server.set(CLIENT_NAME, "A", [CLIENT_IP])
    dns_server.set(CLIENT_HELO, "A", [CLIENT_IP])
    guard = guard_factory(upstream=f"127.0.0.1:{postfix.port}", xclient=True)
    return postfix, guard


def _send(guard: Any, rcpts: list[str], body: bytes = b"Subject: through smtpguard\r\n\r\nhello\r\n") -> dict[str, Any]:
    with smtplib.SMTP(guard.host, guard.port, timeout=20, source_address=(CLIENT_IP, 0)) as s:
        s.ehlo(CLIENT_HELO)
        return s.sendmail("sender@elsewhere.test", rcpts, body)


def test_postfix_sees_the_client_and_delivers(guarded: tuple[Postfix, Any]) -> None:
    pf, guard = guarded
    refused = _send(guard, ["user@example.test"])
    assert refused == {}
    wait_for(lambda: pf.delivered(), timeout=20)
    message = pf.delivered()[0].decode(errors="replace")
    # Postfix's smtpd log: the client is 127.0.0.5 with its confirmed name, never smtpguard's 127.0.0.1
    wait_for(lambda: f"client={CLIENT_NAME}[{CLIENT_IP}]" in pf.logged(), timeout=20)
    assert "client=localhost[127.0.0.1]" not in pf.logged()
    assert "smtpd[" in pf.logged() and f"client={CLIENT_NAME}[{CLIENT_IP}]" in pf.logged()
    # Postfix's own Received: line (the topmost): the client's HELO, name and address (item 1)
    received = re.search(r"^Received: from .*?(?=^\S)", message, re.M | re.S)
    assert received is not None, message
    assert received.group(0).startswith(f"Received: from {CLIENT_HELO} ({CLIENT_NAME} [{CLIENT_IP}])\n")
    assert "by pf.example.test (Postfix)" in received.group(0)
    assert "mx.example.test" not in received.group(0).split("by ")[0]
    assert "status=sent" in pf.logged() and "delivered to maildir" in pf.logged()


def test_an_unknown_users_550_comes_back_unchanged_and_relaying_is_refused(guarded: tuple[Postfix, Any]) -> None:
    pf, guard = guarded
    with smtplib.SMTP(guard.host, guard.port, timeout=20, source_address=(CLIENT_IP, 0)) as s:
        s.ehlo(CLIENT_HELO)
        assert s.mail("sender@elsewhere.test")[0] == 250
        code, text = s.rcpt("nobody@example.test")
        relay_code, relay_text = s.rcpt("someone@elsewhere.test")
        ok_code, _ = s.rcpt("user@example.test")
    # Postfix's own reply, as its log has it
    wait_for(lambda: "User unknown in virtual mailbox table" in pf.logged(), timeout=20)
    logged = re.search(r"reject: RCPT from \S+: (550 5\.1\.1 <nobody@example\.test>: [^;]+);", pf.logged())
    assert logged is not None, pf.logged()
    assert code == 550 and text.decode() == logged.group(1)[4:]
    assert relay_code in (550, 554) and ok_code == 250, (relay_code, relay_text)
    assert f"[{CLIENT_IP}]" in logged.group(0)   # rejected as the client, not as smtpguard
    line = next(x for x in pf.logged().splitlines() if "reject: RCPT" in x and "nobody@" in x)
    assert f"helo=<{CLIENT_HELO}>" in line      # Postfix's log shows the client's HELO (item 1)
    assert pf.delivered() == []


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

    example = Path(__file__).resolve().parent.parent / "examples" / "postfix"
    config = load(str(example / "smtpguard.toml"))
    assert config.upstream.xclient and not config.upstream.xforward
    assert f"{config.upstream.host}:{config.upstream.port}" in (example / "master.cf").read_text()
    assert "{session}" in config.server.resolution_url
