"""Relay throughput: Postfix's smtp-source -> smtpguard -> smtp-sink, side by
side with smtp-source -> smtp-sink directly, in one run.

1 KB messages, 20 parallel sessions, one message per session (the issue's
scenario). Rounds alternate direct and proxied runs so that a noisy shared
machine affects both alike; medians and the ratio are reported, with
smtpguard's own CPU seconds per 1,000 messages (from /proc/PID/stat).
Loopback only; bounded: each round has a timeout.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
TICKS = os.sysconf("SC_CLK_TCK")


def tool(name: str) -> str:
    path = shutil.which(name) or f"/usr/sbin/{name}"
    if not os.path.exists(path):
        sys.exit(f"bench_relay: {name} not found (Debian package postfix; `make bench` installs it)")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"bench_relay: nothing listening on {port} after {timeout}s")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def source(port: int, messages: int, sessions: int, timeout: float) -> float:
    """Seconds for smtp-source to deliver `messages`, one per session."""
    start = time.perf_counter()
    subprocess.run([tool("smtp-source"), "-l", "1024", "-m", str(messages), "-s", str(sessions),
                    "-f", "bench@sender.test", "-t", "postmaster@example.test", f"127.0.0.1:{port}"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="500 messages, 3 rounds")
    args = ap.parse_args()
    if args.quick:
        args.messages, args.rounds = 500, 3

    sink_port, guard_port = free_port(), free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    sink = subprocess.Popen([tool("smtp-sink"), *user, "-c", f"127.0.0.1:{sink_port}", "256"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "bench.toml"
        conf.write_text(f"""
[server]
listen = ["127.0.0.1:{guard_port}"]
hostname = "mx.example.test"
domains = ["example.test"]
[upstream]
address = "127.0.0.1:{sink_port}"
[log]
level = "warning"
""")
        guard = subprocess.Popen([sys.executable, "-m", "smtpguard", "serve", "--config", str(conf)],
                                 cwd=ROOT, stderr=subprocess.PIPE, text=True)
        try:
            wait_port(sink_port)
            wait_port(guard_port)
            source(guard_port, 100, args.sessions, 60)  # warm-up: imports, pool, caches
            direct, proxied, cpu = [], [], []
            for _ in range(args.rounds):
                direct.append(args.messages / source(sink_port, args.messages, args.sessions, 120))
                before = cpu_seconds(guard.pid)
                proxied.append(args.messages / source(guard_port, args.messages, args.sessions, 300))
                cpu.append((cpu_seconds(guard.pid) - before) / args.messages * 1000)
        finally:
            guard.terminate()
            sink.terminate()
            guard.wait(30)
            sink.wait(10)
    d, p, c = statistics.median(direct), statistics.median(proxied), statistics.median(cpu)
    print(f"relay: {args.messages} x 1 KB messages, {args.sessions} parallel sessions, one message per session, "
          f"{args.rounds} alternating rounds (medians)")
    print(f"  smtp-source -> smtp-sink             {d:8.0f} msg/s   (rounds: {', '.join(f'{x:.0f}' for x in direct)})")
    print(f"  smtp-source -> smtpguard -> smtp-sink {p:7.0f} msg/s   (rounds: {', '.join(f'{x:.0f}' for x in proxied)})")
    print(f"  ratio proxied/direct                  {p / d:7.2f}")
    print(f"  smtpguard CPU per 1,000 messages      {c:7.2f} s    (rounds: {', '.join(f'{x:.2f}' for x in cpu)})")


if __name__ == "__main__":
    main()
