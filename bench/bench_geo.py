"""Country table: build, cached open and lookup cost at real-world size.

Writes a synthetic zone set (~560,000 IPv4 and ~600,000 IPv6 networks over
251 countries, as ipdeny's aggregated lists, into a temp dir; `--quick` uses
a tenth) and measures:
  * the first build (parse every line, nest and merge, write the cache),
  * opening with the compiled cache (target <= 1 s),
  * GeoDB.country() per call, IPv4 and IPv6, hit and miss (target <= 5 us),
  * the IPv6 storage choice: two 64-bit halves vs a list of Python ints.
Measured, not asserted. Loopback-free: no network at all.

    python bench/bench_geo.py [--quick]
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import random
import statistics
import sys
import tempfile
import time
from bisect import bisect_right
from dataclasses import dataclass

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from smtpguard.adapters.zones import GeoDB  # noqa: E402
from smtpguard.core.geo import COUNTRY_CODES, deserialise, serialise  # noqa: E402


@dataclass(frozen=True)
class Settings:
    zones: tuple[str, ...]
    mmdb: str = ""
    strict: bool = False
    cache: str = ""


def synthesise(root: str, n4: int, n6: int, rng: random.Random) -> tuple[list[int], list[int], list[int], list[int]]:
    """Write the zone set; return sample hit and miss addresses per family."""
    countries = sorted(COUNTRY_CODES)
    per4: dict[str, list[str]] = {c: [] for c in countries}
    per6: dict[str, list[str]] = {c: [] for c in countries}
    hits4: list[int] = []
    miss4: list[int] = []
    hits6: list[int] = []
    miss6: list[int] = []
    # IPv4: aligned blocks /18../24 (most are /22-/24, as RIR delegations),
    # separated by gaps so that a fraction of the space is listed nowhere.
    cursor = 1 << 24
    prefixes4 = [24] * 5 + [23] * 2 + [22] * 2 + [21, 20, 19, 18]
    for _ in range(n4):
        p = rng.choice(prefixes4)
        size = 1 << (32 - p)
        cursor = (cursor + size - 1) // size * size
        cc = rng.choice(countries)
        per4[cc].append(f"{ipaddress.IPv4Address(cursor)}/{p}")
        if len(hits4) < 20000 and rng.random() < 0.05:
            hits4.append(cursor + rng.randrange(size))
        cursor += size
        gap = rng.choice((0, 0, 256, 1024))
        if gap and len(miss4) < 20000:
            miss4.append(cursor + rng.randrange(gap))
        cursor += gap
    assert cursor < 1 << 32, "IPv4 synthetic set overflowed the address space"
    # IPv6: /29../48 inside 2000::/3.
    cursor = 0x2001 << 112
    prefixes6 = [32] * 4 + [48] * 4 + [29, 36, 40, 44]
    for _ in range(n6):
        p = rng.choice(prefixes6)
        size = 1 << (128 - p)
        cursor = (cursor + size - 1) // size * size
        cc = rng.choice(countries)
        per6[cc].append(f"{ipaddress.IPv6Address(cursor)}/{p}")
        if len(hits6) < 20000 and rng.random() < 0.05:
            hits6.append(cursor + rng.randrange(size))
        cursor += size
        gap = rng.choice((0, 0, 1 << 80, 1 << 96))
        if gap and len(miss6) < 20000:
            miss6.append(cursor + rng.randrange(gap))
        cursor += gap
    os.makedirs(os.path.join(root, "ipv4"))
    os.makedirs(os.path.join(root, "ipv6"))
    for cc in countries:
        with open(os.path.join(root, "ipv4", f"{cc.lower()}-aggregated.zone"), "w") as fh:
            fh.write("\n".join(per4[cc]) + "\n")
        with open(os.path.join(root, "ipv6", f"{cc.lower()}-aggregated.zone"), "w") as fh:
            fh.write("\n".join(per6[cc]) + "\n")
    return hits4, miss4, hits6, miss6


def per_call_us(fn: object, args: list[str], batch: int = 500) -> tuple[float, float]:
    """Median and p99 over batches of the mean cost of one call, in us."""
    call = fn  # type: ignore[assignment]
    samples = []
    for start in range(0, len(args) - batch + 1, batch):
        chunk = args[start:start + batch]
        t0 = time.perf_counter()
        for a in chunk:
            call(a)  # type: ignore[operator]
        samples.append((time.perf_counter() - t0) / batch * 1e6)
    samples.sort()
    return statistics.median(samples), samples[min(len(samples) - 1, int(len(samples) * 0.99))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tenth of the size (< 15 s)")
    args = ap.parse_args()
    scale = 10 if args.quick else 1
    n4, n6 = 560_000 // scale, 600_000 // scale
    rng = random.Random(3)
    with tempfile.TemporaryDirectory(prefix="bench-geo-") as root:
        zones = os.path.join(root, "zones")
        t0 = time.perf_counter()
        hits4, miss4, hits6, miss6 = synthesise(zones, n4, n6, rng)
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(zones) for f in fs)
        print(f"synthetic set: {n4} IPv4 + {n6} IPv6 networks, 251 countries,"
              f" {size / 1e6:.1f} MB of zone text (written in {time.perf_counter() - t0:.1f} s)")

        settings = Settings(zones=(zones,))
        t0 = time.perf_counter()
        db = GeoDB.open(settings)
        build = time.perf_counter() - t0
        assert db.stats.cache == "rebuilt", db.stats.cache
        cache_size = os.path.getsize(db.stats.cache_path)
        print(f"first build:   {build:.2f} s -> {db.stats.ranges4} + {db.stats.ranges6} ranges,"
              f" cache {cache_size / 1e6:.1f} MB")

        opens = []
        for _ in range(5):
            t0 = time.perf_counter()
            cached = GeoDB.open(settings)
            opens.append(time.perf_counter() - t0)
            assert cached.stats.cache == "hit", cached.stats.cache
        print(f"cached open:   median {statistics.median(opens) * 1000:.0f} ms,"
              f" max {max(opens) * 1000:.0f} ms (target <= 1000 ms; includes hashing"
              f" {size / 1e6:.0f} MB of zone text for the key)")

        rng.shuffle(hits4)
        rng.shuffle(miss4)
        cases = [
            ("IPv4 hit ", [str(ipaddress.IPv4Address(n)) for n in hits4]),
            ("IPv4 miss", [str(ipaddress.IPv4Address(n)) for n in miss4]),
            ("IPv6 hit ", [str(ipaddress.IPv6Address(n)) for n in hits6]),
            ("IPv6 miss", [str(ipaddress.IPv6Address(n)) for n in miss6]),
        ]
        for name, ips in cases:
            expect_hit = "hit" in name
            sample = [cached.country(ip) for ip in ips[:200]]
            assert all((len(c) == 2) == expect_hit for c in sample), (name, sample[:5])
            med, p99 = per_call_us(cached.country, ips)
            print(f"{name} lookup: median {med:.2f} us, p99 {p99:.2f} us"
                  f" (GeoDB.country on text, cached table; target <= 5 us)")

        # IPv6 storage: the chosen two-halves arrays vs a list of 128-bit ints.
        table = cached.table
        firsts = [(h << 64) | lo for h, lo in zip(table.v6_first_hi, table.v6_first_lo)]
        t0 = time.perf_counter()
        blob = b"".join(x.to_bytes(16, "big") for x in firsts)
        back = [int.from_bytes(blob[i:i + 16], "big") for i in range(0, len(blob), 16)]
        list_load = time.perf_counter() - t0
        list_bytes = sys.getsizeof(back) + sum(sys.getsizeof(x) for x in back)
        halves_bytes = 2 * 8 * len(firsts)
        raw = serialise(table, b"k")
        t0 = time.perf_counter()
        deserialise(raw)
        halves_load = time.perf_counter() - t0
        probe = hits6[:5000]
        t0 = time.perf_counter()
        for n in probe:
            bisect_right(back, n)
        list_us = (time.perf_counter() - t0) / len(probe) * 1e6
        t0 = time.perf_counter()
        for n in probe:
            table.lookup(n, 6)
        halves_us = (time.perf_counter() - t0) / len(probe) * 1e6
        print(f"IPv6 starts:   two 64-bit halves {halves_bytes / 1e6:.1f} MB, whole-cache load"
              f" {halves_load * 1000:.0f} ms, lookup {halves_us:.2f} us | list of ints"
              f" {list_bytes / 1e6:.1f} MB, load {list_load * 1000:.0f} ms, bisect alone {list_us:.2f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
