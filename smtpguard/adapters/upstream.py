"""The real MTA behind the proxy, spoken to in real time (aiosmtplib).

Decides nothing: it carries one client's transaction to the upstream and
returns the upstream's replies verbatim (code and text), so the client
gets the MTA's own verdict and smtpguard never says 250 for what the MTA
has not accepted.

Inputs: UpstreamSettings, the client's identity for XCLIENT/XFORWARD.
Output: `UpstreamReply` per command; `UpstreamError` (reason UPSTREAM or
UPSTREAM-TIMEOUT) when the MTA is unreachable, times out or misbehaves.
Connections are reused: after a delivery (a 2xx final DATA reply) a
connection goes back to a small pool. One client's faults are never charged
to the next: Postfix counts a session's refused commands and RSETs (its
smtpd_soft_error_limit, smtpd_hard_error_limit and smtpd_junk_command_limit,
all reset by a delivery) and sleeps before each reply past the soft limit,
so a connection that had an error reply, or had to end a transaction
without delivery, is closed with QUIT instead of being reused (found behind
a real Postfix: after ten dictionary-attack clients on one pooled connection
every next client waited 3 s for Postfix's error sleep, and the 20th error
cut the connection).
Identity never crosses clients. XCLIENT names one client per connection:
Postfix authorises XCLIENT against the client it names (smtpd_authorized_
xclient_hosts matched on the new address), so after one XCLIENT the
connection neither offers nor accepts another. A connection that named a
client is therefore reused only for that same client (its next message, or
its next session); any other client gets a connection that named nobody
yet, and the least recently used idle one that named somebody else is
closed first, since it holds one of the MTA's processes. With
`upstream.xclient` on, a connection on which the MTA does not offer XCLIENT
is never used to relay (451 UPSTREAM, logged as upstream.xclient_unavailable):
the mail would pass as smtpguard's own, which Postfix's default mynetworks
trusts. XFORWARD is per transaction by definition (Postfix XFORWARD_README).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Iterable

import aiosmtplib
from aiosmtplib.errors import SMTPException, SMTPTimeoutError

from smtpguard.config import UpstreamSettings
from smtpguard.core.address import is_ehlo_argument, is_hostname
from smtpguard.errors import UpstreamError
from smtpguard.observe.log import event

# Postfix's XCLIENT_README: the value for an attribute that is not known,
# and for a name whose lookup failed temporarily (Postfix then answers its
# reject_unknown_* restrictions with 450, as it would for a direct client).
UNAVAILABLE = "[UNAVAILABLE]"
TEMPUNAVAIL = "[TEMPUNAVAIL]"
# A QUIT to an idle connection must not hold up a shutdown.
QUIT_TIMEOUT = 2.0
# After the MTA's STARTTLS failed under `tls = "opportunistic"`, plain text
# is used for this long before TLS is tried again (Postfix's smtp_tls_security_level
# = may falls back to plain text the same way, per connection).
TLS_RETRY_AFTER = 300.0
# The health probe's NOOPs go on a connection of its own, never a client's,
# replaced after this many: Postfix counts NOOP as a junk command until a
# delivery (smtpd_junk_command_limit, 100) and past that slows every reply.
HEALTH_NOOPS = 50
# Asked at start-up when IPv6 clients can come: does the MTA take an IPv6
# client by XCLIENT? An address of RFC 3849's documentation prefix, which no
# real client has; the MTA's log shows it once per start.
PROBE_IPV6 = "IPV6:2001:db8::25"
IPV6_HINT = "the MTA refuses IPv6 client addresses (Postfix: inet_protocols must include ipv6)"


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
    reverse_name: str = ""        # the PTR name, confirmed or not (XCLIENT REVERSE_NAME)
    lookup_failed: bool = False   # the PTR lookup failed temporarily (rdns unknown)

    @property
    def greeting(self) -> str:
        """The client's own HELO name when it is a valid EHLO argument, else ''."""
        return self.helo if self.helo and is_ehlo_argument(self.helo) else ""

    @property
    def ehlo_name(self) -> str:
        """What to greet the MTA with for this client after XCLIENT: its own
        HELO name, or, when that is not a valid EHLO argument, its address
        literal (RFC 5321 §4.1.3) — never our own name, which would make the
        client look like us to the MTA's HELO checks."""
        if self.greeting:
            return self.greeting
        return f"[IPv6:{self.ip}]" if ":" in self.ip else f"[{self.ip}]"


def xtext(value: str) -> str:
    """RFC 3461 §4 xtext: `+` `=` and characters outside 33..126 as +HH."""
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else "+%02X" % (ord(c) & 0xFF) for c in value)


def _attributes(identity: ClientIdentity, supported: set[str]) -> list[str]:
    addr = identity.ip
    if ":" in addr:
        addr = "IPV6:" + addr  # Postfix's form for IPv6 in XCLIENT/XFORWARD
    missing = TEMPUNAVAIL if identity.lookup_failed else UNAVAILABLE
    values = {
        "ADDR": addr,
        # Strangers' strings: a PTR name or HELO that is not a valid host
        # name (or EHLO argument) is not passed on (RFC 5321 §4.1.1.1).
        "NAME": identity.name if identity.name and is_hostname(identity.name) else missing,
        # Sent whenever the MTA takes it: left out, Postfix keeps the reverse
        # name of its real client (smtpguard's own, "localhost"), and its
        # reject_unknown_reverse_client_hostname passes every client.
        "REVERSE_NAME": identity.reverse_name if identity.reverse_name and is_hostname(identity.reverse_name)
        else missing,
        "HELO": identity.greeting or UNAVAILABLE,
        "PROTO": "ESMTP" if identity.esmtp else "SMTP",
    }
    return [f"{k}={v if v in (UNAVAILABLE, TEMPUNAVAIL) else xtext(v)}" for k, v in values.items() if k in supported]


class Connection:
    """One connection to the MTA, with what was last said about the client on it."""

    def __init__(self, smtp: aiosmtplib.SMTP) -> None:
        self.smtp = smtp
        self.identity: ClientIdentity | None = None
        self.last_used = time.monotonic()
        self.noops = 0   # the health probe's, on its own connection
        # Error replies since the last delivery: what the MTA holds against
        # this session. Only a connection with none goes back to the pool.
        self.charged = 0

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
        if r.code == 421:
            # The MTA is closing the connection (RFC 5321 §3.8): a failure of
            # the upstream, not a reply for the client, whose session goes on.
            self.close()
            raise UpstreamError("UPSTREAM", f"421 {r.message}")
        if r.code >= 400:
            self.charged += 1
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


def _failure(kind: str, error: BaseException | str, upstream: "Upstream | None" = None) -> None:
    """An upstream failure at warning, counted, so an admin can alert on it."""
    if upstream is not None:
        upstream.failures += 1
    event("upstream.error", logging.WARNING, kind=kind,
          error=error if isinstance(error, str) else f"{type(error).__name__}: {error}",
          failures=upstream.failures if upstream is not None else None)


def _xclient_unavailable() -> None:
    event("upstream.xclient_unavailable", logging.ERROR,
          error="upstream.xclient is on but the MTA does not offer XCLIENT to smtpguard "
                "(Postfix: smtpd_authorized_xclient_hosts must list smtpguard's address)")


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
        self.failures = 0  # upstream errors since start, in the log lines
        # The MTA's EHLO extensions as last seen (lower-case name -> parameters),
        # learned at start-up and on every new connection; None until then.
        self.capabilities: dict[str, str] | None = None
        self._plain_until = 0.0  # opportunistic TLS failed: plain text until then
        self._health: Connection | None = None  # the health probe's own connection
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
        use_tls = self._tls is not None and not (s.tls == "opportunistic"
                                                 and time.monotonic() < self._plain_until)
        smtp = aiosmtplib.SMTP(hostname=s.host, port=s.port, timeout=s.timeout,
                               local_hostname=self.helo_name, start_tls=False,
                               use_tls=False, validate_certs=False)
        stage = "connect"
        try:
            await smtp.connect(timeout=s.connect_timeout)
            stage = "ehlo"
            await smtp.ehlo()
            if use_tls and self._tls is not None:
                if smtp.supports_extension("starttls"):
                    stage = "starttls"
                    await smtp.starttls(tls_context=self._tls)
                    await smtp.ehlo()
                elif s.tls == "required":
                    smtp.close()
                    _failure("tls", "upstream does not offer STARTTLS and upstream.tls = required", self)
                    raise UpstreamError("UPSTREAM", "no STARTTLS")
        except UpstreamError:
            raise
        except (SMTPException, OSError, asyncio.TimeoutError, ValueError) as e:
            smtp.close()
            _failure(stage, e, self)
            if stage == "starttls" and s.tls == "opportunistic":
                # The MTA offered STARTTLS but the handshake failed: plain
                # text, as opportunistic TLS means (RFC 7435 §3).
                self._plain_until = time.monotonic() + TLS_RETRY_AFTER
                return await self._connect()
            raise _error(e) from e
        self.capabilities = dict(smtp.esmtp_extensions)
        return Connection(smtp)

    def offers(self, extension: str) -> bool:
        """Whether the client may be offered an extension: allowed by
        `upstream.extensions` and offered by the MTA as last seen."""
        return (extension.upper() in self.settings.extensions and self.capabilities is not None
                and extension.lower() in self.capabilities)

    def size_limit(self) -> int:
        """The MTA's SIZE (RFC 1870), 0 when it states none."""
        value = (self.capabilities or {}).get("size", "")
        return int(value) if value.strip().isdigit() else 0

    async def probe(self, ipv6: bool = False) -> None:
        """Learn the MTA's extensions at start-up (best effort: a session
        learns them too), and say loudly when XCLIENT is configured but the
        MTA does not offer it to us: every message would be refused 451.
        With `ipv6` (clients may come over IPv6), also whether it takes an
        IPv6 client by XCLIENT, or every IPv6 sender would be deferred."""
        try:
            conn, _ = await self.acquire()
        except UpstreamError:
            return
        if self.settings.xclient and not conn.supports("xclient"):
            _xclient_unavailable()
        elif self.settings.xclient and ipv6:
            await self._probe_ipv6_xclient()
        self.release(conn, reusable=True)

    async def _probe_ipv6_xclient(self) -> None:
        try:
            conn = await self._connect()
        except UpstreamError:
            return
        try:
            reply = await conn.command(b"XCLIENT", f"ADDR={PROBE_IPV6}".encode("ascii"),
                                       f"NAME={UNAVAILABLE}".encode("ascii"))
        except UpstreamError:
            return
        finally:
            self._background_quit(conn)   # it named a client that does not exist: never pooled
        if reply.code != 220:
            event("upstream.xclient_ipv6_refused", logging.WARNING, code=reply.code, text=reply.text,
                  hint=IPV6_HINT if reply.code == 501 else None)

    async def health_check(self) -> bool:
        """Health: whether the MTA answers NOOP, asked on the probe's own
        connection (kept open, replaced after HEALTH_NOOPS or when the MTA
        closed it). A pooled connection would carry the NOOPs, which Postfix
        counts against the session, to the next client."""
        conn = self._health
        if conn is None or not conn.alive or conn.noops >= HEALTH_NOOPS:
            self._health = None
            if conn is not None:
                self._background_quit(conn)
            conn = self._health = await self._connect()
        try:
            reply = await conn.command(b"NOOP")
        except BaseException:   # an error, or the caller's timeout: its state is unknown
            self._health = None
            conn.close()
            raise
        conn.noops += 1
        return reply.ok

    def _take_idle(self, identity: ClientIdentity | None) -> Connection | None:
        """The most recently used idle connection `identity` may use: any,
        or (XCLIENT) one that named no client yet or named this one."""
        self.purge()
        for conn in reversed(self._idle):
            if identity is None or conn.identity is None or conn.identity == identity:
                self._idle.remove(conn)
                if conn.alive:
                    return conn
                conn.close()
                return self._take_idle(identity)
        return None

    async def acquire(self, identity: ClientIdentity | None = None) -> tuple[Connection, bool]:
        """A ready connection and whether it came from the pool. With an
        `identity` (XCLIENT), never one that named another client."""
        conn = self._take_idle(identity)
        if conn is not None:
            return conn, True
        if self._idle:
            # Every idle connection named another client: the least recently
            # used goes before a new one is opened. Each holds one of the
            # MTA's processes that nobody else may use (Postfix's
            # default_process_limit, 100 smtpd), and a full house of them
            # kept new clients waiting past connect_timeout (451).
            self._background_quit(self._idle.popleft())
        return await self._connect(), False

    def release(self, conn: Connection, reusable: bool) -> None:
        if not (reusable and conn.charged == 0 and conn.alive and not self._closed
                and self.settings.pool_size > 0):
            self._background_quit(conn)
            return
        if len(self._idle) >= self.settings.pool_size:
            # the least recently used goes: with XCLIENT, idle connections
            # that named other clients must not keep the newest out
            self._background_quit(self._idle.popleft())
        conn.last_used = time.monotonic()
        self._idle.append(conn)

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
        if self._health is not None:
            conns.append(self._health)
            self._health = None
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
        # The recipients the MTA accepted in this transaction, in order: the
        # session checks them against those it told 250 before the end of DATA.
        self.rcpts: list[str] = []

    @property
    def open(self) -> bool:
        return self.conn is not None

    @property
    def alive(self) -> bool:
        """Open, and the MTA has not closed the connection (its idle timeout)."""
        return self.conn is not None and self.conn.alive

    async def begin(self, sender: str, mail_options: list[str]) -> UpstreamReply:
        """Open (or reuse) a connection, identify the client, send MAIL."""
        xclient = self.upstream.settings.xclient
        for attempt in (1, 2):
            conn, pooled = await self.upstream.acquire(self.identity if xclient else None)
            try:
                reply = await self._identify_and_mail(conn, sender, mail_options)
            except UpstreamError as e:
                conn.close()
                _failure("mail", str(e) or e.reason, self.upstream)
                if pooled and attempt == 1:
                    # The MTA may have dropped an idle connection: one fresh try.
                    continue
                raise
            if reply.ok:
                self.conn = conn
            else:
                # A refused MAIL opens no transaction; the refusal counts
                # against the connection, which release() then retires.
                self.upstream.release(conn, reusable=True)
            self.mail_reply = reply
            return reply
        raise UpstreamError("UPSTREAM")  # pragma: no cover - loop always returns or raises

    async def _identify_and_mail(self, conn: Connection, sender: str, options: list[str]) -> UpstreamReply:
        settings = self.upstream.settings
        if settings.xclient and conn.identity != self.identity:
            if conn.identity is not None:   # acquire() never hands one out: a bug, not a relay
                raise UpstreamError("UPSTREAM", "connection names another client")
            if not conn.supports("xclient"):
                _xclient_unavailable()
                raise UpstreamError("UPSTREAM", "XCLIENT not offered")
            attrs = _attributes(self.identity, conn.params("xclient"))
            reply = await conn.command(b"XCLIENT", *(a.encode("ascii") for a in attrs))
            if reply.code != 220:
                hint = IPV6_HINT if ":" in self.identity.ip and reply.code == 501 else None
                event("upstream.xclient_refused", logging.WARNING, code=reply.code, text=reply.text, hint=hint)
                raise UpstreamError("UPSTREAM", f"XCLIENT refused: {reply.code}")
            conn.identity = self.identity
            # XCLIENT starts a new session: greet again (Postfix
            # XCLIENT_README), with the client's own HELO name, as nginx's
            # mail proxy does, or the MTA logs and writes ours instead.
            try:
                await conn.smtp.ehlo(hostname=self.identity.ehlo_name)
            except (SMTPException, OSError) as e:
                raise _error(e) from e
        if settings.xforward and conn.supports("xforward"):
            attrs = _attributes(self.identity, conn.params("xforward"))
            reply = await conn.command(b"XFORWARD", *(a.encode("ascii") for a in attrs))
            if not reply.ok:
                raise UpstreamError("UPSTREAM", f"XFORWARD refused: {reply.code}")
        params = [o for o in options if _forwardable(o, conn)]
        return await conn.command(b"MAIL", b"FROM:<" + _addr(sender) + b">", *(p.encode("utf-8") for p in params))

    async def rcpt(self, address: str, options: list[str] | None = None) -> UpstreamReply:
        """Mirror one RCPT; on any error the connection is closed (its state is unknown)."""
        conn = self.conn
        assert conn is not None
        try:
            reply = await conn.command(b"RCPT", b"TO:<" + _addr(address) + b">",
                                       *(o.encode("utf-8") for o in options or () if _forwardable(o, conn)))
        except UpstreamError as e:
            self.abort()
            _failure("rcpt", str(e) or e.reason, self.upstream)
            raise
        if reply.ok:
            self.rcpts.append(address)
        return reply

    async def data(self, blocks: Iterable[bytes]) -> UpstreamReply:
        """Send the message in blocks (dot-stuffed, without the final dot); the
        transaction ends whatever the reply.

        The message is written as it is read from the spool, with the
        transport's flow control, so a large message never sits whole in
        memory. A refused DATA command is the MTA's verdict, forwarded.
        """
        conn = self.conn
        assert conn is not None
        self.conn = None
        try:
            start = await conn.command(b"DATA")
        except UpstreamError as e:
            conn.close()
            _failure("data", str(e) or e.reason, self.upstream)
            raise
        if start.code != 354:
            # A refused DATA command leaves the transaction open: QUIT ends it.
            self.upstream.release(conn, reusable=False)
            return start
        protocol = conn.smtp.protocol
        timeout = self.upstream.settings.timeout
        try:
            assert protocol is not None
            # A reply the MTA sends before the final dot (a size refusal)
            # must be kept for read_response, not dropped as unsolicited.
            protocol._response_pending = True
            pending = b""
            for block in blocks:
                if pending:
                    protocol.write(pending)
                    await protocol._drain_helper()
                pending = block
            # the last block and the final dot in one write: one segment for a small message
            protocol.write(pending + b".\r\n")
            r = await protocol.read_response(timeout=timeout)
            if r.code == 421:
                raise SMTPException(f"421 {r.message}")
        except (SMTPException, OSError, asyncio.TimeoutError, AssertionError) as e:
            conn.close()
            _failure("end-of-data", e, self.upstream)
            raise _error(e) from e
        # The final reply ends the transaction whatever it says (RFC 5321
        # §4.1.1.4); a delivery clears what the MTA held against the session.
        conn.charged = 0 if 200 <= r.code < 300 else conn.charged + 1
        self.upstream.release(conn, reusable=True)
        return UpstreamReply(r.code, r.message)

    def abort(self) -> None:
        """Drop the connection without a word: after an error its state is unknown."""
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    def reset(self) -> None:
        """Client RSET, a new MAIL, or the end of the client's session: an open
        transaction ends with QUIT, not RSET. Postfix counts RSET as a junk
        command until the next delivery (smtpd_junk_command_limit, 1 under
        overload), so an RSET would charge this client's abort to the next
        client on the connection."""
        conn, self.conn = self.conn, None
        self.mail_reply = None
        if conn is not None:
            self.upstream.release(conn, reusable=False)


def _addr(address: str) -> bytes:
    # UTF-8 addresses reach here only in an SMTPUTF8 transaction (RFC 6531).
    return b"" if address in ("", "<>") else address.encode("utf-8", "surrogateescape")


# MAIL and RCPT parameters and the extension that carries each (RFC 1870,
# RFC 6152, RFC 6531, RFC 3461): passed on verbatim when the MTA offers it.
PARAMETER_EXTENSION = {"SIZE": "size", "BODY": "8bitmime", "SMTPUTF8": "smtputf8",
                       "RET": "dsn", "ENVID": "dsn", "NOTIFY": "dsn", "ORCPT": "dsn"}


def _forwardable(option: str, conn: Connection) -> bool:
    ext = PARAMETER_EXTENSION.get(option.partition("=")[0].upper())
    return ext is not None and conn.supports(ext)
