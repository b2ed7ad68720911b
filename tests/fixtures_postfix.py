"""A private Postfix instance on loopback: the real MTA behind smtpguard.

`postfix -c DIR` with everything under one world-traversable temporary
directory: Postfix on 127.0.0.1:<free port>, virtual mailboxes for
example.test (user@, bob@, postmaster@; anything else is an unknown user,
550), no delivery off this machine (the default transport is `error:`), its
own log file, XCLIENT allowed from 127.0.0.1 only when asked for, and
`mynetworks` as the test says. Debian's postfix package provides the
programs (scripts/system-deps.sh installs it); the test is skipped with a
reason where it is missing, and fails in CI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.fixtures_smtp import free_port, wait_for, wait_port

MAILBOXES = ("user", "bob", "postmaster")


@dataclass
class Postfix:
    root: Path
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def delivered(self, mailbox: str) -> list[bytes]:
        """Messages in a virtual mailbox (Maildir), oldest first."""
        new = self.root / "mail" / "example.test" / mailbox / "new"
        if not new.exists():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir(), key=lambda p: p.stat().st_mtime)]

    def wait_delivered(self, mailbox: str, count: int = 1) -> list[bytes]:
        wait_for(lambda: len(self.delivered(mailbox)) >= count, timeout=15)
        return self.delivered(mailbox)


def instance_main_cf(root: Path, hostname: str) -> str:
    """The main.cf lines every private instance needs: its own directories and
    log under `root`, loopback only (the benchmarks' Postfix proxy uses it too)."""
    return f"""
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
meta_directory = /etc/postfix
daemon_directory = /usr/lib/postfix/sbin
command_directory = /usr/sbin
shlib_directory = /usr/lib/postfix
mail_owner = postfix
myhostname = {hostname}
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
alias_maps =
alias_database =
"""


def instance_master_cf(services: list[str]) -> str:
    """Debian's master.cf without its :25 listener, with `services` and the log service."""
    master = Path("/etc/postfix/master.cf").read_text()
    lines = [line for line in master.splitlines() if not line.startswith("smtp      inet")] + services
    if not any(line.startswith("postlog") for line in lines):
        lines.append("postlog   unix-dgram n  -       n       -       1       postlogd")
    return "\n".join(lines) + "\n"


def _main_cf(root: Path, port: int, xclient: bool, mynetworks: str) -> str:
    boxes = ", ".join(f"{{{m}@example.test=example.test/{m}/}}" for m in MAILBOXES)
    return instance_main_cf(root, "mta.example.test") + f"""mydomain = example.test
virtual_mailbox_domains = example.test
virtual_mailbox_base = {root}/mail
virtual_mailbox_maps = inline:{{ {boxes} }}
virtual_uid_maps = static:65534
virtual_gid_maps = static:65534
default_transport = error:no delivery off this machine in tests
relay_transport = error:no delivery off this machine in tests
smtpd_authorized_xclient_hosts = {"127.0.0.1" if xclient else ""}
mynetworks = {mynetworks}
smtputf8_enable = yes
smtpd_timeout = 30s
"""


def _master_cf(port: int) -> str:
    return instance_master_cf([f"127.0.0.1:{port} inet n - n - - smtpd"])


@pytest.fixture
def postfix_factory() -> Iterator[Callable[..., Postfix]]:
    """Start private Postfix instances: `make(xclient=True, mynetworks="127.0.0.9/32")`."""
    if not (os.path.exists("/usr/sbin/postfix") and os.path.exists("/etc/postfix/master.cf")):
        if os.environ.get("CI"):
            pytest.fail("Postfix (Debian package postfix) is missing: .ci/run must install it")
        pytest.skip("Postfix (Debian package postfix) is not installed")
    if os.geteuid() != 0:
        pytest.skip("a private Postfix instance needs root to start its master")
    started: list[Path] = []

    def make(xclient: bool = False, mynetworks: str = "127.0.0.9/32") -> Postfix:
        # world-traversable: Postfix's daemons run as postfix and nobody
        root = Path(tempfile.mkdtemp(prefix="smtpguard-postfix-"))
        root.chmod(0o755)
        port = free_port()
        for sub in ("etc", "queue", "data", "mail"):
            (root / sub).mkdir()
        shutil.chown(root / "data", "postfix")
        shutil.chown(root / "mail", "nobody")
        (root / "etc" / "main.cf").write_text(_main_cf(root, port, xclient, mynetworks))
        (root / "etc" / "master.cf").write_text(_master_cf(port))
        subprocess.run(["postfix", "-c", str(root / "etc"), "set-permissions"], capture_output=True, timeout=60)
        r = subprocess.run(["postfix", "-c", str(root / "etc"), "start"], capture_output=True, text=True, timeout=60)
        started.append(root)
        if r.returncode != 0:
            raise RuntimeError(f"postfix did not start: {r.stderr} {(root / 'maillog').read_text(errors='replace') if (root / 'maillog').exists() else ''}")
        wait_port("127.0.0.1", port, timeout=20)
        return Postfix(root, port)

    yield make
    for root in started:
        subprocess.run(["postfix", "-c", str(root / "etc"), "stop"], capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)
