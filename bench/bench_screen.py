"""The screen's costs (issue 10), side by side in one run, printed, never asserted.

1. Refusals: sessions/s and server CPU per 1,000 refused sessions for a bare
   aiosmtpd answering 554 in its banner (written here, the baseline),
   smtpguard refusing at connect (`reject_at = "connect"`: 554, the client
   QUITs, 221), a `drop` rule (521, closed), and a limit (421 [BUSY]).
   One load generator (a separate process, asyncio, 20 connections at a
   time from 127.0.0.2-127.0.0.251), alternating rounds, medians.
2. Memory: 2,000 connections held in the pregreet wait (after `220-`),
   RSS per connection; beside it 2,000 sessions after the banner with the
   wait off, and the bare aiosmtpd after its banner.
3. A flood: smtp-source relays through smtpguard to smtp-sink (10 sessions)
   alone, then while early talkers, over-limit clients and garbage come from
   other 127.0.0.0/8 addresses: good messages delivered (smtp-sink's count)
   and the good rate, side by side. Bounded in count and time, loopback only.

`--profile` prints the top of a cProfile of smtpguard refusing sessions at
connect (in-process, one server, the same load generator).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import cpu_seconds, free_port, rss_kib, wait_port  # noqa: E402
from common import guard_config as common_guard_config  # noqa: E402
ROOT = HERE.parent










# --- the load generator and the holder (run as subprocesses) -------------------------

async def one_session(port: int, source: str, greet_timeout: float) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        while True:
            line = await asyncio.wait_for(reader.readline(), greet_timeout)
            if not line:
                return "eof"
            if line[3:4] != b"-":
                break
        code = line[:3].decode("ascii", "replace")
        if code in ("554", "220"):
            writer.write(b"QUIT\r\n")
            await writer.drain()
            await asyncio.wait_for(reader.readline(), greet_timeout)
        return code
    finally:
        writer.close()


async def load(port: int, total: int, concurrency: int) -> dict[str, Any]:
    counts: dict[str, int] = {}
    sem = asyncio.Semaphore(concurrency)
    n = 0

    async def run(i: int) -> None:
        async with sem:
            try:
                code = await one_session(port, f"127.0.0.{2 + i % 250}", 10.0)
            except (OSError, asyncio.TimeoutError) as e:
                code = type(e).__name__
            counts[code] = counts.get(code, 0) + 1

    start = time.perf_counter()
    # bounded: `total` sessions, each within its own timeout
    await asyncio.gather(*(run(i) for i in range(total)))
    n = total
    return {"seconds": time.perf_counter() - start, "sessions": n, "codes": counts}


async def hold(port: int, total: int) -> None:
    """Open `total` connections, read the first greeting line of each, say ready, wait for stdin."""
    conns = []
    for i in range(total):
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(f"127.0.0.{2 + i % 250}", 0))
        conns.append((reader, writer))
    for reader, _ in conns:
        await asyncio.wait_for(reader.readline(), 30)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for _, writer in conns:
        writer.close()


async def flood(port: int, rate: int) -> dict[str, int]:
    """Early talkers, over-limit clients and garbage from 127.0.0.2-127.0.0.251,
    about `rate` connections a second, until stdin closes (at most 5 minutes)."""
    done = {"early": 0, "overlimit": 0, "garbage": 0, "errors": 0}
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + 300
    stop = loop.run_in_executor(None, sys.stdin.read)

    async def early(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(f"127.0.0.{2 + i % 200}", 0))
        writer.write(b"EHLO bot.example\r\nMAIL FROM:<spam@bot.example>\r\n")
        await asyncio.wait_for(reader.read(), 10)
        writer.close()
        done["early"] += 1

    async def overlimit(i: int) -> None:
        # 30 at once from one address: past per_ip_sessions (20)
        src = f"127.0.0.{202 + i % 40}"
        conns = [await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0)) for _ in range(30)]
        for _, w in conns:
            w.close()
        done["overlimit"] += 1

    async def garbage(i: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(f"127.0.0.{245 + i % 6}", 0))
        writer.write(os.urandom(512))
        writer.close()
        done["garbage"] += 1

    async def worker(kind: Any, i0: int, per_second: float) -> None:
        i = i0
        next_at = time.monotonic()
        while time.monotonic() < deadline and not stop.done():
            try:
                await kind(i)
            except (OSError, asyncio.TimeoutError):
                done["errors"] += 1
            i += 1
            next_at += 1 / per_second
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))  # pacing the flood's rate

    # 45 % early talkers, 45 % garbage, 10 % over-limit bursts of 30 connections
    each = rate * 0.45 / 8
    await asyncio.gather(*(worker(k, j, each) for k in (early, garbage) for j in range(8)),
                         *(worker(overlimit, j, rate * 0.10 / 30 / 2) for j in range(2)))
    return done


# --- the bare aiosmtpd baseline -----------------------------------------------------

def bare_server(port: int) -> None:
    """aiosmtpd with nothing added, its banner a 554 (what a bare refusal costs)."""
    from aiosmtpd.smtp import SMTP

    class Bare(SMTP):
        async def push(self, status: str) -> None:
            if status.startswith("220 "):
                status = "554 5.7.1 refused"
            await super().push(status)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        srv = await loop.create_server(lambda: Bare(object(), hostname="bare.test"), "127.0.0.1", port)
        await srv.serve_forever()

    asyncio.run(main())


# --- smtpguard ----------------------------------------------------------------------

def guard_config(tmp: str, name: str, port: int, upstream: int, extra: str) -> Path:
    return common_guard_config(Path(tmp) / f"{name}.toml", port, upstream, f"""
[state]
url = "memory://"
[log]
level = "info"
format = "json"
{extra}""")


def start_guard(conf: Path) -> "subprocess.Popen[bytes]":
    return subprocess.Popen([sys.executable, "-m", "smtpguard", "serve", "--config", str(conf)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_self(*args: str, **kw: Any) -> "subprocess.Popen[bytes]":
    return subprocess.Popen([sys.executable, __file__, *args], cwd=ROOT, **kw)


REFUSE_CONNECT = """
[pregreet]
wait = "0s"
[limits]
per_ip_sessions = 0
[policy]
reject_at = "connect"
[[rule]]
name = "refuse-loopback"
stage = "connect"
when = { ip_in = ["127.0.0.0/8"] }
action = "reject"
"""
DROP = """
[pregreet]
wait = "0s"
[limits]
per_ip_sessions = 0
[[rule]]
name = "drop-loopback"
stage = "connect"
when = { ip_in = ["127.0.0.0/8"] }
action = "drop"
"""
LIMIT = """
[pregreet]
wait = "0s"
[limits]
max_sessions = 1
"""


def run_load(port: int, total: int, concurrency: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, __file__, "--load", str(port), str(total), str(concurrency)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=True).stdout
    return json.loads(out)  # type: ignore[no-any-return]


def refusals(args: argparse.Namespace, tmp: str) -> None:
    upstream = free_port()  # nothing listens there: no session gets that far
    servers: dict[str, tuple[int, subprocess.Popen[bytes]]] = {}
    port = free_port()
    servers["bare aiosmtpd, 554 banner"] = (port, start_self("--bare", str(port)))
    for label, extra in (("smtpguard, reject at connect (554)", REFUSE_CONNECT),
                         ("smtpguard, drop (521)", DROP),
                         ("smtpguard, limit (421 [BUSY])", LIMIT)):
        port = free_port()
        servers[label] = (port, start_guard(guard_config(tmp, label.split(",")[1].split()[0], port, upstream, extra)))
    holder = None
    try:
        for port, _ in servers.values():
            wait_port(port)
        # the limit server: one held session fills max_sessions = 1
        limit_port = servers["smtpguard, limit (421 [BUSY])"][0]
        holder = socket.create_connection(("127.0.0.1", limit_port))
        holder.recv(100)
        for port, _ in servers.values():
            run_load(port, 200, args.concurrency)  # warm-up
        rates: dict[str, list[float]] = {k: [] for k in servers}
        cpu: dict[str, list[float]] = {k: [] for k in servers}
        codes: dict[str, dict[str, int]] = {}
        for _ in range(args.rounds):
            for label, (port, proc) in servers.items():
                before = cpu_seconds(proc.pid)
                r = run_load(port, args.sessions, args.concurrency)
                cpu[label].append((cpu_seconds(proc.pid) - before) / r["sessions"] * 1000)
                rates[label].append(r["sessions"] / r["seconds"])
                codes[label] = r["codes"]
    finally:
        if holder is not None:
            holder.close()
        for _, proc in servers.values():
            proc.terminate()
        for _, proc in servers.values():
            proc.wait(30)
    base_rate = statistics.median(rates["bare aiosmtpd, 554 banner"])
    base_cpu = statistics.median(cpu["bare aiosmtpd, 554 banner"])
    print(f"refusals: {args.sessions} sessions per round, {args.concurrency} at a time, {args.rounds} alternating "
          "rounds (medians); server CPU per 1,000 refusals")
    print(f"  {'system':<38} {'sessions/s':>10} {'CPU s/1000':>10} {'rate ratio':>10} {'CPU ratio':>10}   replies")
    for label in servers:
        r, c = statistics.median(rates[label]), statistics.median(cpu[label])
        print(f"  {label:<38} {r:10.0f} {c:10.3f} {r / base_rate:10.2f} {c / base_cpu:10.2f}   {codes[label]}")


def memory(args: argparse.Namespace, tmp: str) -> None:
    upstream = free_port()
    n = args.held
    cases = {
        "smtpguard, in the pregreet wait (after 220-)": """
[pregreet]
wait = "5m"
[limits]
per_ip_sessions = 0
max_sessions = 0
""",
        "smtpguard, wait off, sessions after 220": """
[pregreet]
wait = "0s"
[limits]
per_ip_sessions = 0
max_sessions = 0
""",
    }
    print(f"memory: {n} connections held, RSS growth per connection")
    for label, extra in [*cases.items(), ("bare aiosmtpd, after its banner", None)]:
        port = free_port()
        if extra is None:
            proc = start_self("--bare", str(port))
        else:
            proc = start_guard(guard_config(tmp, "mem", port, upstream, extra))
        try:
            wait_port(port)
            run_load(port, 50, 10)   # warm-up: the code paths are loaded
            time.sleep(0.5)          # let closed sessions finish (a measurement pause, not synchronisation)
            before = rss_kib(proc.pid)
            h = start_self("--hold", str(port), str(n), stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            assert h.stdout is not None and h.stdin is not None
            ready = h.stdout.readline().strip() == b"ready"
            after = rss_kib(proc.pid)
            h.stdin.close()
            h.wait(60)
            if not ready:
                print(f"  {label:<48} the holder did not get {n} greetings")
                continue
            print(f"  {label:<48} {(after - before) / n:6.1f} KiB per connection "
                  f"({before / 1024:.1f} -> {after / 1024:.1f} MiB)")
        finally:
            proc.terminate()
            proc.wait(30)


def flood_test(args: argparse.Namespace, tmp: str) -> None:
    sink_bin = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
    source_bin = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
    if not (os.path.exists(sink_bin) and os.path.exists(source_bin)):
        print("flood: skipped (smtp-sink/smtp-source from the postfix package are missing)")
        return
    sink_port, port = free_port(), free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    # smtp-sink's running counters go to a file: a pipe nobody reads would
    # fill and stall it
    counts = open(Path(tmp) / "sink-counters", "w+b")
    sink = subprocess.Popen([sink_bin, *user, "-c", f"127.0.0.1:{sink_port}", "256"],
                            stdout=counts, stderr=subprocess.DEVNULL)
    guard = start_guard(guard_config(tmp, "flood", port, sink_port, """
[pregreet]
wait = "1s"
[[rule]]
name = "pregreet-drop"
stage = "connect"
when = { pregreet = true }
action = "drop"
reason = "PREGREET"
"""))
    messages, sessions = args.flood_messages, 10

    errors: list[str] = []

    def send() -> float:
        start = time.perf_counter()
        r = subprocess.run([source_bin, "-l", "1024", "-m", str(messages), "-s", str(sessions),
                            "-f", "good@sender.test", "-t", "postmaster@example.test", f"127.0.0.1:{port}"],
                           capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            errors.append(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}")
        return messages / (time.perf_counter() - start)

    try:
        wait_port(sink_port)
        wait_port(port)
        send()  # warm-up; 127.0.0.1 passes the pregreet test once
        alone, flooded, floods = [], [], []
        cpu_alone, cpu_flood = [], []  # smtpguard's CPU share of one core during each run
        for _ in range(args.rounds):
            c0, t0 = cpu_seconds(guard.pid), time.perf_counter()
            alone.append(send())
            cpu_alone.append((cpu_seconds(guard.pid) - c0) / (time.perf_counter() - t0))
            f = start_self("--flood", str(port), str(args.flood_rate), stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE)
            try:
                time.sleep(1.0)  # let the flood build up (a load ramp, not synchronisation)
                c0, t0 = cpu_seconds(guard.pid), time.perf_counter()
                flooded.append(send())
                cpu_flood.append((cpu_seconds(guard.pid) - c0) / (time.perf_counter() - t0))
            finally:
                out, _ = f.communicate(b"", timeout=60)
            floods.append(out.decode().strip())
        alive = guard.poll() is None
    finally:
        guard.terminate()
        guard.wait(30)
        sink.terminate()
        sink.wait(10)
        counts.seek(0)
        out_bytes = counts.read()
        counts.close()
    counters = out_bytes.decode("ascii", "replace").replace("\r", "\n").split()
    delivered = max((int(w[5:]) for w in counters if w.startswith("mesg=")), default=0)
    sent = messages * (1 + 2 * args.rounds)
    a, fl = statistics.median(alone), statistics.median(flooded)
    print(f"flood: smtp-source ({sessions} sessions, {messages} x 1 KB per run) -> smtpguard -> smtp-sink, "
          f"{args.rounds} rounds alone / under flood (medians)")
    print(f"  good rate alone {a:7.0f} msg/s   under flood {fl:7.0f} msg/s   drop {100 * (1 - fl / a):5.1f} %")
    print(f"  smtpguard's CPU (share of one core) alone {statistics.median(cpu_alone):4.2f}, "
          f"under flood {statistics.median(cpu_flood):4.2f}; the load generators share the same 2 cores")
    print(f"  good messages sent {sent}, delivered {delivered} ({'every one once' if delivered == sent else 'MISMATCH'});"
          f" smtpguard {'stayed up' if alive else 'DIED'}")
    if errors:
        print(f"  smtp-source reported errors: {errors[:3]}")
    print(f"  flood at about {args.flood_rate} connections/s; clients sent in the last round: "
          f"{floods[-1] if floods else '-'}")


def profile(args: argparse.Namespace) -> None:
    """cProfile of smtpguard refusing at connect, in this process."""
    import cProfile
    import pstats
    import threading

    sys.path.insert(0, str(ROOT))
    from smtpguard import config as cfg
    from smtpguard.server import Server
    from smtpguard.services import build_services

    import tomllib
    doc = tomllib.loads(REFUSE_CONNECT)
    port = free_port()
    config = cfg.build(doc, {"listen": [f"127.0.0.1:{port}"], "upstream": f"127.0.0.1:{free_port()}",
                             "domain": ["example.test"], "hostname": "mx.example.test", "log_level": "warning"})
    loop = asyncio.new_event_loop()
    services = build_services(config)
    server = Server(config, services)
    loop.run_until_complete(server.start())
    t = threading.Thread(target=loop.run_forever, daemon=True)
    prof = cProfile.Profile()

    def run() -> None:
        prof.enable()
        loop.run_forever()
    t = threading.Thread(target=run, daemon=True)
    t.start()
    run_load(port, args.sessions, args.concurrency)
    loop.call_soon_threadsafe(loop.stop)
    t.join(10)
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(15)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--held", type=int, default=2000)
    ap.add_argument("--flood-messages", type=int, default=1000)
    ap.add_argument("--flood-rate", type=int, default=200, help="flood connections per second")
    ap.add_argument("--quick", action="store_true", help="fewer sessions and rounds")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of refusals at connect")
    ap.add_argument("--load", nargs=3, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--hold", nargs=2, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--flood", nargs=2, type=int, help=argparse.SUPPRESS)
    ap.add_argument("--bare", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.load:
        print(json.dumps(asyncio.run(load(*args.load))))
        return
    if args.hold:
        asyncio.run(hold(*args.hold))
        return
    if args.flood:
        print(json.dumps(asyncio.run(flood(*args.flood))))
        return
    if args.bare:
        bare_server(args.bare)
        return
    if args.quick:
        args.sessions, args.rounds, args.held, args.flood_messages = 1000, 1, 1000, 300
    if args.profile:
        profile(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        refusals(args, tmp)
        memory(args, tmp)
        flood_test(args, tmp)


if __name__ == "__main__":
    main()
