"""What the benchmarks share: Postfix's tools, free loopback ports, waiting
for a listener, and a process's CPU time and memory from /proc."""

from __future__ import annotations

import os
import shutil
import socket
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") / 1024
NAME = Path(sys.argv[0]).stem


def tool(name: str) -> str:
    path = shutil.which(name) or f"/usr/sbin/{name}"
    if not os.path.exists(path):
        sys.exit(f"{NAME}: {name} not found (Debian package postfix; `make bench` installs it)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)  # polling a condition with a deadline, not synchronisation by sleep
    raise SystemExit(f"{NAME}: nothing listening on {port} after {timeout}s")


def _stat(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def cpu_seconds(pid: int, children_done: bool = False) -> float:
    """utime + stime of a process and its children (the workers), live ones included;
    with `children_done`, also the CPU of its children that have exited (cutime + cstime)."""
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int(_stat(int(entry.name))[1]) == pid:
                    pids.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                continue
    total = 0.0
    for p in pids:
        try:
            fields = _stat(p)
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS
        if children_done and p == pid:
            total += (int(fields[13]) + int(fields[14])) / TICKS
    return total


def status(pid: int, key: str) -> int:
    """A /proc/PID/status value in bytes (VmRSS, VmHWM, ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def rss_kib(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB


def guard_config(path: Path, port: int, upstream: int, extra: str = "") -> Path:
    """An smtpguard config for a benchmark: listening on loopback `port`,
    serving example.test, relaying to `upstream`; `extra` is more TOML."""
    path.write_text(f"""
[server]
listen = ["127.0.0.1:{port}"]
hostname = "mx.example.test"
domains = ["example.test"]
[upstream]
address = "127.0.0.1:{upstream}"
{extra}
""")
    return path
