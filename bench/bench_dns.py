"""DNS facts for many connections: lookups/s, added latency, stage cost.

A loopback DNS server (tests/fixtures_dns.py) runs in a child process, so
that its Python work does not share our event loop or GIL, serving, for N
distinct client addresses in 198.18.0.0/15 (RFC 2544 benchmark space):
PTR -> h<i>.bench.test, A of that name -> the address, and two DNS lists
(bl1.test lists one address in 10, bl2.test one in 25). Each connection
runs what the connect stage asks: PTR then the forward A of the PTR name,
concurrently with both DNS lists (sources/dnsbl.py), under one deadline.
Measured, not asserted:

  * cold cache, then warm (the same addresses again): lookups/s and the
    per-connection added latency (median, p99) with C connections at once,
    and one at a time (latency without queueing);
  * a stage's cost is its slowest lookup, not the sum: with PTR and both
    lists answering 100 ms late, concurrent vs the same lookups one by one;
  * a list slower than the stage budget costs the budget, not its delay.

    python bench/bench_dns.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import multiprocessing
import os
import statistics
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from smtpguard.adapters.dns import Answer, Resolver, within  # noqa: E402
from smtpguard.core.dnsbl import DnsblList, query_name  # noqa: E402
from smtpguard.sources import dnsbl  # noqa: E402

BASE = int(ipaddress.IPv4Address("198.18.0.0"))
LISTS = [DnsblList("bl1.test", 3), DnsblList("bl2.test", 2)]
SLOW_LISTS = [DnsblList("slow1.test", 3), DnsblList("slow2.test", 2)]


def client_ip(i: int) -> str:
    return str(ipaddress.IPv4Address(BASE + i))


def serve(n: int, conn: Connection) -> None:
    """The child: a DnsServer with N clients' records, driven by messages."""
    from tests.fixtures_dns import DnsServer

    server = DnsServer("127.0.0.1", negative_ttl=300)
    for i in range(n):
        ip = client_ip(i)
        server.set_ptr(ip, [f"h{i}.bench.test."], ttl=3600)
        server.set(f"h{i}.bench.test", "A", [ip], ttl=3600)
        if i % 10 == 0:
            server.set(query_name(ip, "bl1.test"), "A", ["127.0.0.2"], ttl=900)
        if i % 25 == 0:
            server.set(query_name(ip, "bl2.test"), "A", ["127.0.0.4"], ttl=900)
    server.set("*.slow1.test", "A", ["127.0.0.2"])
    server.set("*.slow2.test", "A", ["127.0.0.2"])
    server.start()
    conn.send(server.address)
    while True:
        message = conn.recv()
        if message[0] == "delay":
            server.delay(message[1], message[2])
            conn.send("ok")
        elif message[0] == "count":
            conn.send(server.total_queries())
        else:
            server.stop()
            conn.send("stopped")
            return


async def connect_stage(r: Resolver, ip: str, lists: list[DnsblList], budget: float) -> float:
    """What the connect stage asks for one client; returns seconds taken."""
    start = time.perf_counter()

    async def rdns() -> Answer:
        ptr = await r.ptr(ip)
        if not ptr.ok:
            return ptr
        return await r.query(ptr.values[0], "A")

    await within(budget, {"rdns": rdns(), "dnsbl": dnsbl.gather(ip, lists, r, budget)},
                 lambda _k: None)
    return time.perf_counter() - start


async def sequential_stage(r: Resolver, ip: str, lists: list[DnsblList]) -> float:
    """The same lookups one after another (what the concurrency saves)."""
    start = time.perf_counter()
    ptr = await r.ptr(ip)
    if ptr.ok:
        await r.query(ptr.values[0], "A")
    for entry in lists:
        await r.query(query_name(ip, entry.zone), "A")
    return time.perf_counter() - start


async def run_many(n: int, concurrency: int, one: Any) -> tuple[list[float], float]:
    gate = asyncio.Semaphore(concurrency)

    async def guarded(i: int) -> float:
        async with gate:
            return float(await one(client_ip(i)))

    start = time.perf_counter()
    times = await asyncio.gather(*(guarded(i) for i in range(n)))
    return list(times), time.perf_counter() - start


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:7.2f} ms"


async def bench(address: str, ask: Any, n: int, concurrency: int) -> None:
    print(f"{n} connections from distinct addresses; each: PTR -> A of the name, "
          "2 DNS lists, concurrently")
    r = Resolver([address], timeout=5.0)
    for phase in ("cold", "warm"):
        before = r.stats()
        times, wall = await run_many(n, concurrency, lambda ip: connect_stage(r, ip, LISTS, 10.0))
        after = r.stats()
        lookups = after.lookups - before.lookups
        sent = after.queries - before.queries
        print(f"  {phase}, {concurrency} at once: {lookups / wall:6.0f} lookups/s ({sent} sent, "
              f"{after.cache_hits - before.cache_hits} cache hits) | per connection "
              f"median {ms(statistics.median(times))}, p99 {ms(pct(times, 99))} | wall {wall:.2f} s")
    m = min(n, 200)
    r1 = Resolver([address], timeout=5.0)
    for phase in ("cold", "warm"):
        times, _ = await run_many(m, 1, lambda ip: connect_stage(r1, ip, LISTS, 10.0))
        print(f"  {phase}, one at a time ({m}): added latency per connection "
              f"median {ms(statistics.median(times))}, p99 {ms(pct(times, 99))}")

    delay, conc = 0.100, 10
    m = min(n, 100)
    base_r = Resolver([address], timeout=5.0)
    base, _ = await run_many(m, conc, lambda ip: connect_stage(base_r, ip, SLOW_LISTS, 10.0))
    for name in ("*.arpa", "*.slow1.test", "*.slow2.test"):
        ask(("delay", name, delay))
    conc_r = Resolver([address], timeout=5.0)
    together, _ = await run_many(m, conc, lambda ip: connect_stage(conc_r, ip, SLOW_LISTS, 10.0))
    seq_r = Resolver([address], timeout=5.0)
    seq, _ = await run_many(m, conc, lambda ip: sequential_stage(seq_r, ip, SLOW_LISTS))
    print(f"stage cost, PTR and both lists {delay * 1000:.0f} ms late ({m} connections, {conc} at once, cold):")
    print(f"  no delay:           median {ms(statistics.median(base))}")
    print(f"  concurrent (ours):  median {ms(statistics.median(together))}, p99 {ms(pct(together, 99))}")
    print(f"  one after another:  median {ms(statistics.median(seq))}, p99 {ms(pct(seq, 99))}"
          f"  -> ratio {statistics.median(together) / statistics.median(seq):.2f} (slowest, not the sum)")
    ask(("delay", "*.arpa", 0))
    ask(("delay", "*.slow1.test", 0))
    ask(("delay", "*.slow2.test", 1.0))
    budget = 0.200
    cut_r = Resolver([address], timeout=5.0)
    cut, _ = await run_many(m, conc, lambda ip: connect_stage(cut_r, ip, SLOW_LISTS, budget))
    print(f"one list 1000 ms late, stage budget {budget * 1000:.0f} ms: "
          f"median {ms(statistics.median(cut))}, max {ms(max(cut))} (the budget, not the delay)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 connections instead of 1000 (< 15 s)")
    args = parser.parse_args()
    n, concurrency = (200, 50) if args.quick else (1000, 100)

    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=serve, args=(n, child), daemon=True)
    proc.start()
    try:
        if not parent.poll(30):
            print("the DNS server did not start", file=sys.stderr)
            return 1
        address = parent.recv()

        def ask(message: tuple[Any, ...]) -> Any:
            parent.send(message)
            return parent.recv()

        started = time.perf_counter()
        asyncio.run(bench(address, ask, n, concurrency))
        print(f"server answered {ask(('count',))} queries; total {time.perf_counter() - started:.1f} s")
        ask(("stop",))
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
