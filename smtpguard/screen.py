"""The screen: one connection from accept until the client has earned a session.

As postscreen sits in front of smtpd, the screen owns the client socket
before aiosmtpd's SMTP protocol does (DESIGN.md). It is a bare asyncio
Protocol: no stream reader, no SMTP object, no task for a client that a
limit refuses.

Decides: whether a new connection is closed (untrusted PROXY sender, bad
  PROXY header), refused (a limit, the connect-stage policy, `drop`), or
  handed to the SMTP session with its connect verdict already known.
Inputs: the accepted transport; `[server] proxy_protocol`, `proxy_trusted`,
  `proxy_timeout`; `[limits]`; `[pregreet]`; the connect-stage facts and
  policy through `ClientSession.on_connect`; the shared counts and the
  state store through the services.
Output: at most one reply line of its own (`421 [BUSY]`, `421 [RATE]`,
  `521` for drop, `554`/`421` for a refusal at connect) and one log line per
  refused client; or `Server.hand_over`, which attaches aiosmtpd's protocol
  to the same transport and feeds it every byte already read.
Failure modes: a client that hangs up is forgotten (a debug line); a
  state-store outage never refuses anyone (the rate limit is skipped, the
  client waits for the greeting once more); an untrusted or malformed PROXY
  header closes the connection without a banner (a warning line).
Defaults and why: see config.py (`[pregreet] wait` 6 s and `pass_ttl` 1 d
  as postscreen; `[limits]` 20 per client, 1,000 per process, rate off).
  While screening, at most SCREEN_BUFFER bytes of the client are kept.

The early-talker test (postscreen's pregreet): `220-<hostname> ESMTP` at
once, then `[pregreet] wait`; anything the client sends before the last
line makes the fact `pregreet = true` (the wait ends there), else it passed
and is remembered in the store for pass_ttl. The last line of the greeting
is aiosmtpd's own `220 <hostname> ESMTP smtpguard`, written once the
session has it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
import struct
from typing import TYPE_CHECKING, Any

from smtpguard.core import reply as replies
from smtpguard.core.facts import ClientInfo
from smtpguard.core.ip import client_ip, client_key, in_networks
from smtpguard.observe.log import event
from smtpguard.session import ClientSession
from smtpguard.sources import fingerprint

if TYPE_CHECKING:
    from smtpguard.server import Server

# Bytes of an unscreened client kept before reading pauses: a greeting's
# worth of pipelined commands (RFC 2920); a bot that floods gets no more.
SCREEN_BUFFER = 64 * 1024
# A refused client's command line (RFC 5321 §4.5.3.1.4: 512 octets).
REFUSED_LINE = 512
# PROXY v1: "PROXY" + the longest TCP6 line is 107 bytes with CRLF
# (haproxy proxy-protocol.txt §2.1); v2: a 16-byte header and its length.
PROXY_V1_MAX = 107
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY_V2_HEADER = 16
# haproxy proxy-protocol.txt §2.2: a v2 header is at most 16 + 65535 bytes;
# real balancers send well under 1 KiB of TLVs.
PROXY_V2_MAX = 4096


def proxy_header_length(buf: bytes | bytearray) -> int | None:
    """Bytes of the PROXY header at the start of `buf`: its length once
    complete, None while more may complete it, -1 when it cannot be one."""
    if buf[:1] == b"P":
        if not b"PROXY "[:len(buf)] == bytes(buf[:6]):
            return -1
        end = buf.find(b"\r\n", 0, PROXY_V1_MAX)
        if end >= 0:
            return end + 2
        return -1 if len(buf) >= PROXY_V1_MAX else None
    if buf[:1] == b"\r":
        if bytes(buf[:12]) != PROXY_V2_SIGNATURE[:min(12, len(buf))]:
            return -1
        if len(buf) < PROXY_V2_HEADER:
            return None
        total = PROXY_V2_HEADER + struct.unpack("!H", buf[14:16])[0]
        if total > PROXY_V2_MAX:
            return -1
        return total if len(buf) >= total else None
    return -1 if buf else None


class Screen(asyncio.Protocol):
    """One client connection until it is handed over or refused."""

    __slots__ = ("server", "loop", "transport", "ip", "port", "key", "buf", "waiter", "timer", "task",
                 "session", "errors", "paused", "released", "closed")

    def __init__(self, server: "Server") -> None:
        self.server = server
        self.loop: asyncio.AbstractEventLoop | None = None
        self.transport: Any = None
        self.ip = ""
        self.port = 0
        self.key: str | None = None          # counted under this client key (released once)
        self.buf = bytearray()
        self.waiter: asyncio.Future[bool] | None = None   # pregreet / PROXY bytes
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.session: ClientSession | None = None
        self.errors = 0                      # commands after a 554 greeting
        self.paused = False
        self.released = False
        self.closed = False

    # --- asyncio callbacks ------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.loop = asyncio.get_running_loop()
        server = self.server
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Replies are small and each waits for the client: no Nagle delay.
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.ip = client_ip(peer[0]) or str(peer[0])
            self.port = int(peer[1])
        server.screens.add(self)
        config = server.config
        if config.server.proxy_protocol:
            if not in_networks(self.ip, config.server.proxy_trusted):
                # issue 9 item 3: a header from anyone else would make any address
                event("proxy.untrusted", logging.WARNING, ip=self.ip, port=self.port)
                self.close()
                return
        elif not self.count():
            return
        self.task = self.running_loop.create_task(self.run())

    def data_received(self, data: bytes) -> None:
        if self.session is not None and self.session.banner_refusal is not None and self.task is None:
            self.refused_input(data)
            return
        self.buf += data
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(True)
        if len(self.buf) > SCREEN_BUFFER and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        # The client is gone before it earned a session: nothing to hand over.
        self.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.screens.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()
            event("screen.hangup", logging.DEBUG, ip=self.ip, port=self.port)
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.cancel()
        self.release()

    # --- the steps ----------------------------------------------------------

    def count(self) -> bool:
        """Count the session and apply the concurrency limits; False when refused."""
        config = self.server.config
        limits = config.limits
        self.key = client_key(self.ip) or self.ip
        clients = self.server.services.clients
        n = clients.acquire(self.key)
        if in_networks(self.ip, limits.exempt):
            return True
        if limits.max_sessions and clients.total > limits.max_sessions:
            self.refuse_limit(replies.make("BUSY", "too many connections, try again later", enhanced="4.3.2"),
                              "max_sessions")
            return False
        if limits.per_ip_sessions and n > limits.per_ip_sessions:
            self.refuse_limit(replies.make("BUSY"), "per_ip_sessions")
            return False
        return True

    async def run(self) -> None:
        try:
            await self._run()
        except asyncio.CancelledError:
            raise
        except Exception:
            # never a traceback to the client; the log has it
            event("screen.error", logging.ERROR, exc_info=True, ip=self.ip)
            self.close()
        finally:
            self.task = None

    async def _run(self) -> None:
        server = self.server
        config = server.config
        via_proxy = False
        if config.server.proxy_protocol:
            if not await self.read_proxy(config.server.proxy_timeout):
                return
            via_proxy = True
            if not self.count():
                return
        exempt = in_networks(self.ip, config.limits.exempt)
        if config.limits.per_ip_rate and not exempt:
            assert self.key is not None
            rate = await server.services.session_rate(self.key)
            if rate is not None and rate > config.limits.per_ip_rate:
                self.refuse_limit(replies.make("RATE"), "per_ip_rate")
                return
        transport = self.transport
        sock = transport.get_extra_info("socket")
        local = transport.get_extra_info("sockname")
        # The client's SYN, saved by the kernel (TCP_SAVE_SYN): read once, and
        # only when a rule reads the os facts; through a PROXY it is the
        # balancer's, not the client's.
        wanted = server.save_syn and not via_proxy and server.services.run.get("fingerprint", False)
        syn = fingerprint.read_saved_syn(sock) if wanted else None
        client = ClientInfo(session_id=server.new_session_id(), ip=self.ip, port=self.port,
                            local_ip=client_ip(local[0]) or "" if isinstance(local, tuple) else "",
                            local_port=local[1] if isinstance(local, tuple) else 0,
                            syn=syn, via_proxy=via_proxy)
        session = self.session = ClientSession(server.services, client)
        wait = config.pregreet.wait
        pregreet: bool | asyncio.Future[bool] | None = None
        tested = False
        if wait > 0 and not exempt:
            if await server.services.pregreet_passed(self.ip):
                pregreet = False
            elif self.buf:
                pregreet = True   # talked before even the first line
            else:
                tested = True
                transport.write(f"220-{config.server.hostname} ESMTP\r\n".encode("ascii"))
                pregreet = self.wait_pregreet(wait)
        line = await session.on_connect(pregreet)
        if self.closed:
            return
        if tested and session.facts.get("pregreet") is False:
            server.track(self.running_loop.create_task(server.services.pregreet_pass(self.ip)))
        if line is None:
            self.hand_over()
        elif session.dropped or session.banner_refusal is None or line.startswith("4"):
            self.say(line)
            self.close()
        else:
            # RFC 5321 §3.1: after a 554 greeting the server waits for QUIT
            # and answers 503 to everything else; no SMTP object for that.
            self.say(line)
            self.timer = self.running_loop.call_later(config.server.idle_timeout, self.idle)
            buffered, self.buf = bytes(self.buf), bytearray()
            self.task = None
            if self.paused:
                self.paused = False
                transport.resume_reading()
            if buffered:
                self.refused_input(buffered)

    def wait_pregreet(self, wait: float) -> asyncio.Future[bool]:
        """A future that becomes True when the client talks, False when `wait` is over."""
        loop = self.running_loop
        waiter: asyncio.Future[bool] = loop.create_future()
        self.waiter = waiter

        def over() -> None:
            if not waiter.done():
                waiter.set_result(False)
        self.timer = loop.call_later(wait, over)
        return waiter

    async def read_proxy(self, timeout: float) -> bool:
        """The PROXY header from a trusted balancer; False when the connection was closed."""
        loop = self.running_loop
        deadline = loop.time() + timeout
        while True:
            n = proxy_header_length(self.buf)
            if n is not None:
                break
            waiter = self.waiter = loop.create_future()
            try:
                await asyncio.wait_for(waiter, max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                n = -1
                break
            finally:
                self.waiter = None
        if n < 0:
            return self.bad_proxy("no valid PROXY header")
        header, self.buf = bytes(self.buf[:n]), self.buf[n:]
        found = await self.server.parse_proxy(header)
        if isinstance(found, str):
            return self.bad_proxy(found)
        if found is not None:
            self.ip, self.port = found
        return True

    def bad_proxy(self, why: str) -> bool:
        event("proxy.invalid", logging.WARNING, ip=self.ip, port=self.port, error=why)
        self.close()
        return False

    def hand_over(self) -> None:
        """The client earned its session: aiosmtpd takes the transport (the last 220 line is its)."""
        assert self.session is not None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.server.screens.discard(self)
        buffered, self.buf = bytes(self.buf), bytearray()
        if self.paused:
            self.paused = False
            self.transport.resume_reading()
        # The session gives the client's place back when it ends; the screen
        # itself is not kept (a handed-over session costs no screen memory).
        self.released = True
        clients, key = self.server.services.clients, self.key
        release = functools.partial(clients.release, key) if key is not None else None
        session, self.session = self.session, None
        self.server.hand_over(self.transport, session, buffered, release)

    # --- the refused client ----------------------------------------------------

    def refused_input(self, data: bytes) -> None:
        """Commands after a 554 greeting: 221 to QUIT, 503 to the rest, within the error budget."""
        self.buf += data
        session = self.session
        assert session is not None
        config = self.server.config
        while not self.closed:
            end = self.buf.find(b"\n")
            if end < 0:
                if len(self.buf) > REFUSED_LINE:
                    self.close()
                return
            line, self.buf = bytes(self.buf[:end]), self.buf[end + 1:]
            if line.strip().upper() == b"QUIT":
                self.say("221 2.0.0 Bye")
                self.close()
                return
            self.errors += 1
            if self.errors >= config.server.max_errors:
                self.say(session.render(replies.make("ERRORS")))
                self.close()
                return
            self.say(session.refused_session() or "503 5.5.1 Error")
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.running_loop.call_later(config.server.idle_timeout, self.idle)

    def idle(self) -> None:
        if self.session is not None:
            self.say(self.session.render(replies.make("IDLE")))
        self.close()

    # --- helpers ---------------------------------------------------------------

    @property
    def running_loop(self) -> asyncio.AbstractEventLoop:
        assert self.loop is not None  # set in connection_made, before any step
        return self.loop

    def refuse_limit(self, reply: replies.Reply, limit: str) -> None:
        """A limit's refusal: one reply, one log line (with the limit's running count), close."""
        server = self.server
        session_id = server.new_session_id()
        line = replies.render(reply, server.config.server.resolution_url, {"ip": self.ip, "session": session_id})
        count = server.refusals[limit] = server.refusals.get(limit, 0) + 1
        event("defer", session=session_id, ip=self.ip, port=self.port, stage="screen", action="limit",
              reason=reply.reason, rule=limit, count=count, reply=line)
        self.say(line)
        self.close()

    def say(self, line: str) -> None:
        if not self.closed:
            self.transport.write(line.encode("ascii", "replace") + b"\r\n")

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    def release(self) -> None:
        """The session's place in the counts is given back, once."""
        if not self.released:
            self.released = True
            if self.key is not None:
                self.server.services.clients.release(self.key)

    def shutdown(self) -> None:
        """The server stops: a screened client is told, then closed."""
        self.say(replies.render(replies.make("SHUTDOWN")))
        self.close()
