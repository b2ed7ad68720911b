"""What the HTTP side costs (issue 12): relay throughput without and with
`--http` (every decision-log event counted for /metrics, the upstream checked
every 10 s, /metrics scraped every second meanwhile: far more often than
Prometheus' usual 15-60 s), side by side in alternating rounds; then the
latency of /metrics, the resolution page and /healthz.

Postfix's smtp-source -> smtpguard -> smtp-sink, 1 KB messages, 20 parallel
sessions, one message per session (as bench_relay.py). Medians and ratios
are printed, never asserted. Loopback only; every round has a timeout.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from bench_relay import ROOT, cpu_seconds, free_port, source, tool, wait_port


def config(port: int, sink_port: int, http: int | None) -> str:
    return f"""
[server]
listen = ["127.0.0.1:{port}"]
hostname = "mx.example.test"
domains = ["example.test"]
[upstream]
address = "127.0.0.1:{sink_port}"
[pregreet]
wait = "0s"            # the screen's wait is not what is measured here
[limits]
per_ip_sessions = 0    # all the load comes from 127.0.0.1
[log]
level = "warning"
""" + (f'[http]\nlisten = "127.0.0.1:{http}"\n' if http else "")


def latency(url: str, n: int) -> tuple[float, float]:
    """Median and 95th percentile milliseconds of `n` sequential GETs."""
    times = []
    for _ in range(n):
        start = time.perf_counter()
        with urllib.request.urlopen(url, timeout=10) as r:
            r.read()
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="500 messages, 3 rounds")
    args = ap.parse_args()
    if args.quick:
        args.messages, args.rounds = 500, 3

    sink_port, http_port = free_port(), free_port()
    ports = {"without --http": free_port(), "with --http": free_port()}
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    sink = subprocess.Popen([tool("smtp-sink"), *user, "-c", f"127.0.0.1:{sink_port}", "256"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    guards: dict[str, subprocess.Popen[str]] = {}
    stop = threading.Event()
    scrapes = [0]

    def scrape() -> None:
        while not stop.wait(1.0):
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
                r.read()
            scrapes[0] += 1

    with tempfile.TemporaryDirectory() as tmp:
        for label, port in ports.items():
            conf = Path(tmp) / f"{port}.toml"
            conf.write_text(config(port, sink_port, http_port if label == "with --http" else None))
            guards[label] = subprocess.Popen([sys.executable, "-m", "smtpguard", "serve", "--config", str(conf)],
                                             cwd=ROOT, stderr=subprocess.DEVNULL, text=True)
        scraper = threading.Thread(target=scrape, daemon=True)
        try:
            wait_port(sink_port)
            wait_port(http_port)
            for port in ports.values():
                wait_port(port)
                source(port, 100, args.sessions, 60)  # warm-up: imports, pool, caches
            scraper.start()
            rate: dict[str, list[float]] = {k: [] for k in ports}
            cpu: dict[str, list[float]] = {k: [] for k in ports}
            for i in range(args.rounds):
                order = list(ports.items()) if i % 2 == 0 else list(reversed(ports.items()))
                for label, port in order:
                    before = cpu_seconds(guards[label].pid)
                    rate[label].append(args.messages / source(port, args.messages, args.sessions, 300))
                    cpu[label].append((cpu_seconds(guards[label].pid) - before) / args.messages * 1000)
            stop.set()
            scraper.join(15)
            base = f"http://127.0.0.1:{http_port}"
            lat = {
                "/metrics": latency(base + "/metrics", 200),
                "/smtp?code=GRAYLIST (text)": latency(base + "/smtp?code=GRAYLIST&ip=192.0.2.7&session=0a1b2c000001", 200),
                "/smtp?code=GRAYLIST&format=html": latency(
                    base + "/smtp?code=GRAYLIST&ip=192.0.2.7&session=0a1b2c000001&format=html", 200),
                "/healthz": latency(base + "/healthz", 200),
            }
        finally:
            stop.set()
            for g in guards.values():
                g.terminate()
            sink.terminate()
            for g in guards.values():
                g.wait(30)
            sink.wait(10)
    print(f"http: {args.messages} x 1 KB messages, {args.sessions} parallel sessions, {args.rounds} alternating "
          f"rounds (medians); /metrics scraped {scrapes[0]} times meanwhile")
    base_rate = statistics.median(rate["without --http"])
    for label in ports:
        r, c = statistics.median(rate[label]), statistics.median(cpu[label])
        print(f"  smtpguard {label:<16} {r:7.0f} msg/s  ratio {r / base_rate:5.2f}   CPU per 1,000 messages "
              f"{c:5.2f} s   (rounds: {', '.join(f'{x:.0f}' for x in rate[label])})")
    for path, (med, p95) in lat.items():
        print(f"  GET {path:<30} median {med:6.2f} ms   p95 {p95:6.2f} ms   (200 sequential requests)")


if __name__ == "__main__":
    main()
