"""The real MTA behind the proxy, spoken to in real time (aiosmtplib).

Decides nothing: it carries one client's transaction to the upstream and
returns the upstream's replies verbatim (code and text), so the client
gets the MTA's own verdict and smtpguard never says 250 for what the MTA
has not accepted.

Inputs: UpstreamSettings, the client's identity for XCLIENT/XFORWARD.
Output: `UpstreamReply` per command; `UpstreamError` (reason UPSTREAM or
UPSTREAM-TIMEOUT) when the MTA is unreachable, times out or misbehaves.
Connections are reused: after a clean end of transaction (final DATA
reply, or RSET answered 250) a connection goes back to a small pool.
Identity never crosses clients: with XCLIENT the next client's attributes
are sent again before its first MAIL; XFORWARD is per transaction by
definition (Postfix XFORWARD_README).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from dataclasses import dataclass

import aiosmtplib
from aiosmtplib.errors import SMTPException, SMTPTimeoutError, SMTPDataError

from smtpguard.config import UpstreamSettings
from smtpguard.errors import UpstreamError
from smtpguard.observe.log import event

# Postfix's XCLIENT_README: the value for an attribute that is not known.
UNAVAILABLE = "[UNAVAILABLE]"
# A QUIT to an idle connection must not hold up a shutdown.
QUIT_TIMEOUT = 2.0


@dataclass(frozen=True, slots=True)
class UpstreamReply:
    code: int
    text: str  # lines joined by "\n", as aiosmtplib gives them

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    def wire(self) -> str:
        """The reply as the client will read it (multi-line kept)."""
        lines = self.text.split("\n") or [""]
        out = [f"{self.code}-{line}" for line in lines[:-1]]
        out.append(f"{self.code} {lines[-1]}")
        return "\r\n".join(out)


@dataclass(frozen=True, slots=True)
class ClientIdentity:
    """What XCLIENT/XFORWARD tell the MTA about the real client."""

    ip: str
    name: str = ""   # confirmed rDNS name, if known
    helo: str = ""
    esmtp: bool = True


def xtext(value: str) -> str:
    """RFC 3461 §4 xtext: `+` `=` and characters outside 33..126 as +HH."""
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else "+%02X" % (ord(c) & 0xFF) for c in value)


def _attributes(identity: ClientIdentity, supported: set[str]) -> list[str]:
    addr = identity.ip
    if ":" in addr:
        addr = "IPV6:" + addr  # Postfix's form for IPv6 in XCLIENT/XFORWARD
    values = {
        "ADDR": addr,
        "NAME": identity.name or UNAVAILABLE,
        "HELO": identity.helo or UNAVAILABLE,
        "PROTO": "ESMTP" if identity.esmtp else "SMTP",
    }
    return [f"{k}={v if v == UNAVAILABLE else xtext(v)}" for k, v in values.items() if k in supported]


class Connection:
    """One connection to the MTA, with what was last said about the client on it."""

    def __init__(self, smtp: aiosmtplib.SMTP) -> None:
        self.smtp = smtp
        self.identity: ClientIdentity | None = None
        self.last_used = time.monotonic()

    @property
    def alive(self) -> bool:
        return self.smtp.is_connected

    def supports(self, ext: str) -> bool:
        return self.smtp.supports_extension(ext)

    def params(self, ext: str) -> set[str]:
        return set(self.smtp.esmtp_extensions.get(ext.lower(), "").upper().split())

    async def command(self, *args: bytes) -> UpstreamReply:
        try:
            r = await self.smtp.execute_command(*args)
        except SMTPTimeoutError as e:
            raise UpstreamError("UPSTREAM-TIMEOUT", str(e)) from e
        except (SMTPException, OSError, ValueError) as e:
            raise UpstreamError("UPSTREAM", str(e)) from e
        return UpstreamReply(r.code, r.message)

    def close(self) -> None:
        self.smtp.close()

    async def quit(self) -> None:
        try:
            await asyncio.wait_for(self.smtp.quit(), QUIT_TIMEOUT)
        except (SMTPException, OSError, asyncio.TimeoutError):
            pass
        finally:
            self.smtp.close()


def _error(e: BaseException) -> UpstreamError:
    if isinstance(e, (SMTPTimeoutError, asyncio.TimeoutError)):
        return UpstreamError("UPSTREAM-TIMEOUT")
    return UpstreamError("UPSTREAM")


class Upstream:
    """Opens, reuses and closes connections to the configured MTA.

    smtpguard opens SMTP connections only to this one host: it never does
    sender callouts to third parties.
    """

    def __init__(self, settings: UpstreamSettings, helo_name: str) -> None:
        self.settings = settings
        self.helo_name = helo_name
        self._idle: collections.deque[Connection] = collections.deque()
        self._closed = False  # a reload replaced this pool: connections coming back are closed
        self._quitting: set[asyncio.Task[None]] = set()  # QUITs in flight, referenced until done
        self._tls: ssl.SSLContext | None = None
        if settings.tls != "none":
            # The MTA is the admin's own, usually with a self-signed or
            # internal certificate: encrypt, do not authenticate (Postfix's
            # "may"/"encrypt" levels do the same).
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            self._tls = ctx

    async def _connect(self) -> Connection:
        s = self.settings
        smtp = aiosmtplib.SMTP(hostname=s.host, port=s.port, timeout=s.timeout,
                               local_hostname=self.helo_name, start_tls=False,
                               use_tls=False, validate_certs=False)
        try:
            await smtp.connect(timeout=s.connect_timeout)
            await smtp.ehlo()
            if self._tls is not None:
                if smtp.supports_extension("starttls"):
                    await smtp.starttls(tls_context=self._tls)
                    await smtp.ehlo()
                elif s.tls == "required":
                    smtp.close()
                    event("upstream.error", error="upstream does not offer STARTTLS and upstream.tls = required")
                    raise UpstreamError("UPSTREAM", "no STARTTLS")
        except UpstreamError:
            raise
        except (SMTPException, OSError, asyncio.TimeoutError, ValueError) as e:
            smtp.close()
            event("upstream.error", error=f"{type(e).__name__}: {e}", host=s.host, port=s.port)
            raise _error(e) from e
        return Connection(smtp)

    def _take_idle(self) -> Connection | None:
        self.purge()
        while self._idle:
            conn = self._idle.pop()
            if conn.alive:
                return conn
        return None

    async def acquire(self) -> tuple[Connection, bool]:
        """A ready connection and whether it came from the pool."""
        conn = self._take_idle()
        if conn is not None:
            return conn, True
        return await self._connect(), False

    def release(self, conn: Connection, reusable: bool) -> None:
        if reusable and conn.alive and not self._closed and len(self._idle) < self.settings.pool_size:
            conn.last_used = time.monotonic()
            self._idle.append(conn)
        else:
            self._background_quit(conn)

    def purge(self, now: float | None = None) -> None:
        """Close idle connections older than `idle_time` (housekeeping)."""
        now = time.monotonic() if now is None else now
        while self._idle and now - self._idle[0].last_used > self.settings.idle_time:
            self._background_quit(self._idle.popleft())

    def _background_quit(self, conn: Connection) -> None:
        if conn.alive:
            task = asyncio.get_running_loop().create_task(conn.quit())
            self._quitting.add(task)
            task.add_done_callback(self._quitting.discard)
        else:
            conn.close()

    async def close(self) -> None:
        self._closed = True
        conns = list(self._idle)
        self._idle.clear()
        await asyncio.gather(*(c.quit() for c in conns), *self._quitting, return_exceptions=True)


class Transaction:
    """One client's current transaction mirrored on an upstream connection.

    Opened at the first accepted RCPT (MAIL is sent then), ended by the
    final DATA reply, RSET, or the end of the client's session.
    """

    def __init__(self, upstream: Upstream, identity: ClientIdentity) -> None:
        self.upstream = upstream
        self.identity = identity
        self.conn: Connection | None = None
        self.mail_reply: UpstreamReply | None = None

    @property
    def open(self) -> bool:
        return self.conn is not None

    async def begin(self, sender: str, mail_options: list[str]) -> UpstreamReply:
        """Open (or reuse) a connection, identify the client, send MAIL."""
        for attempt in (1, 2):
            conn, pooled = await self.upstream.acquire()
            try:
                reply = await self._identify_and_mail(conn, sender, mail_options)
            except UpstreamError:
                conn.close()
                if pooled and attempt == 1:
                    # The MTA may have dropped an idle connection: one fresh try.
                    continue
                raise
            if reply.ok:
                self.conn = conn
            else:
                # A refused MAIL opens no transaction: the connection stays usable.
                self.upstream.release(conn, reusable=True)
            self.mail_reply = reply
            return reply
        raise UpstreamError("UPSTREAM")  # pragma: no cover - loop always returns or raises

    async def _identify_and_mail(self, conn: Connection, sender: str, options: list[str]) -> UpstreamReply:
        settings = self.upstream.settings
        if settings.xclient and conn.supports("xclient"):
            if conn.identity != self.identity:
                attrs = _attributes(self.identity, conn.params("xclient"))
                reply = await conn.command(b"XCLIENT", *(a.encode("ascii") for a in attrs))
                if reply.code != 220:
                    event("upstream.xclient_refused", code=reply.code, text=reply.text)
                    raise UpstreamError("UPSTREAM", f"XCLIENT refused: {reply.code}")
                conn.identity = self.identity
                # XCLIENT starts a new session: greet again (Postfix XCLIENT_README).
                try:
                    await conn.smtp.ehlo()
                except (SMTPException, OSError) as e:
                    raise _error(e) from e
        elif settings.xclient and conn.supports("xforward"):
            attrs = _attributes(self.identity, conn.params("xforward"))
            reply = await conn.command(b"XFORWARD", *(a.encode("ascii") for a in attrs))
            if not reply.ok:
                raise UpstreamError("UPSTREAM", f"XFORWARD refused: {reply.code}")
        params = [o for o in options if _forwardable(o, conn)]
        return await conn.command(b"MAIL", b"FROM:<" + _addr(sender) + b">", *(p.encode("ascii") for p in params))

    async def rcpt(self, address: str) -> UpstreamReply:
        assert self.conn is not None
        return await self.conn.command(b"RCPT", b"TO:<" + _addr(address) + b">")

    async def data(self, content: bytes) -> UpstreamReply:
        """Send the message; the transaction ends whatever the reply."""
        conn = self.conn
        assert conn is not None
        self.conn = None
        try:
            r = await conn.smtp.data(content)
            reply = UpstreamReply(r.code, r.message)
        except SMTPDataError as e:
            # A refusal (at DATA or at the end of data) is the MTA's verdict, forwarded.
            reply = UpstreamReply(e.code, e.message)
        except (SMTPException, OSError, asyncio.TimeoutError) as e:
            conn.close()
            raise _error(e) from e
        if reply.ok:
            # The final reply ended the transaction (RFC 5321 §4.1.1.4).
            self.upstream.release(conn, reusable=True)
        else:
            # A refused DATA command leaves the transaction open: reset it.
            await self._reset_and_release(conn)
        return reply

    async def _reset_and_release(self, conn: Connection) -> None:
        try:
            reply = await conn.command(b"RSET")
        except UpstreamError:
            conn.close()
            return
        self.upstream.release(conn, reusable=reply.ok)

    def abort(self) -> None:
        """Drop the connection without a word: after an error its state is unknown."""
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    async def reset(self) -> None:
        """Client RSET, a new MAIL, or the end of the client's session."""
        conn, self.conn = self.conn, None
        self.mail_reply = None
        if conn is not None:
            await self._reset_and_release(conn)


def _addr(address: str) -> bytes:
    return b"" if address in ("", "<>") else address.encode("ascii", "surrogateescape")


def _forwardable(option: str, conn: Connection) -> bool:
    """SIZE and BODY go upstream when the MTA supports them (RFC 1870, RFC 6152)."""
    name = option.partition("=")[0].upper()
    return (name == "SIZE" and conn.supports("size")) or (name == "BODY" and conn.supports("8bitmime"))
