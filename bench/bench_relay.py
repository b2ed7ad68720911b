"""Relay throughput: Postfix's smtp-source -> smtpguard -> smtp-sink, side by
side with smtp-source -> smtp-sink directly, in one run.

1 KB messages, 20 parallel sessions, one message per session (the issue's
scenario). Rounds alternate direct and proxied runs (one worker, and two workers
on this 2-core machine) so that a noisy shared machine affects all alike;
medians and the ratios are reported, with smtpguard's own CPU seconds per
1,000 messages (from /proc/PID/stat, workers included).
Loopback only; bounded: each round has a timeout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import postfix_proxy  # noqa: E402
from common import ROOT, cpu_seconds, free_port, tool, wait_port  # noqa: E402,F401  (others import them from here)













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

    sink_port = free_port()
    # 1 and 2 workers with no rules; "policy": 1 worker with the shipped
    # policy (examples/smtpguard.toml), its DNS answered by a loopback server
    ports: dict[Any, int] = {1: free_port(), 2: free_port(), "policy": free_port()}
    sys.path.insert(0, str(ROOT))
    from tests.fixtures_dns import DnsServer

    dns_server = DnsServer().start()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    sink = subprocess.Popen([tool("smtp-sink"), *user, "-c", f"127.0.0.1:{sink_port}", "256"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    guards: dict[int, subprocess.Popen[str]] = {}
    pf_port = free_port()
    pf_root = postfix_proxy.start(pf_port, sink_port) if postfix_proxy.available() else None
    with tempfile.TemporaryDirectory() as tmp:
        for workers, port in ports.items():
            if workers == "policy":
                guards[workers] = subprocess.Popen(
                    [sys.executable, "-m", "smtpguard", "serve", "--config", str(ROOT / "examples" / "smtpguard.toml"),
                     "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{sink_port}",
                     "--dns-server", dns_server.address, "--state", "memory://", "--log-level", "warning"],
                    cwd=ROOT, stderr=subprocess.DEVNULL, text=True)
                continue
            conf = Path(tmp) / f"bench{workers}.toml"
            conf.write_text(f"""
[server]
listen = ["127.0.0.1:{port}"]
hostname = "mx.example.test"
domains = ["example.test"]
workers = {workers}
[upstream]
address = "127.0.0.1:{sink_port}"
[limits]
# one load generator on loopback: the per-client limits and the early-talker
# wait are the screen's job, measured by bench_screen.py, not here
exempt = ["127.0.0.0/8"]
[log]
level = "warning"
""")
            guards[workers] = subprocess.Popen([sys.executable, "-m", "smtpguard", "serve", "--config", str(conf)],
                                               cwd=ROOT, stderr=subprocess.DEVNULL, text=True)
        try:
            wait_port(sink_port)
            for port in ports.values():
                wait_port(port)
                source(port, 100, args.sessions, 60)  # warm-up: imports, pool, caches
            if pf_root is not None:
                wait_port(pf_port)
                source(pf_port, 100, args.sessions, 60)
            direct: list[float] = []
            proxied: dict[Any, list[float]] = {k: [] for k in ports}
            cpu: dict[Any, list[float]] = {k: [] for k in ports}
            postfix: list[float] = []
            postfix_cpu: list[float] = []
            for _ in range(args.rounds):
                direct.append(args.messages / source(sink_port, args.messages, args.sessions, 120))
                if pf_root is not None:
                    master = postfix_proxy.master_pid(pf_root)
                    before = cpu_seconds(master)
                    postfix.append(args.messages / source(pf_port, args.messages, args.sessions, 300))
                    # smtpd processes exit and are reaped as they finish; their CPU
                    # goes to the master's cumulative children time
                    postfix_cpu.append((cpu_seconds(master, children_done=True) - before) / args.messages * 1000)
                for workers, port in ports.items():
                    before = cpu_seconds(guards[workers].pid)
                    proxied[workers].append(args.messages / source(port, args.messages, args.sessions, 300))
                    cpu[workers].append((cpu_seconds(guards[workers].pid) - before) / args.messages * 1000)
        finally:
            for g in guards.values():
                g.terminate()
            sink.terminate()
            for g in guards.values():
                g.wait(30)
            sink.wait(10)
            if pf_root is not None:
                postfix_proxy.stop(pf_root)
            dns_server.stop()
    d = statistics.median(direct)
    print(f"relay: {args.messages} x 1 KB messages, {args.sessions} parallel sessions, one message per session, "
          f"{args.rounds} alternating rounds (medians)")
    print(f"  smtp-source -> smtp-sink                       {d:7.0f} msg/s   "
          f"(rounds: {', '.join(f'{x:.0f}' for x in direct)})")
    if postfix:
        p, c = statistics.median(postfix), statistics.median(postfix_cpu)
        print(f"  {'smtp-source -> Postfix smtpd_proxy_filter -> smtp-sink':<45} {p:7.0f} msg/s   "
              f"(rounds: {', '.join(f'{x:.0f}' for x in postfix)})")
        print(f"      ratio to direct {p / d:5.2f}; Postfix CPU per 1,000 messages {c:5.2f} s")
    for workers in ports:
        p, c = statistics.median(proxied[workers]), statistics.median(cpu[workers])
        what = ("1 worker, shipped policy" if workers == "policy"
                else f"{workers} worker{'s' if workers != 1 else ''}, no rules")
        label = f"smtp-source -> smtpguard ({what}) -> smtp-sink"
        print(f"  {label:<45} {p:7.0f} msg/s   (rounds: {', '.join(f'{x:.0f}' for x in proxied[workers])})")
        vs_postfix = (f"; rate {p / statistics.median(postfix):4.2f}x and CPU {c / statistics.median(postfix_cpu):4.2f}x "
                      "Postfix's proxy" if postfix else "")
        print(f"      ratio to direct {p / d:5.2f}; smtpguard CPU per 1,000 messages {c:5.2f} s "
              f"(rounds: {', '.join(f'{x:.2f}' for x in cpu[workers])}){vs_postfix}")


if __name__ == "__main__":
    main()
