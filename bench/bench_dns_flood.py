"""A flood of clients with hostile DNS answers vs a bystander's session time
(issue 19 item 1).

Hostile clients (16 by default, from 127.0.0.2, 127.0.0.3, ...) own their
reverse zones and the zones of the names they send in EHLO: each PTR gives 10
names and every name they use is a CNAME to a 4,090-record A RRset (about
65 KB, over TCP after a truncated UDP answer), all with TTL 0 so that no
answer is cached. Each hostile connection sends EHLO after EHLO until
smtpguard stops answering 250, then reconnects.
Meanwhile a bystander (127.0.0.1, an ordinary PTR and HELO name) runs whole
sessions (EHLO, MAIL, RCPT, DATA, QUIT) one after another.

The hostile clients and their DNS server run at niceness 10 (they stand for
other people's machines; on a small shared host their own CPU would
otherwise count as smtpguard's slowness). Rounds alternate quiet (no flood)
and flood phases; the report gives the
bystander's median session time in each, their ratio (the issue's target:
within 2x), smtpguard's CPU seconds during the flood and its resident memory
at the end (the DNS cache of the hostile answers shows there).

`--root DIR` runs the smtpguard of another checkout (a `git worktree` of the
commit before a change), so before and after can be measured side by side on
the same machine. Loopback only; every phase and socket is bounded in time.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tests.fixtures_dns import DnsServer  # noqa: E402
sys.path.insert(0, str(HERE))
from common import cpu_seconds, free_port, tool, wait_port  # noqa: E402

HUGE = 4090            # A records in the hostile RRset (~65 KB: the TCP maximum)
PTR_NAMES = 10         # names in each hostile PTR
NAMES = 200            # distinct EHLO names the hostile clients cycle through
# The hostile clients and their DNS server run at this niceness: on a small
# shared machine their own CPU would otherwise be measured as smtpguard's
# slowness (they stand for other people's machines).
NICE = 10


class FloodDns(DnsServer):
    """The test DNS server, answering a query it has answered before from the
    bytes it sent then (with the new query's ID, the header's first two
    bytes, RFC 1035 §4.1.1), and building the big RRset once: rendering
    4,090 records costs the server about 45 ms and building them from text
    0.5 s, and the flood must load smtpguard, not the bench's DNS server."""

    _wires: dict[tuple[bytes, str], tuple[bytes | None, float]] = {}
    _built: dict[tuple[str, str], Any] = {}

    def _add(self, section: list[Any], name: str, rtype: str, found: tuple[tuple[str, ...], int]) -> None:
        """The big RRset is built from its 4,090 texts once (about 0.5 s), not
        for every name that is a CNAME to it."""
        if len(found[0]) < 100:
            super()._add(section, name, rtype, found)
            return
        if (name, rtype) not in self._built:
            scratch: list[Any] = []
            super()._add(scratch, name, rtype, found)
            self._built[(name, rtype)] = scratch[0]
        section.append(self._built[(name, rtype)])

    def _respond(self, wire: bytes, transport: str) -> tuple[bytes | None, float]:
        key = (wire[2:], transport)
        hit = self._wires.get(key)
        if hit is None:
            hit = super()._respond(wire, transport)
            if len(self._wires) < 10_000:
                self._wires[key] = hit
        answer, delay = hit
        return (None if answer is None else wire[:2] + answer[2:]), delay


def serve_dns(conn: Any, hostile_ips: list[str]) -> None:
    """The DNS server in a process of its own, at a lower priority: its CPU
    stands for the attackers' own name servers, not for ours."""
    os.nice(NICE)
    server = FloodDns("127.0.0.1")
    # TTL 0: a hostile zone can forbid caching, so that every use of a name
    # is a fresh 65 KB answer (a cached one would cost nothing the second time).
    server.huge("big.hostile.t", "A", HUGE, ttl=0)
    server.set("*.hostile.t", "CNAME", ["big.hostile.t."], ttl=0)
    for ip in hostile_ips:
        tag = ip.replace(".", "-")
        server.set_ptr(ip, [f"p{k}-{tag}.hostile.t." for k in range(PTR_NAMES)], ttl=0)
    server.set_ptr("127.0.0.1", ["bystander.good.t."])
    server.set("bystander.good.t", "A", ["127.0.0.1"])
    server.start()
    conn.send(server.address)
    conn.recv()  # until told to stop
    server.stop()










def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Hostile(threading.Thread):
    """One hostile client: EHLO with fresh names, reconnecting when refused."""

    counter = 0
    lock = threading.Lock()

    def __init__(self, ip: str, port: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.ip, self.port, self.stop_event = ip, port, stop
        self.ehlos = 0

    def fresh_name(self) -> str:
        """The next of NAMES names (TTL 0, so each use is a fresh answer; a
        finite set lets the bench's DNS server answer from its memory)."""
        with Hostile.lock:
            Hostile.counter += 1
            return f"e{Hostile.counter % NAMES}.hostile.t"

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=30,
                                              source_address=(self.ip, 0)) as sock:
                    f = sock.makefile("rb")
                    line = f.readline()
                    while line[3:4] == b"-":  # a multi-line banner: wait for its end
                        line = f.readline()
                    if not line.startswith(b"220"):
                        continue
                    while not self.stop_event.is_set():
                        sock.sendall(f"EHLO {self.fresh_name()}\r\n".encode())
                        line = f.readline()
                        while line[3:4] == b"-":
                            line = f.readline()
                        if not line.startswith(b"250"):
                            break
                        self.ehlos += 1
            except OSError:
                if not self.stop_event.wait(0.05):  # back-off after a dropped connection
                    continue


def run_hostile(port: int, ips: list[str], stop: Any, answered: Any) -> None:
    """The hostile clients, threads of one lower-priority process."""
    os.nice(NICE)
    local = threading.Event()
    clients = [Hostile(ip, port, local) for ip in ips]
    for c in clients:
        c.start()
    stop.wait(600)
    local.set()
    for c in clients:
        c.join(60)
    answered.value = sum(c.ehlos for c in clients)


def bystander(port: int) -> float:
    """Seconds for one whole session of an ordinary client."""
    start = time.perf_counter()
    with smtplib.SMTP("127.0.0.1", port, local_hostname="bystander.good.t", timeout=60,
                      source_address=("127.0.0.1", 0)) as s:
        s.sendmail("a@good.t", ["postmaster@example.test"], b"Subject: hi\r\n\r\nhello\r\n")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=16, help="hostile clients (the issue's 16)")
    ap.add_argument("--sessions", type=int, default=15, help="bystander sessions per phase")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ramp", type=float, default=3.0, help="seconds of flood before the bystander starts")
    ap.add_argument("--root", default=str(ROOT), help="the smtpguard checkout to run (default: this one)")
    ap.add_argument("--quick", action="store_true", help="8 clients, 8 sessions, 2 rounds")
    args = ap.parse_args()
    if args.quick:
        args.clients, args.sessions, args.rounds = 8, 8, 2

    hostile_ips = [f"127.0.0.{2 + i}" for i in range(args.clients)]
    parent, child = multiprocessing.Pipe()
    dns_proc = multiprocessing.Process(target=serve_dns, args=(child, hostile_ips), daemon=True)
    dns_proc.start()
    if not parent.poll(30):
        raise SystemExit("bench_dns_flood: the DNS server did not start")
    dns_address = parent.recv()

    sink_port, port = free_port(), free_port()
    user = ["-u", "nobody"] if os.geteuid() == 0 else []
    sink = subprocess.Popen([tool("smtp-sink"), *user, "-c", f"127.0.0.1:{sink_port}", "256"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    quiet: list[float] = []
    flood: list[float] = []
    cpu: list[float] = []
    ehlos = 0
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "flood.toml"
        # Rules that read rdns and the helo facts, so both sources run; they
        # only observe ("continue"), so every session is relayed.
        conf.write_text(f"""
[server]
listen = ["127.0.0.1:{port}"]
hostname = "mx.example.test"
domains = ["example.test"]
[upstream]
address = "127.0.0.1:{sink_port}"
[dns]
servers = ["{dns_address}"]
[state]
url = "memory://"
[pregreet]
wait = "0s"
[limits]
per_ip_sessions = 0
[log]
level = "error"
[[rule]]
name = "rdns-seen"
stage = "connect"
when = {{ rdns = "none" }}
action = "continue"
[[rule]]
name = "helo-seen"
stage = "helo"
when = {{ helo_matches_ip = false }}
action = "continue"
""")
        env = dict(os.environ, PYTHONPATH=args.root)
        guard = subprocess.Popen([sys.executable, "-m", "smtpguard", "serve", "--config", str(conf)],
                                 cwd=args.root, env=env, stderr=subprocess.DEVNULL)
        try:
            wait_port(sink_port)
            wait_port(port)
            for _ in range(3):
                bystander(port)  # warm-up: imports, caches, pool
            for _ in range(args.rounds):
                for _ in range(args.sessions):
                    quiet.append(bystander(port))
                    time.sleep(0.2)
                stop = multiprocessing.Event()
                answered = multiprocessing.Value("i", 0)
                flood_proc = multiprocessing.Process(target=run_hostile, args=(port, hostile_ips, stop, answered),
                                                     daemon=True)
                before = cpu_seconds(guard.pid)
                started = time.monotonic()
                flood_proc.start()
                time.sleep(args.ramp)  # let the flood build up (a load ramp, not synchronisation)
                for _ in range(args.sessions):
                    flood.append(bystander(port))
                    time.sleep(0.2)  # spread the bystander's sessions over the flood
                stop.set()
                flood_proc.join(90)
                cpu.append((cpu_seconds(guard.pid) - before) / (time.monotonic() - started))
                ehlos += answered.value
            rss = rss_mib(guard.pid)
        finally:
            guard.terminate()
            sink.terminate()
            guard.wait(30)
            sink.wait(10)
            parent.send("stop")
            dns_proc.join(15)
    q, fl = statistics.median(quiet), statistics.median(flood)
    print(f"dns flood: {args.clients} hostile clients (PTR of {PTR_NAMES} names, EHLO names with "
          f"{HUGE}-record answers), bystander sessions {args.sessions} x {args.rounds} rounds per phase; "
          f"smtpguard from {args.root}")
    print(f"  bystander session, quiet   {q * 1000:8.1f} ms median")
    print(f"  bystander session, flood   {fl * 1000:8.1f} ms median   ratio {fl / q:6.2f}  (target <= 2)")
    print(f"  hostile EHLOs answered 250 during the floods: {ehlos}")
    print(f"  smtpguard CPU during the flood {statistics.median(cpu):5.2f} s/s; resident memory at the end "
          f"{rss:7.1f} MiB")


if __name__ == "__main__":
    main()
