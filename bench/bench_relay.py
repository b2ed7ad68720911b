"""Relay cost: Postfix's smtp-source -> smtpguard -> smtp-sink, side by side
with smtp-source -> smtp-sink directly and with Postfix's before-queue proxy
(smtpd_proxy_filter) in front of the same sink, in one run (issue 15).

1 KB messages, 20 parallel sessions. Three measurements:
* one message per session: rate and the server's CPU seconds per 1,000
  messages (from /proc/PID/stat, workers included; Postfix's smtpd
  processes are reaped children of its master);
* many messages per session (smtp-source -d): rate, and rate per core used;
* added latency, unloaded: one client, one message at a time, the time from
  the final dot to the reply, through smtpguard and to the sink directly.
smtpguard runs with no rules (1 and 2 workers) and with the shipped policy
(examples/smtpguard.toml, its DNS answered by a loopback server), so the
cost of the facts shows; it logs at info, as in production (Postfix writes
its maillog too), to /dev/null. Rounds alternate the systems so that a noisy shared
machine affects all alike; medians and ratios are printed, then the issue's
targets beside the figures. Loopback only; every run has a timeout.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import postfix_proxy  # noqa: E402
from common import ROOT, cpu_seconds, free_port, guard_config, tool, wait_port  # noqa: E402,F401  (others import them from here)

# Issue 15's targets.
TARGET_CPU_MS = 0.6            # per relayed message, shipped policy, one per session
TARGET_CPU_VS_POSTFIX = 1.25   # ... and within this of Postfix's proxy
TARGET_RATE_2W = 1.0           # 2 workers' rate vs Postfix's proxy
TARGET_MANY_PER_CORE = 0.5     # many per session: rate per core used vs the direct limit's rate
TARGET_LATENCY_MS = 0.5        # added latency, median, unloaded


def source(port: int, messages: int, sessions: int, timeout: float, *, keep: bool = False) -> float:
    """Seconds for smtp-source to deliver `messages` (one per session, or
    `keep`: sessions that send message after message)."""
    start = time.perf_counter()
    subprocess.run([tool("smtp-source"), *(["-d"] if keep else []), "-l", "1024", "-m", str(messages),
                    "-s", str(sessions), "-f", "bench@sender.test", "-t", "user@example.test",
                    f"127.0.0.1:{port}"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=timeout)
    return time.perf_counter() - start


def latencies(port: int, messages: int, timeout: float = 60.0) -> list[float]:
    """One unhurried client: seconds from writing the final dot to reading the reply, per message."""
    body = b"Subject: latency\r\n\r\n" + b"x" * 1000 + b"\r\n.\r\n"
    out: list[float] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        f = s.makefile("rb")
        try:
            def reply() -> bytes:
                while True:
                    line = f.readline()
                    if not line:
                        raise SystemExit("bench_relay: the server closed the connection")
                    if line[3:4] != b"-":
                        return line

            reply()
            s.sendall(b"EHLO bench.sender.test\r\n")
            reply()
            for _ in range(messages):
                for command in (b"MAIL FROM:<bench@sender.test>\r\n", b"RCPT TO:<user@example.test>\r\n",
                                b"DATA\r\n"):
                    s.sendall(command)
                    reply()
                started = time.perf_counter()
                s.sendall(body)
                line = reply()
                out.append(time.perf_counter() - started)
                if not line.startswith(b"250"):
                    raise SystemExit(f"bench_relay: the message was refused: {line!r}")
            s.sendall(b"QUIT\r\n")
        finally:
            f.close()
    return out


def _guard(ports: dict[Any, int], name: Any, sink_port: int, dns: str, tmp: str) -> "subprocess.Popen[str]":
    port = ports[name]
    if str(name).startswith("policy"):
        workers = 2 if name == "policy2" else 1
        return subprocess.Popen(
            [sys.executable, "-m", "smtpguard", "serve", "--config", str(ROOT / "examples" / "smtpguard.toml"),
             "--listen", f"127.0.0.1:{port}", "--upstream", f"127.0.0.1:{sink_port}", "--workers", str(workers),
             "--dns-server", dns, "--state", "memory://", "--log-level", "info"],
            cwd=ROOT, stderr=subprocess.DEVNULL, text=True)
    conf = guard_config(Path(tmp) / f"bench{name}.toml", port, sink_port, """
[limits]
# one load generator on loopback: the per-client limits and the early-talker
# wait are the screen's job, measured by bench_screen.py, not here
exempt = ["127.0.0.0/8"]
[log]
level = "info"        # as in production: two lines per relayed message (Postfix logs too)
""")
    return subprocess.Popen([sys.executable, "-m", "smtpguard", "serve", "--config", str(conf), "--workers", str(name)],
                            cwd=ROOT, stderr=subprocess.DEVNULL, text=True)


LABELS = {1: "smtpguard, 1 worker, no rules", 2: "smtpguard, 2 workers, no rules",
          "policy": "smtpguard, 1 worker, shipped policy", "policy2": "smtpguard, 2 workers, shipped policy"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--latency-messages", type=int, default=300)
    ap.add_argument("--quick", action="store_true", help="500 messages, 3 rounds, 100 for latency")
    args = ap.parse_args()
    if args.quick:
        args.messages, args.rounds, args.latency_messages = 500, 3, 100

    sink_port = free_port()
    names: list[Any] = [1, 2, "policy", "policy2"]
    ports: dict[Any, int] = {n: free_port() for n in names}
    sys.path.insert(0, str(ROOT))
    from tests.fixtures_dns import DnsServer

    dns_server = DnsServer().start()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    sink = subprocess.Popen([tool("smtp-sink"), *user, "-c", f"127.0.0.1:{sink_port}", "256"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    guards: dict[Any, subprocess.Popen[str]] = {}
    pf_port = free_port()
    pf_root = postfix_proxy.start(pf_port, sink_port) if postfix_proxy.available() else None
    rate: dict[Any, list[float]] = {k: [] for k in ["direct", "postfix", *names]}
    cpu: dict[Any, list[float]] = {k: [] for k in ["postfix", *names]}
    many: dict[Any, list[float]] = {k: [] for k in ("direct", 1, "policy")}
    many_cores: dict[Any, list[float]] = {k: [] for k in (1, "policy")}
    lat: dict[Any, list[float]] = {k: [] for k in ("direct", 1, "policy")}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            guards[name] = _guard(ports, name, sink_port, dns_server.address, tmp)
        try:
            wait_port(sink_port)
            for port in ports.values():
                wait_port(port)
                source(port, 100, args.sessions, 60)  # warm-up: imports, pool, caches, the pregreet pass
            if pf_root is not None:
                wait_port(pf_port)
                source(pf_port, 100, args.sessions, 60)
            for _ in range(args.rounds):
                rate["direct"].append(args.messages / source(sink_port, args.messages, args.sessions, 120))
                if pf_root is not None:
                    master = postfix_proxy.master_pid(pf_root)
                    before = cpu_seconds(master, children_done=True)
                    rate["postfix"].append(args.messages / source(pf_port, args.messages, args.sessions, 300))
                    # smtpd processes exit and are reaped as they finish; their CPU
                    # goes to the master's cumulative children time
                    cpu["postfix"].append((cpu_seconds(master, children_done=True) - before) / args.messages * 1000)
                for name in names:
                    before = cpu_seconds(guards[name].pid)
                    rate[name].append(args.messages / source(ports[name], args.messages, args.sessions, 300))
                    cpu[name].append((cpu_seconds(guards[name].pid) - before) / args.messages * 1000)
                # many messages per session
                many["direct"].append(args.messages / source(sink_port, args.messages, args.sessions, 120, keep=True))
                for name in (1, "policy"):
                    before = cpu_seconds(guards[name].pid)
                    seconds = source(ports[name], args.messages, args.sessions, 300, keep=True)
                    many[name].append(args.messages / seconds)
                    many_cores[name].append((cpu_seconds(guards[name].pid) - before) / seconds)
                # added latency, unloaded
                lat["direct"].extend(latencies(sink_port, args.latency_messages))
                for name in (1, "policy"):
                    lat[name].extend(latencies(ports[name], args.latency_messages))
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
    report(args, rate, cpu, many, many_cores, lat)


def _med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def report(args: argparse.Namespace, rate: dict[Any, list[float]], cpu: dict[Any, list[float]],
           many: dict[Any, list[float]], many_cores: dict[Any, list[float]], lat: dict[Any, list[float]]) -> None:
    d, p, pc = _med(rate["direct"]), _med(rate["postfix"]), _med(cpu["postfix"])
    print(f"relay: 1 KB messages, {args.sessions} parallel sessions, {args.messages} messages a run, "
          f"{args.rounds} alternating rounds (medians; rounds in brackets)")
    print(f"  {'system':<42} {'msg/s, 1 per session':>21} {'CPU ms/msg':>11} {'vs Postfix: rate, CPU':>22}")
    print(f"  {'smtp-source -> smtp-sink (the limit)':<42} {d:21.0f} {'':>11}"
          f"   [{', '.join(f'{x:.0f}' for x in rate['direct'])}]")
    if rate["postfix"]:
        print(f"  {'Postfix smtpd_proxy_filter':<42} {p:21.0f} {pc:11.2f} {'1.00, 1.00':>22}"
              f"   [{', '.join(f'{x:.2f}' for x in cpu['postfix'])}]")
    for name, label in LABELS.items():
        r, c = _med(rate[name]), _med(cpu[name])
        vs = f"{r / p:.2f}, {c / pc:.2f}" if rate["postfix"] else "-"
        print(f"  {label:<42} {r:21.0f} {c:11.2f} {vs:>22}   [{', '.join(f'{x:.2f}' for x in cpu[name])}]")
    md = _med(many["direct"])
    print(f"many messages per session (smtp-source -d): the limit {md:.0f} msg/s")
    for name in (1, "policy"):
        r, cores = _med(many[name]), _med(many_cores[name])
        print(f"  {LABELS[name]:<42} {r:7.0f} msg/s on {cores:4.2f} cores: {r / max(cores, 1e-9):7.0f} msg/s "
              f"per core, {r / max(cores, 1e-9) / md:4.2f}x the limit's rate")
    ld = _med(lat["direct"]) * 1000
    print(f"latency, final dot -> reply, one unhurried client ({len(lat['direct'])} messages each; medians): "
          f"the sink directly {ld:.3f} ms")
    for name in (1, "policy"):
        print(f"  {LABELS[name]:<42} {_med(lat[name]) * 1000:.3f} ms: added {_med(lat[name]) * 1000 - ld:.3f} ms")
    if not rate["postfix"]:
        print("targets: Postfix's proxy did not run (needs root and Postfix): no ratios")
        return
    cp = _med(cpu["policy"])
    per_core = _med(many["policy"]) / max(_med(many_cores["policy"]), 1e-9) / md
    added = _med(lat["policy"]) * 1000 - ld
    print("targets (issue 15):")
    for ok, text in [
        (cp <= TARGET_CPU_MS, f"CPU per message, shipped policy {cp:.2f} ms <= {TARGET_CPU_MS} ms"),
        (cp / pc <= TARGET_CPU_VS_POSTFIX, f"... {cp / pc:.2f}x Postfix's proxy <= {TARGET_CPU_VS_POSTFIX}x"),
        (_med(rate[2]) / p >= TARGET_RATE_2W,
         f"2 workers' rate (no rules) {_med(rate[2]) / p:.2f}x Postfix's proxy >= {TARGET_RATE_2W}x"),
        (_med(rate["policy2"]) / p >= TARGET_RATE_2W,
         f"2 workers' rate (shipped policy) {_med(rate['policy2']) / p:.2f}x Postfix's proxy >= {TARGET_RATE_2W}x"),
        (per_core >= TARGET_MANY_PER_CORE,
         f"many per session, shipped policy: {per_core:.2f}x the limit's rate per core >= {TARGET_MANY_PER_CORE}x"),
        (added <= TARGET_LATENCY_MS, f"added latency, shipped policy {added:.3f} ms <= {TARGET_LATENCY_MS} ms"),
    ]:
        print(f"  {'met    ' if ok else 'NOT MET'} {text}")


if __name__ == "__main__":
    main()
