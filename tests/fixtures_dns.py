"""A small authoritative DNS server on loopback for tests (STYLE.md §10).

Built on dnspython's message and wire code (no hand-parsed packets). It
serves UDP and TCP on one free port of 127.0.0.1 (or ::1), answers from a
dict that tests change while it runs, and counts the queries it receives per
(name, type) so that tests can prove caching and in-flight sharing.

    server.set("a.example", "A", ["192.0.2.1"], ttl=60)
    server.set(ptr_name("192.0.2.1"), "PTR", ["a.example."])
    server.set("*.bl.example", "A", ["127.0.0.2"])     # wildcard owner
    server.nxdomain("gone.example")                     # NXDOMAIN + SOA
    server.servfail("broken.example")                   # SERVFAIL
    server.servfail("dual.example", "A")                # SERVFAIL for A only (AAAA answers)
    server.yxdomain("odd.example")                      # YXDOMAIN (RFC 6672)
    server.huge("big.example", "A", 4090)               # a hostile RRset (TC on UDP, ~65 KB on TCP)
    server.refuse("private.example")                    # REFUSED
    server.silent("slow.example")                       # never answers
    server.truncate("big.example")                      # TC over UDP, full over TCP
    server.delay("late.example", 0.5)                   # answers after 0.5 s
    server.queries("a.example", "A") -> int

Behaviours and records match the exact name first, then `*.parent` for each
parent in turn. CNAME chains are followed inside one answer, as an
authoritative server does (RFC 1034 §4.3.2). A name that owns any record but
not the queried type is NODATA (NOERROR, empty answer, RFC 2308 §2.2); any
other name is NXDOMAIN (RFC 2308 §2.1). Negative answers carry an SOA whose
MINIMUM and TTL are `negative_ttl` (None: no SOA, to test the default).

The server runs its own asyncio loop in a background thread, so it serves
sync and async tests alike; `stop()` closes the sockets and joins the thread.
"""

from __future__ import annotations

import asyncio
import collections
import socket
import struct
import threading
from collections.abc import Iterable, Iterator
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import dns.reversename
import pytest

# Behaviour names (a table, STYLE.md §2): what the server does for a name.
NXDOMAIN = "nxdomain"
NODATA = "nodata"
SERVFAIL = "servfail"
REFUSED = "refused"
SILENT = "silent"
TRUNCATE = "truncate"
YXDOMAIN = "yxdomain"

_RCODE_BEHAVIOURS: dict[str, dns.rcode.Rcode] = {
    SERVFAIL: dns.rcode.SERVFAIL,
    REFUSED: dns.rcode.REFUSED,
    YXDOMAIN: dns.rcode.YXDOMAIN,
}

# RFC 1035 §4.2.1: a UDP answer without EDNS is at most 512 bytes.
_UDP_PLAIN_MAX = 512
# Bound on CNAME chain length, as resolvers bound it (dnspython: 16).
_MAX_CHAIN = 16


def ptr_name(ip: str) -> str:
    """The PTR owner name of an IPv4 or IPv6 address, absolute, lower case:
    `192.0.2.1` -> `1.2.0.192.in-addr.arpa.`, IPv6 in nibble format under
    `ip6.arpa.` (RFC 3596 §2.5)."""
    return dns.reversename.from_address(ip).to_text().lower()


def _norm(name: str) -> str:
    """Absolute, lower-case text form of a name."""
    return dns.name.from_text(name).to_text().lower()


def _type(rtype: str) -> str:
    return dns.rdatatype.to_text(dns.rdatatype.from_text(rtype))


def _quote_txt(value: str) -> str:
    """A TXT value as zone text: character-strings of at most 255 octets
    each (RFC 1035 §3.3.14), as a DKIM key record needs."""
    chunks = [value[i:i + 255] for i in range(0, len(value), 255)] or [""]
    return " ".join('"' + c.replace("\\", "\\\\").replace('"', '\\"') + '"' for c in chunks)


class DnsServer:
    """An authoritative test server answering from a mutable dict."""

    def __init__(self, host: str = "127.0.0.1", *, negative_ttl: int | None = 60) -> None:
        self.host = host
        self.port = 0
        # SOA MINIMUM (and SOA TTL) in negative answers; None sends no SOA.
        self.negative_ttl = negative_ttl
        self._lock = threading.Lock()
        self._records: dict[tuple[str, str], tuple[tuple[str, ...], int]] = {}
        self._behaviours: dict[str, str] = {}
        self._typed: dict[str, dict[str, str]] = {}  # type -> name -> behaviour (one family fails)
        self._owners: set[str] | None = None  # index for _exists, rebuilt on change
        self._delays: dict[str, float] = {}
        self._counts: collections.Counter[tuple[str, str, str]] = collections.Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.errors: list[Exception] = []  # exceptions raised while answering
        self._thread: threading.Thread | None = None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.base_events.Server | None = None
        self._tcp_tasks: set[asyncio.Task[None]] = set()

    # -- addresses ---------------------------------------------------------

    @property
    def address(self) -> str:
        """`IP:PORT` (`[v6]:PORT` for IPv6), as the resolver's `servers` take it."""
        if ":" in self.host:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    # -- the records and behaviours tests change ---------------------------

    def set(self, name: str, rtype: str, values: Iterable[str], ttl: int = 300) -> None:
        """Serve `values` (text form: `192.0.2.1`, `a.example.`, `10 mx.example.`,
        TXT strings unquoted) for (name, type); clears any behaviour of name."""
        key = (_norm(name), _type(rtype))
        vals = tuple(values)
        # Validate now, in the test's thread, so a typo fails the test there.
        for value in vals:
            self._rdata(key[1], value)
        with self._lock:
            self._records[key] = (vals, ttl)
            self._owners = None
            self._behaviours.pop(key[0], None)

    def set_ptr(self, ip: str, names: Iterable[str], ttl: int = 300) -> None:
        """PTR record(s) for an address."""
        self.set(ptr_name(ip), "PTR", names, ttl)

    def remove(self, name: str, rtype: str | None = None) -> None:
        """Forget a name's records (of one type, or all) and behaviours."""
        n = _norm(name)
        with self._lock:
            for key in [k for k in self._records if k[0] == n and (rtype is None or k[1] == _type(rtype))]:
                del self._records[key]
            self._owners = None
            self._behaviours.pop(n, None)
            self._delays.pop(n, None)
            for table in self._typed.values():
                table.pop(n, None)

    def _behave(self, name: str, behaviour: str) -> None:
        with self._lock:
            self._behaviours[_norm(name)] = behaviour

    def nxdomain(self, name: str) -> None:
        """The name does not exist (rcode NXDOMAIN), whatever records it has."""
        self._behave(name, NXDOMAIN)

    def nodata(self, name: str) -> None:
        """The name exists but has no data of any type (NOERROR, empty)."""
        self._behave(name, NODATA)

    def servfail(self, name: str, rtype: str | None = None) -> None:
        """Answer SERVFAIL, as a broken or unreachable zone does; for one
        record type only when `rtype` is given (A fails, AAAA answers)."""
        if rtype is None:
            self._behave(name, SERVFAIL)
            return
        with self._lock:
            self._typed.setdefault(_type(rtype), {})[_norm(name)] = SERVFAIL

    def yxdomain(self, name: str) -> None:
        """Answer YXDOMAIN (RFC 6672 §2.2: a DNAME substitution overflowed),
        the rcode a hostile zone can return for any name it owns."""
        self._behave(name, YXDOMAIN)

    def huge(self, name: str, rtype: str, count: int, ttl: int = 300) -> None:
        """`count` distinct records of `rtype` (A, AAAA or PTR) at `name`: a
        hostile RRset. Over UDP it sets TC; over TCP it is sent whole (4090
        A records are about 65 KB, the most a TCP message can carry)."""
        t = _type(rtype)
        if t == "A":
            values = [f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}" for i in range(count)]
        elif t == "AAAA":
            values = [f"2001:db8::{i >> 16 & 0xffff:x}:{i & 0xffff:x}" for i in range(count)]
        elif t == "PTR":
            values = [f"h{i}.ptr-flood.test." for i in range(count)]
        else:
            raise ValueError(f"huge() makes A, AAAA or PTR records, not {rtype}")
        self.set(name, t, values, ttl)

    def refuse(self, name: str) -> None:
        """Answer REFUSED, as a server that will not serve us does."""
        self._behave(name, REFUSED)

    def silent(self, name: str) -> None:
        """Never answer: the client sees a timeout."""
        self._behave(name, SILENT)

    def truncate(self, name: str) -> None:
        """Over UDP answer empty with TC set; over TCP answer in full."""
        self._behave(name, TRUNCATE)

    def delay(self, name: str, seconds: float) -> None:
        """Answer `seconds` late (on UDP and TCP); 0 removes the delay."""
        with self._lock:
            if seconds > 0:
                self._delays[_norm(name)] = seconds
            else:
                self._delays.pop(_norm(name), None)

    # -- counters ------------------------------------------------------------

    def queries(self, name: str, rtype: str, transport: str | None = None) -> int:
        """Queries received for (name, type); `transport` "udp"/"tcp" or both."""
        n, t = _norm(name), _type(rtype)
        with self._lock:
            if transport is not None:
                return self._counts[(n, t, transport)]
            return self._counts[(n, t, "udp")] + self._counts[(n, t, "tcp")]

    def total_queries(self) -> int:
        with self._lock:
            return sum(self._counts.values())

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()

    # -- answering -----------------------------------------------------------

    @staticmethod
    def _rdata(rtype: str, value: str) -> dns.rdata.Rdata:
        text = _quote_txt(value) if rtype == "TXT" else value
        return dns.rdata.from_text(dns.rdataclass.IN, rtype, text, origin=dns.name.root, relativize=False)

    def _match(self, table: dict[str, Any], name: str) -> Any:
        """Exact owner first, then the wildcard `*.parent` of each parent."""
        if name in table:
            return table[name]
        labels = name.split(".")
        for i in range(1, len(labels) - 1):
            wild = "*." + ".".join(labels[i:])
            if wild in table:
                return table[wild]
        return None

    def _lookup(self, name: str, rtype: str) -> tuple[tuple[str, ...], int] | None:
        got = self._records.get((name, rtype))
        if got is not None:
            return got
        labels = name.split(".")
        for i in range(1, len(labels) - 1):
            got = self._records.get(("*." + ".".join(labels[i:]), rtype))
            if got is not None:
                return got
        return None

    def _exists(self, name: str) -> bool:
        """Owns a record, is an empty non-terminal above one (RFC 8020:
        NXDOMAIN means nothing below), or is covered by a wildcard."""
        if self._behaviours.get(name) == NODATA:
            return True
        if self._owners is None:
            owners: set[str] = set()
            for owner, _ in self._records:
                labels = owner.split(".")
                owners.update(".".join(labels[i:]) for i in range(len(labels) - 1))
            self._owners = owners
        if name in self._owners:
            return True
        labels = name.split(".")
        return any("*." + ".".join(labels[i:]) in self._owners for i in range(1, len(labels) - 1))

    def _respond(self, wire: bytes, transport: str) -> tuple[bytes | None, float]:
        """The answer's wire form (None: stay silent) and the delay before it.
        A bug in the server is kept in `errors` (and the query goes unanswered)."""
        try:
            return self._answer(wire, transport)
        except Exception as exc:  # surfaced through .errors, not a dead thread
            self.errors.append(exc)
            return None, 0.0

    def _answer(self, wire: bytes, transport: str) -> tuple[bytes | None, float]:
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None, 0.0
        response = dns.message.make_response(query)
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire(), 0.0
        question = query.question[0]
        qname = question.name.to_text().lower()
        rtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self._counts[(qname, rtype, transport)] += 1
            behaviour = self._match(self._typed.get(rtype, {}), qname) or self._match(self._behaviours, qname)
            delay = self._match(self._delays, qname) or 0.0
            if behaviour == SILENT:
                return None, 0.0
            response.flags |= dns.flags.AA
            if behaviour in _RCODE_BEHAVIOURS:
                response.set_rcode(_RCODE_BEHAVIOURS[behaviour])
                return response.to_wire(), delay
            if behaviour == TRUNCATE and transport == "udp":
                response.flags |= dns.flags.TC
                return response.to_wire(), delay
            self._fill(response, qname, rtype, behaviour)
        max_size = 65535
        if transport == "udp":
            max_size = query.payload if query.edns >= 0 else _UDP_PLAIN_MAX
        try:
            return response.to_wire(max_size=max_size), delay
        except dns.exception.TooBig:
            # RFC 1035 §4.2.1 / RFC 2181 §9: too big for UDP, set TC.
            response.answer.clear()
            response.authority.clear()
            response.flags |= dns.flags.TC
            return response.to_wire(), delay

    def _fill(self, response: dns.message.Message, qname: str, rtype: str, behaviour: str | None) -> None:
        current = qname
        if behaviour not in (NXDOMAIN, NODATA):
            # Follow a CNAME chain inside the answer (RFC 1034 §4.3.2 step 3a).
            for _ in range(_MAX_CHAIN):
                found = self._lookup(current, rtype)
                if found is not None:
                    self._add(response.answer, current, rtype, found)
                    return
                cname = self._lookup(current, "CNAME") if rtype != "CNAME" else None
                if cname is None:
                    break
                self._add(response.answer, current, "CNAME", cname)
                current = _norm(cname[0][0])
                behaviour = self._match(self._behaviours, current)
                if behaviour in (NXDOMAIN, NODATA):
                    break
        if behaviour == NXDOMAIN or (behaviour != NODATA and not self._exists(current)):
            response.set_rcode(dns.rcode.NXDOMAIN)
        if self.negative_ttl is not None:
            soa = dns.rrset.from_text(
                ".", self.negative_ttl, "IN", "SOA",
                f"ns.test. hostmaster.test. 1 3600 600 86400 {self.negative_ttl}",
            )
            response.authority.append(soa)

    def _add(self, section: list[dns.rrset.RRset], name: str, rtype: str,
             found: tuple[tuple[str, ...], int]) -> None:
        values, ttl = found
        rrset = dns.rrset.RRset(dns.name.from_text(name), dns.rdataclass.IN, dns.rdatatype.from_text(rtype))
        for value in values:
            rrset.add(self._rdata(rtype, value), ttl)
        section.append(rrset)

    # -- the loop ------------------------------------------------------------

    def start(self) -> "DnsServer":
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:  # reported to start()'s caller
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._close())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"dns-server-{self.host}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("test DNS server did not start within 10 s")
        if errors:
            raise errors[0]
        return self

    async def _open(self) -> None:
        loop = asyncio.get_running_loop()
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # One free port for both UDP and TCP: bind UDP to port 0, then TCP to
        # the same number; retry if some other process holds it for TCP.
        for _ in range(50):
            udp = socket.socket(family, socket.SOCK_DGRAM)
            # A burst of hundreds of queries (bench, in-flight tests) must not
            # overflow the default ~200 KB buffer: the kernel would drop them.
            udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            udp.bind((self.host, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(family, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind((self.host, port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            break
        else:
            raise RuntimeError("no free port for both UDP and TCP")
        self.port = port
        server = self
        udp.setblocking(False)
        tcp.setblocking(False)

        class Udp(asyncio.DatagramProtocol):
            transport: Any = None

            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                self.transport = transport

            def datagram_received(self, data: bytes, addr: Any) -> None:
                wire, delay = server._respond(data, "udp")
                if wire is None:
                    return
                if delay:
                    loop.call_later(delay, self._send, wire, addr)
                else:
                    self._send(wire, addr)

            def _send(self, wire: bytes, addr: Any) -> None:
                if not self.transport.is_closing():
                    self.transport.sendto(wire, addr)

        transport, _ = await loop.create_datagram_endpoint(Udp, sock=udp)
        self._udp = transport
        self._tcp = await asyncio.start_server(self._serve_tcp, sock=tcp)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tcp_tasks.add(task)
        try:
            while True:
                # RFC 1035 §4.2.2: two-byte length prefix on TCP.
                header = await reader.readexactly(2)
                (length,) = struct.unpack("!H", header)
                wire, delay = self._respond(await reader.readexactly(length), "tcp")
                if wire is None:
                    continue
                if delay:
                    await asyncio.sleep(delay)
                writer.write(struct.pack("!H", len(wire)) + wire)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._tcp_tasks.discard(task)
            writer.close()

    async def _close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for task in list(self._tcp_tasks):
            task.cancel()
        if self._tcp is not None:
            await self._tcp.wait_closed()

    def stop(self) -> None:
        """Close the sockets and join the thread (idempotent)."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._loop = None
        self._thread = None

    def __enter__(self) -> "DnsServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def dns_server() -> Iterator[DnsServer]:
    """A fresh DNS server on 127.0.0.1 with no records."""
    with DnsServer("127.0.0.1") as server:
        yield server


@pytest.fixture
def dns_server6() -> Iterator[DnsServer]:
    """A fresh DNS server on ::1 with no records (skipped without IPv6)."""
    try:
        probe = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with DnsServer("::1") as server:
        yield server
