"""A private Postfix instance on loopback: the real MTA behind smtpguard.

`postfix -c DIR` with everything under one world-traversable temporary
directory: Postfix on 127.0.0.1:<free port>, virtual mailboxes for
example.test (user@, bob@, postmaster@; anything else is an unknown user,
550), no delivery off this machine (the default transport is `error:`), its
own log file, XCLIENT allowed from 127.0.0.1 only when asked for, and
`mynetworks` as the test says. With `example=True` the instance runs the
lines that examples/postfix/ ships instead (main.cf's settings, master.cf's
smtpd service on the instance's own port), so a test proves that what we
tell admins to write works.

One parameter, one service: main.cf is written from one mapping (a later
value replaces an earlier one, never a second line) and master.cf from
entries keyed by service name and type, and the instance is refused before
it starts if `postconf -n` or `postconf -M` warns. (Appending the example's
lines to a finished config gave Postfix two `mynetworks`, two
`smtpd_authorized_xclient_hosts` and two services for one port, and with the
example's fixed 127.0.0.1:10025 every concurrent instance fought for one
port.) Every start and stop is bounded: a master that does not go away on
`postfix stop` is killed with its process group, and the test errors.

Debian's postfix package provides the programs (scripts/system-deps.sh
installs it); the test is skipped with a reason where it is missing, and
fails in CI. KEEP_POSTFIX=1 keeps the instances' directories for reading.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping

import pytest

from tests.fixtures_smtp import free_port, wait_for, wait_port

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "postfix"
MAILBOXES = ("user", "bob", "postmaster")
HOSTNAME = "mta.example.test"
COMMAND_TIMEOUT = 60   # seconds for one postfix/postconf command
STOP_TIMEOUT = 20      # seconds for the master to be gone after `postfix stop`


@dataclass
class Postfix:
    root: Path
    port: int

    @property
    def etc(self) -> Path:
        return self.root / "etc"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        """`PROGRAM -c <this instance> ARGS`, bounded in time: past COMMAND_TIMEOUT the
        command and the scripts it started (postfix-script, `master -t`) are killed
        and TimeoutExpired is raised. (A started master leaves this process group:
        it makes a session of its own.)"""
        argv = [program, "-c", str(self.etc), *args]
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) as proc:
            try:
                out, err = proc.communicate(timeout=COMMAND_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                try:
                    proc.communicate(timeout=5)
                except subprocess.TimeoutExpired:   # a grandchild that left the group holds a pipe
                    pass
                raise
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(POSTFIX, *args)

    def postconf(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run(POSTCONF, *args)

    def delivered(self, mailbox: str) -> list[bytes]:
        """Messages in a virtual mailbox (Maildir), oldest first."""
        new = self.root / "mail" / "example.test" / mailbox / "new"
        if not new.exists():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir(), key=lambda p: p.stat().st_mtime)]

    def wait_delivered(self, mailbox: str, count: int = 1) -> list[bytes]:
        wait_for(lambda: len(self.delivered(mailbox)) >= count, timeout=15)
        return self.delivered(mailbox)

    def master_pid(self) -> int | None:
        """The running master's pid, or None."""
        try:
            pid = int((self.root / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if os.path.exists(f"/proc/{pid}") else None


# ---------------------------------------------------------------------------
# main.cf: one mapping, one line per parameter.

def instance_params(root: Path, hostname: str) -> dict[str, str]:
    """The parameters every private instance needs: its own directories and
    log under `root`, loopback only."""
    return {
        "compatibility_level": "3.6",
        "queue_directory": f"{root}/queue",
        "data_directory": f"{root}/data",
        "meta_directory": "/etc/postfix",
        "daemon_directory": "/usr/lib/postfix/sbin",
        "command_directory": "/usr/sbin",
        "shlib_directory": "/usr/lib/postfix",
        "mail_owner": "postfix",
        "myhostname": hostname,
        "mydestination": "",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "maillog_file": f"{root}/maillog",
        "maillog_file_prefixes": str(root),
        "alias_maps": "",
        "alias_database": "",
    }


def render_main_cf(params: Mapping[str, str]) -> str:
    return "".join(f"{key} = {value}\n" for key, value in params.items())


def instance_main_cf(root: Path, hostname: str) -> str:
    """The main.cf lines every private instance needs (the benchmarks'
    Postfix proxy adds its own parameters below them)."""
    return render_main_cf(instance_params(root, hostname))


def read_main_cf(path: Path) -> dict[str, str]:
    """The settings of a main.cf-style file, in order (continuation lines joined)."""
    params: dict[str, str] = {}
    key = None
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace() and key is not None:
            params[key] += " " + line.strip()
            continue
        key, sep, value = (part.strip() for part in line.partition("="))
        if not sep or not re.fullmatch(r"[a-z0-9_]+", key):
            raise ValueError(f"{path}: not a main.cf setting: {line!r}")
        params[key] = value
    return params


# ---------------------------------------------------------------------------
# master.cf: entries keyed by (service name, type).

def _entries(text: str) -> list[list[str]]:
    """master.cf text as entries: a service line and its `  -o` continuation lines."""
    entries: list[list[str]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0].isspace():
            if not entries:
                raise ValueError(f"master.cf: a continuation line without a service: {line!r}")
            entries[-1].append(line)
        else:
            entries.append([line])
    return entries


def _key(entry: list[str]) -> tuple[str, str]:
    name, kind = entry[0].split()[:2]
    return name, kind


def instance_master_cf(services: list[str]) -> str:
    """Debian's master.cf without its :25 listener, with `services` (lines of
    master.cf, continuation lines included) and the log service. A service of
    `services` replaces Debian's of the same name and type: never two."""
    merged: dict[tuple[str, str], list[str]] = {}
    for entry in _entries(Path("/etc/postfix/master.cf").read_text()):
        if _key(entry) != ("smtp", "inet"):
            merged[_key(entry)] = entry
    ours: set[tuple[str, str]] = set()
    for entry in _entries("\n".join(services)):
        if _key(entry) in ours:
            raise ValueError(f"master.cf: two entries for the service {' '.join(_key(entry))}")
        ours.add(_key(entry))
        merged[_key(entry)] = entry
    merged.setdefault(("postlog", "unix-dgram"), ["postlog   unix-dgram n  -       n       -       1       postlogd"])
    return "".join(line + "\n" for entry in merged.values() for line in entry)


def example_services(port: int) -> list[str]:
    """examples/postfix/master.cf's services, its one loopback smtpd moved to `port`."""
    entries = _entries((EXAMPLE / "master.cf").read_text())
    inet = [e for e in entries if _key(e)[1] == "inet"]
    if len(inet) != 1 or not re.fullmatch(r"127\.0\.0\.1:\d+", _key(inet[0])[0]):
        raise ValueError("examples/postfix/master.cf: expected one service on 127.0.0.1:<port>")
    name = _key(inet[0])[0]
    inet[0][0] = inet[0][0].replace(name, f"127.0.0.1:{port}", 1)
    return [line for entry in entries for line in entry]


# ---------------------------------------------------------------------------
# One instance.

def _params(root: Path, xclient: bool, mynetworks: str, example: bool) -> dict[str, str]:
    boxes = ", ".join(f"{{{m}@example.test=example.test/{m}/}}" for m in MAILBOXES)
    params = instance_params(root, HOSTNAME)
    params.update({
        "mydomain": "example.test",
        "virtual_mailbox_domains": "example.test",
        "virtual_mailbox_base": f"{root}/mail",
        "virtual_mailbox_maps": f"inline:{{ {boxes} }}",
        "virtual_uid_maps": "static:65534",
        "virtual_gid_maps": "static:65534",
        "default_transport": "error:no delivery off this machine in tests",
        "relay_transport": "error:no delivery off this machine in tests",
        "smtp_dns_support_level": "disabled",
        "smtpd_authorized_xclient_hosts": "127.0.0.1" if xclient else "",
        "mynetworks": mynetworks,
        "smtputf8_enable": "yes",
        "smtpd_timeout": "30s",
    })
    if example:
        params.update(read_main_cf(EXAMPLE / "main.cf"))
    return params


def _kill(pf: Postfix) -> bool:
    """Kill the instance's master and its process group; True if one was running."""
    pid = pf.master_pid()
    if pid is None:
        return False
    try:
        # master(8) leads its own process group (as postfix-script's own
        # `kill -9 -PID` assumes); anything else gets only its own signal
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    wait_for(lambda: pf.master_pid() is None, timeout=STOP_TIMEOUT)
    return True


def stop(pf: Postfix) -> str | None:
    """`postfix stop`, bounded: None when the master went away by itself,
    else what went wrong (the master was then killed)."""
    problem = None
    try:
        pf.postfix("stop")
        wait_for(lambda: pf.master_pid() is None, timeout=STOP_TIMEOUT)
    except (subprocess.TimeoutExpired, TimeoutError, AssertionError) as e:
        problem = f"postfix stop did not stop {pf.root} ({type(e).__name__}: {e})"
    if _kill(pf) and problem is None:
        problem = f"postfix stop left the master of {pf.root} running"
    return problem


def start(root: Path, port: int, services: list[str], params: Mapping[str, str]) -> Postfix:
    """Write the configuration, refuse one Postfix warns about, set permissions, start, wait for the port."""
    pf = Postfix(root, port)
    for sub in ("etc", "queue", "data", "mail"):
        (root / sub).mkdir()
    shutil.chown(root / "data", "postfix")
    shutil.chown(root / "mail", "nobody")
    (pf.etc / "main.cf").write_text(render_main_cf(params))
    (pf.etc / "master.cf").write_text(instance_master_cf(services))
    for args in (("-n",), ("-M",)):
        r = pf.postconf(*args)
        if r.returncode != 0 or "warning" in r.stderr:
            raise RuntimeError(f"postconf {' '.join(args)} of {root}: {r.stderr.strip()}")
    r = pf.postfix("set-permissions")
    if r.returncode != 0:
        raise RuntimeError(f"postfix set-permissions: {r.stderr.strip()}")
    r = pf.postfix("start")
    if r.returncode != 0:
        raise RuntimeError(f"postfix did not start: {r.stderr.strip()} {pf.log}")
    wait_port("127.0.0.1", port, timeout=20)
    return pf


def require_postfix() -> None:
    """Skip where Postfix cannot run (fail in CI, whose scripts install it)."""
    if not (os.path.exists(POSTFIX) and os.path.exists("/etc/postfix/master.cf")):
        if os.environ.get("CI"):
            pytest.fail("Postfix (Debian package postfix) is missing: scripts/system-deps.sh must install it")
        pytest.skip("Postfix (Debian package postfix) is not installed")
    if os.geteuid() != 0:
        pytest.skip("a private Postfix instance needs root to start its master")


@contextmanager
def instances() -> Iterator[Callable[..., Postfix]]:
    """What postfix_factory yields, for a fixture of any scope: every instance
    started through it is stopped (bounded) and removed at the end."""
    require_postfix()
    started: list[Postfix] = []

    def make(xclient: bool | None = None, mynetworks: str | None = None, example: bool = False,
             params: Mapping[str, str] | None = None) -> Postfix:
        if example and (xclient is not None or mynetworks is not None):
            raise ValueError("example=True takes XCLIENT and mynetworks from examples/postfix/main.cf")
        # world-traversable: Postfix's daemons run as postfix and nobody
        root = Path(tempfile.mkdtemp(prefix="smtpguard-postfix-"))
        root.chmod(0o755)
        port = free_port()
        services = example_services(port) if example else [f"127.0.0.1:{port} inet n - n - - smtpd"]
        settings = {**_params(root, bool(xclient), mynetworks or "127.0.0.9/32", example), **(params or {})}
        started.append(Postfix(root, port))   # before the start: a half-started one is stopped too
        return start(root, port, services, settings)

    try:
        yield make
    finally:
        problems = _stop_all(started)
    if problems:
        pytest.fail("; ".join(problems))


@pytest.fixture
def postfix_factory() -> Iterator[Callable[..., Postfix]]:
    """Start private Postfix instances: `make(xclient=True, mynetworks="127.0.0.9/32")`,
    or `make(example=True)` for examples/postfix/'s settings; `params` set
    main.cf parameters over those."""
    with instances() as make:
        yield make


def _stop_all(started: list[Postfix]) -> list[str]:
    """Stop every instance (bounded) and remove its directory; what went wrong."""
    problems = [p for p in (stop(pf) for pf in started) if p]
    for pf in started:
        if not os.environ.get("KEEP_POSTFIX"):
            shutil.rmtree(pf.root, ignore_errors=True)
    return problems
