"""Passive OS fingerprint cost per connection: parse + classify one SYN.

A mix of SYNs is classified over and over, each call timed on its own:
documented stacks built by the tests' builder (Windows XP/7/10, Linux 2.6 to
6.x over IPv4 and IPv6, Android, macOS, iOS, FreeBSD, OpenBSD), a SYN no
signature explains, a malformed one, and real SYNs captured on loopback with
TCP_SAVE_SYN (IPv4 and IPv6, TTL 64 and 128). Measured, not asserted:

  * parse alone, then parse + classify against the shipped smtpguard.fp and
    against p0f's /etc/p0f/p0f.fp (if installed): median and p99 in µs per
    SYN, and the p0f/shipped ratio. Target: median ≤ 20 µs.
  * loading each signature file (paid once at start).

    python bench/bench_syn.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from smtpguard.core.fingerprint import SignatureSet, classify, load_signatures, parse_syn  # noqa: E402
from smtpguard.sources.fingerprint import enable_save_syn, read_saved_syn  # noqa: E402
from tests.test_syn import (  # noqa: E402
    APPLE_OPTS,
    FREEBSD_OPTS,
    LINUX_NOTS_OPTS,
    OPENBSD_OPTS,
    WINDOWS_OPTS,
    WINDOWS_XP_OPTS,
    build_syn,
)

P0F_FP = Path("/etc/p0f/p0f.fp")
SHIPPED_FP = Path(__file__).resolve().parent.parent / "smtpguard" / "data" / "smtpguard.fp"
TARGET_US = 20.0


def documented_syns() -> list[bytes]:
    return [
        build_syn(ttl=116, window=64240, layout=WINDOWS_OPTS, ws=8),
        build_syn(version=6, ttl=119, window=64800, mss=1440, layout=WINDOWS_OPTS, ws=8),
        build_syn(ttl=121, window=8192, layout=WINDOWS_OPTS, ws=2),
        build_syn(ttl=123, window=65535, layout=WINDOWS_XP_OPTS),
        build_syn(ttl=49, window=64240, ws=7),
        build_syn(version=6, ttl=60, window=64800, mss=1440, ws=7, flow=0x3A5F1),
        build_syn(ttl=52, window=29200, ws=7),
        build_syn(ttl=58, window=64240, layout=LINUX_NOTS_OPTS, ws=7),
        build_syn(ttl=54, window=64240, ws=1),
        build_syn(ttl=53, window=65535, layout=APPLE_OPTS, ws=6),
        build_syn(ttl=50, window=65535, layout=APPLE_OPTS, ws=2),
        build_syn(ttl=56, window=65535, layout=FREEBSD_OPTS, ws=6, ip_id=0),
        build_syn(ttl=47, window=16384, layout=OPENBSD_OPTS, ws=6),
        build_syn(ttl=128, window=65495, mss=65495, ws=7),      # no signature explains it
        build_syn()[:-3],                                        # malformed: cut short
    ]


def loopback_syns() -> list[bytes]:
    """Real SYNs from this kernel, via TCP_SAVE_SYN on loopback."""
    out: list[bytes] = []
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        for ttl in (None, 128):
            try:
                with socket.socket(family, socket.SOCK_STREAM) as listener:
                    listener.settimeout(5)
                    if not enable_save_syn(listener):
                        return out
                    listener.bind((host, 0))
                    listener.listen(1)
                    with socket.socket(family, socket.SOCK_STREAM) as client:
                        client.settimeout(5)
                        if ttl is not None:
                            level, opt = ((socket.IPPROTO_IP, socket.IP_TTL) if family == socket.AF_INET
                                          else (socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS))
                            client.setsockopt(level, opt, ttl)
                        client.connect(listener.getsockname()[:2])
                        conn, _ = listener.accept()
                        with conn:
                            syn = read_saved_syn(conn)
                    if syn:
                        out.append(syn)
            except OSError:
                continue
    return out


def time_calls(fn: Callable[[bytes], object], syns: list[bytes], rounds: int) -> list[float]:
    """Per-call durations in µs, every SYN of the mix once per round."""
    clock = time.perf_counter_ns
    samples: list[float] = []
    for _ in range(rounds):
        for syn in syns:
            t0 = clock()
            fn(syn)
            samples.append((clock() - t0) / 1000.0)
    return samples


def summary(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def load(path: Path) -> tuple[SignatureSet, float]:
    t0 = time.perf_counter()
    sigs = load_signatures(path.read_text(encoding="utf-8", errors="replace"), source=str(path))
    return sigs, (time.perf_counter() - t0) * 1000.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds (well under 15 s)")
    args = ap.parse_args()
    rounds = 2000 if args.quick else 20000

    syns = documented_syns() + loopback_syns()
    sets: list[tuple[str, SignatureSet, float]] = []
    shipped, shipped_ms = load(SHIPPED_FP)
    sets.append(("smtpguard.fp", shipped, shipped_ms))
    if P0F_FP.exists():
        p0f, p0f_ms = load(P0F_FP)
        sets.append(("p0f.fp", p0f, p0f_ms))

    print(f"bench_syn: {len(syns)} SYNs in the mix ({len(syns) - 15} captured on loopback), "
          f"{rounds} rounds, {len(syns) * rounds} calls per line")
    # warm up (imports, caches) before measuring
    for _, sigs, _ in sets:
        time_calls(lambda d, s=sigs: classify(d, s), syns, 50)

    med, p99 = summary(time_calls(parse_syn, syns, rounds))
    print(f"  {'parse only':<30} median {med:6.2f} µs   p99 {p99:6.2f} µs")
    medians: dict[str, float] = {}
    for name, sigs, load_ms in sets:
        med, p99 = summary(time_calls(lambda d, s=sigs: classify(d, s), syns, rounds))
        medians[name] = med
        verdict = "within" if med <= TARGET_US else "OVER"
        print(f"  {'parse + classify ' + name:<30} median {med:6.2f} µs   p99 {p99:6.2f} µs   "
              f"({len(sigs)} signatures, loaded in {load_ms:.1f} ms; {verdict} the {TARGET_US:g} µs target)")
    if "p0f.fp" in medians:
        print(f"  {'ratio p0f.fp / smtpguard.fp':<30} {medians['p0f.fp'] / medians['smtpguard.fp']:.2f}x (medians)")
    else:
        print("  p0f.fp: not installed, skipped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
