"""Event-loop stall during a SIGHUP reload of the whole world's zones (issue 11 item 4).

Writes bench_geo's synthetic zone set (~560,000 IPv4 and ~600,000 IPv6
networks over 251 countries; `--quick` a tenth), builds the services from a
config that reads it, then reloads while a ticker task measures how late
the event loop runs it (a 1 ms sleep in a loop: the longest lateness is the
longest stall any session would see). Each reload changes one zone file
first, so the compiled cache misses and the zones are rebuilt (the
expensive case). Side by side:
  * reload as it runs now (Services.reload): a child process compiles the
    zone cache, a thread loads the config and opens the compiled cache, the
    loop swaps them in;
  * the same build on the loop (what a reload did before), for the ratio.
Target: the longest stall <= 50 ms. Measured, not asserted; no network.

    python bench/bench_reload.py [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench.bench_geo import synthesise  # noqa: E402
from smtpguard.config import load  # noqa: E402
from smtpguard.observe import log  # noqa: E402
from smtpguard.services import build_services, open_geo  # noqa: E402

TICK = 0.001
TARGET_MS = 50.0


async def stall_during(work: "asyncio.Future[object] | asyncio.Task[object]") -> tuple[float, float]:
    """(longest lateness of a 1 ms tick in ms, the work's wall time in s) while `work` runs."""
    worst = 0.0
    started = time.perf_counter()
    while not work.done():
        t0 = time.perf_counter()
        await asyncio.sleep(TICK)
        worst = max(worst, time.perf_counter() - t0 - TICK)
    await work
    return worst * 1000, time.perf_counter() - started


def touch(zones: str, n: int) -> None:
    """Change one zone file: the compiled cache's key changes, the next load rebuilds."""
    with open(os.path.join(zones, "ipv4", "us-aggregated.zone"), "a") as fh:
        fh.write(f"198.18.{n % 256}.0/24\n")


async def run(conf: str, zones: str, rounds: int) -> tuple[list[float], list[float], list[float], list[float]]:
    config = load(conf, {})
    services = build_services(config, {})
    threaded, threaded_wall, on_loop, on_loop_wall = [], [], [], []
    for n in range(rounds):
        touch(zones, 2 * n)
        stall, wall = await stall_during(asyncio.ensure_future(services.reload()))
        assert services.geodb.country(f"198.18.{(2 * n) % 256}.1") == "US"   # the changed zone is in
        threaded.append(stall)
        threaded_wall.append(wall)

        touch(zones, 2 * n + 1)

        async def inline() -> None:
            await asyncio.sleep(0)   # let the ticker start, then hold the loop as the old reload did
            open_geo(load(conf, {}))   # config and zones built in the loop's own thread

        stall, wall = await stall_during(asyncio.ensure_future(inline()))
        on_loop.append(stall)
        on_loop_wall.append(wall)
    await services.close()
    return threaded, threaded_wall, on_loop, on_loop_wall


async def idle_floor(seconds: float) -> float:
    """The longest tick lateness with nothing to do: this machine's scheduling noise."""
    stall, _ = await stall_during(asyncio.ensure_future(asyncio.sleep(seconds)))
    return stall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tenth of the zones, 2 rounds")
    args = ap.parse_args()
    scale = 10 if args.quick else 1
    rounds = 2 if args.quick else 3
    log.setup("text", "error")   # the reload's own lines are not the figures
    with tempfile.TemporaryDirectory(prefix="bench-reload-") as root:
        zones = os.path.join(root, "zones")
        synthesise(zones, 560_000 // scale, 600_000 // scale, random.Random(5))
        conf = os.path.join(root, "smtpguard.toml")
        with open(conf, "w") as fh:
            fh.write(f"""
[server]
listen = ["127.0.0.1:0"]
hostname = "mx.example.test"
domains = ["example.test"]
[upstream]
address = "127.0.0.1:1"
[geo]
zones = "{zones}"
cache = "{root}/zones.cache"
allow = ["US"]
""")
        threaded, t_wall, on_loop, l_wall = asyncio.run(run(conf, zones, rounds))
        floor = asyncio.run(idle_floor(statistics.median(t_wall)))
    med_t, med_l = statistics.median(threaded), statistics.median(on_loop)
    print(f"zones: {560_000 // scale} IPv4 + {600_000 // scale} IPv6 networks, rebuilt on each reload, {rounds} rounds")
    print(f"reload (child compiles, thread opens): longest loop stall median {med_t:.1f} ms, max {max(threaded):.1f} ms"
          f" (target <= {TARGET_MS:.0f} ms); reload wall time median {statistics.median(t_wall):.2f} s")
    print(f"build on the loop (before): longest loop stall median {med_l:.1f} ms, max {max(on_loop):.1f} ms;"
          f" wall time median {statistics.median(l_wall):.2f} s")
    print(f"no reload at all, same duration: longest loop stall {floor:.1f} ms (this machine's noise floor;"
          f" os.getloadavg {os.getloadavg()[0]:.1f})")
    print(f"ratio stall thread/on-loop: {med_t / med_l:.3f}" if med_l else "ratio: n/a")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
