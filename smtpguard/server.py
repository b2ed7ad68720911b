"""Listeners and the wire: the only module that imports aiosmtpd.

aiosmtpd owns the SMTP protocol once a client has earned a session: the
screen (smtpguard/screen.py) owns the connection before that (PROXY
header, SYN, limits, pregreet wait, connect stage) and `Server.hand_over`
attaches a `GuardSMTP` to the same transport; aiosmtpd's own `220` is then
the greeting's last line, and no private aiosmtpd method is overridden.
`GuardSMTP` adds what a filtering front needs and aiosmtpd lacks: our own
reply format for aiosmtpd's protocol errors, an error budget, a 421 on idle timeout, and no
AUTH. Listening sockets are made here: SO_REUSEPORT for one process per
core, TCP_SAVE_SYN for the OS fingerprint.
"""

from __future__ import annotations

import asyncio
from asyncio import sslproto
import errno
import inspect
import itertools
import logging
import os
import re
import secrets
import signal
import socket
import ssl
from ipaddress import IPv4Address, IPv6Address
from typing import Any, Callable

from aiosmtpd.proxy_protocol import AF, PROTO, V2_CMD, get_proxy
from aiosmtpd.smtp import SMTP, TLSSetupException

from smtpguard.adapters.spool import MessageSpool
from smtpguard.adapters.upstream import Upstream
from smtpguard.core.dsn import DROPPED_MAIL, DSN_MAIL, DSN_RCPT, split_params

from smtpguard.config import Config
from smtpguard.errors import ConfigError
from smtpguard.core import reply as replies
from smtpguard.observe.log import event
from smtpguard.core.ip import client_ip, in_networks
from smtpguard.screen import Screen
from smtpguard.session import ClientSession
from smtpguard.sources import fingerprint

# How long start-up waits for the MTA's EHLO (its extensions are mirrored);
# the probe goes on in the background after that.
PROBE_WAIT = 2.0
# Bytes read from a TLS socket at a time: one maximum-size TLS record
# (RFC 8446 §5.1: 2^14 octets of plaintext plus at most 256 of overhead);
# a longer record is read in two calls, as the BIO buffers partial records.
TLS_READ_BUFFER = 16 * 1024 + 256
# Pending connections: Postfix's default listen backlog on Linux.
LISTEN_BACKLOG = 100

# aiosmtpd's own protocol-error replies, rewritten into the proxy's format
# (prefix -> reason, code, enhanced code, text; None keeps aiosmtpd's text).
AIOSMTPD_REPLIES: tuple[tuple[str, str, int, str, str | None], ...] = (
    ("500 Error: bad syntax", "SYNTAX", 500, "5.5.2", "bad syntax"),
    ("500 Command line too long", "LINE-TOO-LONG", 500, "5.5.2", None),
    ("500 Line too long", "DATA-LINE-TOO-LONG", 500, "5.6.0", None),
    ("500 Error: strict ASCII mode", "NO-SMTPUTF8", 553, "5.6.7",
     "UTF-8 addresses are not accepted here: the mail server behind does not offer SMTPUTF8"),
    ("500 Error: command ", "SYNTAX", 500, "5.5.1", "command not recognized"),
    ("502 5.5.1 Too many unrecognized commands", "ERRORS", 421, "4.7.0", None),
    ("502 EXPN", "SYNTAX", 502, "5.5.1", "EXPN is not available"),
    ("502 Could not VRFY", "BAD-ADDRESS", 501, "5.1.3", "malformed address"),
    ("552 Error: message size exceeds", "SIZE", 552, "5.3.4", "message size exceeds the limit of {size} bytes"),
    ("552 Error: Too much mail data", "SIZE", 552, "5.3.4", "message size exceeds the limit of {size} bytes"),
    ("553 5.1.3 Error: malformed address", "BAD-ADDRESS", 553, "5.1.3", "malformed address"),
    ("555 ", "SYNTAX", 555, "5.5.4", "parameters not recognized or not implemented"),
    ("501 Error: BODY", "SYNTAX", 501, "5.5.4", "BODY must be 7BIT or 8BITMIME"),
    ("501 Error: SMTPUTF8", "SYNTAX", 501, "5.5.4", "SMTPUTF8 is not supported here"),
    ("501 ", "SYNTAX", 501, "5.5.4", "syntax error"),
    ("503 Error: need MAIL", "SEQUENCE", 503, "5.5.1", "need MAIL before RCPT"),
    ("503 Error: need RCPT", "SEQUENCE", 503, "5.5.1", "need an accepted RCPT before DATA"),
    ("503 Error: nested MAIL", "SEQUENCE", 503, "5.5.1", "nested MAIL command"),
    ("503 Error: send HELO first", "SEQUENCE", 503, "5.5.1", "send HELO or EHLO first"),
)


def _rewrite(status: str, size: int) -> replies.Reply | None:
    for prefix, reason, code, enhanced, text in AIOSMTPD_REPLIES:
        if status.startswith(prefix):
            body = text.format(size=size) if text else status[4:].removeprefix("Error: ")
            return replies.Reply(code, enhanced, reason, body)
    return None


# `TO:<@relay1,@relay2:user@domain>`: a source route, with its first hop.
_SOURCE_ROUTE = re.compile(r"(?i)TO:\s*<\s*@([^,:>\s]*)[^>]*>?")


# `<local@domain>` with a dot-atom local part and an LDH domain, then the parameters.
_PLAIN_PATH = re.compile(r"\s*<([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
                         r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>\s*(.*)\Z", re.S)
_DIR_CACHE: dict[type, list[str]] = {}


def _bad_command_line(line: bytes) -> bool:
    """A command line with a NUL, a bare CR, or a bare LF as its end (RFC 5321 §2.3.8)."""
    return not line.endswith(b"\r\n") or b"\r" in line[:-2] or b"\x00" in line


class Hooks:
    """aiosmtpd's handler: adapts its hook calls (protocol, session and
    envelope objects) to the session's commands-in, replies-out methods, and
    keeps aiosmtpd's envelope and session in step with what was accepted.

    One instance serves every connection: each hook finds the session
    through the protocol aiosmtpd passes (`server.guard`). The hooks are
    static, so aiosmtpd's per-connection reflection finds plain functions
    (no bound methods to make, and handle_EHLO's signature read at once)."""

    __slots__ = ()

    def __dir__(self) -> list[str]:
        # aiosmtpd reflects over its handler on every connection, looking for
        # handle_* and auth_* names only (see GuardSMTP.__dir__).
        return _HOOK_NAMES

    @staticmethod
    async def handle_HELO(server: "GuardSMTP", session: Any, envelope: Any, hostname: str) -> str:
        refused = await server.guard.screen_helo(hostname, esmtp=False)
        if refused:
            return refused
        session.host_name = hostname
        return f"250 {server.guard.config.server.hostname}"

    @staticmethod
    async def handle_EHLO(server: "GuardSMTP", session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        refused = await server.guard.screen_helo(hostname, esmtp=True)
        if refused:
            return [refused]
        session.host_name = hostname
        return [ehlo_reply(responses, server.guard.services.upstream)]

    @staticmethod
    async def handle_MAIL(server: "GuardSMTP", session: Any, envelope: Any, address: str,
                          mail_options: list[str]) -> str:
        reply = await server.guard.mail(address, mail_options)
        if reply.startswith("250"):
            envelope.mail_from = address
            envelope.mail_options.extend(mail_options)
        return reply

    @staticmethod
    async def handle_RCPT(server: "GuardSMTP", session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        guard = server.guard
        told = len(guard.accepted)
        reply = await guard.rcpt(address, rcpt_options)
        if len(guard.accepted) > told:   # the MTA took it: aiosmtpd's DATA checks rcpt_tos
            envelope.rcpt_tos.append(address)
        return reply

    @staticmethod
    async def handle_RSET(server: "GuardSMTP", session: Any, envelope: Any) -> str:
        server.junk_command()
        return await server.guard.rset()

    @staticmethod
    async def handle_NOOP(server: "GuardSMTP", session: Any, envelope: Any, arg: str) -> str:
        server.junk_command()
        return "250 2.0.0 OK"

    @staticmethod
    async def handle_VRFY(server: "GuardSMTP", session: Any, envelope: Any, address: str) -> str:
        server.junk_command()
        return server.guard.vrfy(address)

    @staticmethod
    async def handle_QUIT(server: "GuardSMTP", session: Any, envelope: Any) -> str:
        return await server.guard.quit()


_HOOK_NAMES = [n for n in vars(Hooks) if n.startswith("handle_")]
HOOKS = Hooks()
# aiosmtpd inspects handle_EHLO's signature on every connection (to tell its
# old and new hook forms apart): computed once here, inspect.signature then
# returns it at once.
Hooks.handle_EHLO.__signature__ = inspect.signature(Hooks.handle_EHLO)  # type: ignore[attr-defined]


def ehlo_reply(responses: list[str], upstream: Upstream) -> str:
    """The EHLO reply, in one write (aiosmtpd pushes each item on its own).

    No AUTH on an inbound port-25 front (aiosmtpd would offer it after
    STARTTLS); PIPELINING (RFC 2920) and ENHANCEDSTATUSCODES (RFC 2034) are
    what every reply here honours. Extensions of the MTA behind are mirrored
    where the proxy carries them (SMTPUTF8 and SIZE are set on the protocol
    by the server; 8BITMIME and DSN here)."""
    known = upstream.capabilities is not None
    lines = [r for r in responses[:-1] if not r[4:].upper().startswith("AUTH")
             and not (r[4:].upper() == "8BITMIME" and known and not upstream.offers("8BITMIME"))]
    if upstream.offers("DSN"):
        lines.append("250-DSN")
    lines += ["250-PIPELINING", "250-ENHANCEDSTATUSCODES", "250 HELP"]
    return "\r\n".join(lines)


class GuardSMTP(SMTP):
    """aiosmtpd's SMTP with the connect stage, SYN capture and our reply rules."""

    def __init__(self, handler: ClientSession, server: "Server", **kwargs: Any) -> None:
        super().__init__(HOOKS, **kwargs)
        self.guard = handler
        self.server = server
        self.errors = 0
        self.overshoot = 0
        self.junk = 0   # NOOP, RSET, VRFY, HELP since the last delivery
        self.in_data = False
        self._readline = self._guard_reader()

    def _guard_reader(self) -> Any:
        """Make the command reader refuse what aiosmtpd lets through.

        aiosmtpd accepts a bare LF as a command's end and passes NUL and bare
        CR on inside it. A malformed line is turned into an empty one, which
        aiosmtpd answers with `500 bad syntax` (rewritten to ours) without
        running the command. The DATA reader uses the original method.
        """
        reader: asyncio.StreamReader = getattr(self, "_stream_reader")  # StreamReaderProtocol's reader
        original = reader.readuntil

        async def readuntil(separator: bytes = b"\n") -> bytes:
            line: bytes = await original(separator)
            if separator == b"\n" and _bad_command_line(line):
                event("syntax.bad_line", logging.WARNING, session=self.guard.client.session_id,
                      ip=self.guard.client.ip, line=line[:80].decode("ascii", "backslashreplace"))
                return b"\r\n"
            return line

        reader.readuntil = readuntil  # type: ignore[method-assign, assignment]
        return original

    # -- connection -------------------------------------------------------

    # The screen's hold on the client's place in the session counts,
    # given back when the connection ends (Server.hand_over sets it).
    release: Callable[[], None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The client (address, SYN, connect verdict) was settled by the screen.
        if self.transport is None:  # the first call, not the STARTTLS one
            self.server.sessions.add(self)
        super().connection_made(transport)
        if self.session is not None and self.session.ssl is not None:
            info = self.session.ssl
            cipher = info.get("cipher")
            if cipher:
                self.guard.tls_info = f"{cipher[1]} with cipher {cipher[0]} ({cipher[2]}/{cipher[2]} bits)"
            else:
                self.guard.tls_info = "TLS"
            self.guard.facts["tls"] = True

    def connection_lost(self, error: Exception | None) -> None:
        first = self.transport is not None
        super().connection_lost(error)
        if first and self in self.server.sessions:
            self.server.sessions.discard(self)
            self.server.track(self.loop.create_task(self.guard.on_close()))
            if self.release is not None:
                self.release()

    # -- replies ----------------------------------------------------------

    def junk_command(self) -> None:
        """NOOP, RSET, VRFY or HELP: past `limits.junk_commands` since the last
        delivery each one counts as an error (Postfix's
        smtpd_junk_command_limit), so they cannot hold a session, or make
        the MTA open a connection per MAIL/RCPT/RSET round, for ever."""
        limits = self.server.config.limits
        self.junk += 1
        if limits.junk_commands and self.junk > limits.junk_commands \
                and not in_networks(self.guard.client.ip, limits.exempt):
            self.errors += 1

    async def smtp_HELP(self, arg: str) -> None:
        self.junk_command()
        await super().smtp_HELP(arg)

    async def push(self, status: Any) -> None:
        if isinstance(status, str):
            # (A client refused at connect never gets here: the screen answers it.)
            if status is self.guard.verbatim:
                self.guard.verbatim = None
            elif status[:1] in ("4", "5") and "[" not in status[:12]:
                # the SIZE this session announced: ours or the MTA's, the smaller
                rewritten = _rewrite(status, self.data_size_limit or self.server.config.server.max_message_size)
                if rewritten is not None:
                    # aiosmtpd's own refusals in our one format, with the URL, logged.
                    status = self.guard.refuse("command", rewritten)
            if "[RCPT-LIMIT]" in status[:24] and self.overshoot < self.server.config.limits.recipient_overshoot:
                # Not a client error (Postfix's smtpd_recipient_overshoot_limit):
                # a client that pipelines 1,000 recipients gets 100 accepted.
                self.overshoot += 1
            elif status[:1] in ("4", "5"):
                self.errors += 1
            # (junk commands past the limit count too, answered as usual first)
            if (self.errors >= self.server.config.server.max_errors and not status.startswith("421")
                    and self.transport is not None and not self.transport.is_closing()):
                await super().push(status)
                status = self.guard.render(replies.make("ERRORS"))
                event("close.errors", session=self.guard.client.session_id, ip=self.guard.client.ip,
                      errors=self.errors, junk=self.junk, reply=status)
        await super().push(status)
        # 421: we close (RFC 5321 §3.8); 521: a `drop` rule (postscreen's drop, RFC 7504)
        if isinstance(status, str) and status.startswith(("421", "521")) and self.transport is not None:
            self.transport.close()

    def _timeout_cb(self) -> None:
        # RFC 5321 §4.5.3.2: a server closing an idle session says so with 421.
        if self.transport is not None and not self.transport.is_closing():
            try:
                self._writer.write((self.guard.render(replies.make("IDLE")) + "\r\n").encode("ascii"))
            except Exception:  # the transport may already be gone
                pass
        event("idle_timeout", session=self.guard.client.session_id, ip=self.guard.client.ip)
        super()._timeout_cb()

    async def handle_exception(self, error: Exception) -> str:
        if isinstance(error, TLSSetupException):
            # A client that fails the handshake is the client's problem: no traceback.
            event("tls.failed", logging.WARNING, session=self.guard.client.session_id, ip=self.guard.client.ip,
                  error=str(error.__cause__ or error))
            return self.guard.render(replies.make("INTERNAL", "TLS handshake failed"))
        return await self.guard.internal_error(error)

    # -- commands -----------------------------------------------------------

    async def smtp_AUTH(self, arg: str) -> None:
        await self.push(self.guard.render(replies.make("NO-AUTH")))

    def __dir__(self) -> list[str]:
        # aiosmtpd's __init__ reflects over the protocol and the handler on
        # every connection (inspect.getmembers, dir: about a fifth of a
        # relayed message's CPU); it only looks for smtp_*/auth_* names, so
        # give it those, computed once per class.
        cls = type(self)
        names = _DIR_CACHE.get(cls)
        if names is None:
            names = _DIR_CACHE[cls] = [n for n in object.__dir__(self) if n.startswith(("smtp_", "auth_"))]
        return names

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # The common `<local@domain> params` without the email header parser
        # (about 14% of a relayed message's CPU); anything else goes to it.
        plain = _PLAIN_PATH.match(arg)
        if plain is not None:
            return plain.group(1), plain.group(2)
        # aiosmtpd's address parser raises on `<`, `a@` and more (issue: the
        # two promises, item 8); a malformed address is a syntax error.
        try:
            address, rest = super()._getaddr(arg)
        except Exception:
            return None, None
        if address and '"' in address and '"' not in arg.split(">", 1)[0]:
            # The parser quoted what it took for a local part (`<a b@x>`,
            # `<a\tb@x>` came out as `"a b"@x`): a rewrite of a malformed
            # address, which Postfix refuses, never passed on as another.
            return None, None
        return address, rest

    async def smtp_MAIL(self, arg: str | None) -> None:
        if arg and "AUTH=" in arg.upper():
            split = await self._split_params(arg, DROPPED_MAIL)   # as Postfix without SASL: taken, ignored
            if split is None:
                return
            arg = split[0]
        arg = await self._take_dsn(arg, DSN_MAIL)
        if arg is not None:
            await super().smtp_MAIL(arg)

    async def _take_dsn(self, arg: str | None, names: tuple[str, ...]) -> str | None:
        """Take the DSN parameters (RFC 3461) off a MAIL or RCPT line, verbatim.

        aiosmtpd knows none and would refuse them (555); the session passes
        them upstream as the client wrote them. Without DSN offered they stay
        on the line, and aiosmtpd refuses them. None: a syntax error was sent.
        """
        if not arg or not self.server.services.upstream.offers("DSN"):
            return arg
        split = await self._split_params(arg, names)
        if split is None:
            return None
        rest, self.guard.dsn_params = split
        return rest

    async def _split_params(self, arg: str, names: tuple[str, ...]) -> tuple[str, list[str]] | None:
        """core.dsn.split_params, with a malformed or repeated parameter answered
        501 here; None then."""
        try:
            return split_params(arg, names)
        except ValueError as e:
            await self.push(self.guard.refuse("command", replies.Reply(501, "5.5.4", "SYNTAX", str(e))))
            return None

    async def smtp_RCPT(self, arg: str | None) -> None:
        arg = await self._take_dsn(arg, DSN_RCPT)
        if arg is None:
            return
        route = _SOURCE_ROUTE.match(arg or "")
        if route and self.envelope is not None and self.envelope.mail_from is not None:
            # aiosmtpd drops a source route and passes the final address on;
            # a front refuses the form itself (RFC 5321 §4.1.1.3 lets a server
            # ignore routes; Postfix's allow_untrusted_routing = no refuses them).
            reply = replies.for_recipient("RELAY", route.group(1))
            await self.push(self.guard.refuse("rcpt", reply, route.group(0)[3:].strip(), rule="relay"))
            return
        await super().smtp_RCPT(arg)

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._tls_protocol is not None:
            # RFC 3207 §4.2: STARTTLS inside TLS is refused.
            await self.push(self.guard.refuse("command", replies.Reply(503, "5.5.1", "SEQUENCE", "TLS is already active")))
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_DATA(self, arg: str) -> None:
        """DATA, received into a spool and relayed only once complete.

        aiosmtpd's own DATA keeps the whole message in memory and lets the
        idle timer cut a slow but steady transfer. Here each line goes to
        the spool (memory bounded per message), the timer restarts while
        bytes arrive (`data_timeout` without progress, as Postfix's
        smtpd_timeout per read), and a client that vanishes mid-message
        leaves nothing at the MTA: the message goes upstream only after the
        final dot.
        """
        if await self.check_helo_needed():
            return
        if not self.guard.accepted:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        refusal = self.guard.data_refusal()
        if refusal is not None:
            await self.push(refusal)
            return
        self.in_data = True
        message = MessageSpool()
        try:
            await self.push("354 End data with <CR><LF>.<CR><LF>")
            status = await self._receive(message)
            if status is None:
                status = await self.guard.on_data(message)
        finally:
            message.close()
            self.in_data = False
        self._set_post_data_state()
        if status.startswith("2"):
            self.junk = 0   # a delivery, as Postfix counts junk commands
        await self.push(status)
        if self.server.stopping and self.transport is not None:
            await self.push(self.guard.render(replies.make("SHUTDOWN")))

    async def _receive(self, message: MessageSpool) -> str | None:
        """Read the message up to the lone dot; None, or the error to reply."""
        timeout = self.server.config.server.data_timeout
        limit = self.data_size_limit
        loop = self.loop
        last_reset = loop.time()
        self._reset_timeout(timeout)
        size = 0
        error: str | None = None
        partial = False  # the previous read ended inside an over-long line
        readline = self._readline
        while self.transport is not None:
            try:
                line: bytes = await readline(b"\r\n")
            except asyncio.LimitOverrunError as e:
                # RFC 5321 §4.5.3.1.6: the line is too long; read it away and refuse at the end.
                line = await self._reader.read(e.consumed)
                error = error or "500 Line too long"
                partial = True
                continue
            if line == b".\r\n" and not partial:
                break
            partial = False
            size += len(line)
            now = loop.time()
            if now - last_reset > 1.0:
                # The timer restarts while data flows (checked once a second: cheap per line).
                self._reset_timeout(timeout)
                last_reset = now
            if error is not None:
                continue
            if limit and size > limit:
                error = "552 Error: Too much mail data"
                continue
            try:
                message.add_line(line[1:] if line[:1] == b"." else line)
            except OSError as e:
                event("spool.error", logging.ERROR, session=self.guard.client.session_id, error=str(e))
                error = self.guard.render(replies.make("INTERNAL", "cannot store the message now, try again later"))
        self._reset_timeout()
        return error

    def shutdown(self) -> None:
        """Graceful stop: 421 now unless in DATA, where the message may finish first."""
        if not self.in_data and self.transport is not None:
            try:
                self._writer.write((self.guard.render(replies.make("SHUTDOWN")) + "\r\n").encode("ascii"))
            except Exception:
                pass
            self.transport.close()


class Server:
    """The listeners of one process and the sessions they hold."""

    def __init__(self, config: Config, services: Any) -> None:
        self.services = services
        self._listen = config.server.listen
        self.sessions: set[GuardSMTP] = set()
        self.screens: set[Screen] = set()       # connections not yet handed to a session
        self.refusals: dict[str, int] = {}      # screen refusals per limit, for the log's counter
        self.stopping = False
        self.save_syn = False
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._prefix = secrets.token_hex(3)
        self._counter = itertools.count(1)
        self.tls_context = self._tls_context()
        self._tls_files = (config.server.tls_cert, config.server.tls_key)

    @property
    def config(self) -> Config:
        """The running config: a SIGHUP reload replaces it in the services."""
        return self.services.config  # type: ignore[no-any-return]

    def new_session_id(self) -> str:
        # Unique per process and start, short enough to grep: not guessable
        # across restarts, so it can sit in a resolution URL.
        return f"{self._prefix}{next(self._counter):06x}"

    def track(self, task: asyncio.Task[Any]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _tls_context(self) -> ssl.SSLContext | None:
        s = self.config.server
        if not (s.tls_cert and s.tls_key):
            return None
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(s.tls_cert, s.tls_key)
        # RFC 7435 opportunistic security: any client may encrypt; a port-25
        # server does not require client certificates.
        ctx.verify_mode = ssl.CERT_NONE
        # asyncio gives every TLS connection a 256 KiB read buffer (its
        # SSLProtocol.max_size): 290 KiB per idle STARTTLS session against
        # 11 KiB in plain text. One TLS record's worth is enough for SMTP.
        sslproto.SSLProtocol.max_size = TLS_READ_BUFFER
        return ctx

    def reload_tls(self) -> None:
        """A reload: read the certificate and key again, even at the same paths
        (renewed in place); new sessions use them, running ones keep theirs."""
        s = self.config.server
        context = self._tls_context()
        self._tls_files, self.tls_context = (s.tls_cert, s.tls_key), context

    def _protocol(self) -> Screen:
        """Every accepted connection starts in the screen."""
        return Screen(self)

    def session_protocol(self, handler: ClientSession) -> GuardSMTP:
        s = self.config.server
        if (s.tls_cert, s.tls_key) != self._tls_files:
            # a reload named other certificate files: new sessions use them
            self._tls_files = (s.tls_cert, s.tls_key)
            self.tls_context = self._tls_context()
        upstream = self.services.upstream
        mta_size = upstream.size_limit()
        return GuardSMTP(
            handler, self,
            hostname=s.hostname,
            ident="ESMTP smtpguard",
            # SIZE: the smaller of ours and the MTA's (RFC 1870); SMTPUTF8
            # only when the MTA takes it (RFC 6531): mirrored, never invented.
            data_size_limit=min(s.max_message_size, mta_size) if mta_size else s.max_message_size,
            enable_SMTPUTF8=upstream.offers("SMTPUTF8"),
            tls_context=self.tls_context,
            timeout=s.idle_timeout,
            auth_require_tls=True,
            auth_exclude_mechanism=["LOGIN", "PLAIN"],
            loop=asyncio.get_running_loop(),   # saves aiosmtpd looking it up through a deprecated path
        )

    def hand_over(self, transport: asyncio.BaseTransport, handler: ClientSession, buffered: bytes,
                  release: Callable[[], None] | None) -> GuardSMTP:
        """The screened client's session: aiosmtpd's protocol on the same transport.

        aiosmtpd greets (`220 <hostname> ESMTP smtpguard`: after the screen's
        `220-` line, the greeting's last one) and reads the bytes the client
        sent while it was screened, as if they had come now."""
        proto = self.session_protocol(handler)
        proto.release = release
        transport.set_protocol(proto)
        proto.connection_made(transport)
        if buffered:
            proto.data_received(buffered)
        return proto

    async def parse_proxy(self, header: bytes) -> tuple[str, int] | str | None:
        """A complete PROXY v1/v2 header: the client's (address, port); None for
        LOCAL, UNKNOWN and AF_UNIX (use the peer's address); a reason text when invalid.

        aiosmtpd's parser reads it; its result is not trusted as it is: a
        mapped IPv6 address is the IPv4 client (issue 19 item 7), an AF_UNIX
        address is bytes, never an IP (issue 9 item 3)."""
        reader = asyncio.StreamReader()
        reader.feed_data(header)
        reader.feed_eof()
        data = await get_proxy(reader)
        if not data.valid:
            return data.error or "malformed PROXY header"
        if data.version == 2 and data.command == V2_CMD.LOCAL:
            return None  # the balancer's own health check
        if data.family not in (AF.INET, AF.INET6) or data.protocol != PROTO.STREAM:
            return None  # UNKNOWN, UNSPEC, AF_UNIX: the peer's address stands
        ip = client_ip(data.src_addr) if isinstance(data.src_addr, (IPv4Address, IPv6Address)) else None
        port = data.src_port
        if ip is None or not isinstance(port, int) or not 0 <= port <= 65535:
            return "PROXY source address or port malformed"
        return ip, port

    @staticmethod
    def probe_free(host: str, port: int) -> None:
        """Issue 11 item 3: an address another process listens on is an error
        (exit 2), never shared by SO_REUSEPORT. A bind without SO_REUSEPORT
        fails on a listening socket whatever its options; our own workers
        skip this (the supervisor probed before forking)."""
        if port == 0:
            return
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        probe = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not a listener
            if family == socket.AF_INET6:
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            probe.bind((host, port))
        except OSError as e:
            where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
            if e.errno == errno.EADDRINUSE:
                raise ConfigError("server.listen", f"{where} is already in use by another process "
                                  "(only smtpguard's own workers share an address)") from None
            raise ConfigError("server.listen", f"cannot listen on {where}: {e.strerror}") from None
        finally:
            probe.close()

    def _listen_socket(self, host: str, port: int) -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # proto=IPPROTO_TCP: accepted sockets inherit it, and asyncio sets
        # TCP_NODELAY only on sockets that say they are TCP.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if hasattr(socket, "SO_REUSEPORT"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # not Linux ≥ 4.2: False, and the os fact will be unknown
            self.save_syn = fingerprint.enable_save_syn(sock) or self.save_syn
            sock.bind((host, port))
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    async def start(self) -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        # Learn the MTA's ESMTP extensions before the first client asks
        # (mirrored in our EHLO); a slow MTA does not hold up the listeners.
        # IPv6 clients may come on an IPv6 listener or through a PROXY header.
        ipv6 = self.config.server.proxy_protocol or any(":" in host for host, _ in self._listen)
        probe = loop.create_task(self.services.upstream.probe(ipv6=ipv6))
        self.track(probe)
        await asyncio.wait({probe}, timeout=PROBE_WAIT)
        bound: list[tuple[str, int]] = []
        if not getattr(self.services, "own_workers", False):
            for host, port in self._listen:
                self.probe_free(host, port)
        for host, port in self._listen:
            sock = self._listen_socket(host, port)
            srv = await loop.create_server(self._protocol, sock=sock)
            self._servers.append(srv)
            bound.append(sock.getsockname()[:2])
        event("listening", addresses=" ".join(f"{h}:{p}" for h, p in bound),
              upstream=f"{self.config.upstream.host}:{self.config.upstream.port}")
        return bound

    async def stop(self) -> None:
        """Stop listening; let sessions in DATA finish within the grace period; 421 the rest."""
        self.stopping = True
        for srv in self._servers:
            srv.close()
        for screen in list(self.screens):
            screen.shutdown()
        for sess in list(self.sessions):
            sess.shutdown()
        deadline = asyncio.get_running_loop().time() + self.config.server.grace_period
        while self.sessions and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)  # polling a condition with a deadline, not synchronisation by sleep
            for sess in list(self.sessions):
                if not sess.in_data:
                    sess.shutdown()
        for sess in list(self.sessions):
            sess.in_data = False
            sess.shutdown()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        event("stopped", sessions_left=len(self.sessions))


async def serve(config: Config, services: Any, ready: "asyncio.Future[list[tuple[str, int]]] | None" = None) -> None:
    """Run until SIGTERM/SIGINT; SIGHUP asks the services to reload."""
    await services.start()  # may raise ConfigError: nothing is listening yet
    server = Server(config, services)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    # Signal handlers before the listeners: a SIGHUP that arrives as soon as
    # the port answers (a reload right after start) must reload, not kill.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if hasattr(services, "reload_hooks"):
        services.reload_hooks.append(server.reload_tls)
    if hasattr(services, "reload"):
        loop.add_signal_handler(signal.SIGHUP, lambda: server.track(loop.create_task(services.reload())))
    bound = await server.start()
    http = None
    if services.config.http.listen is not None:   # issue 12: page, metrics and health in this loop
        from smtpguard.observe import http as observe_http
        http = await observe_http.start(services, server)
    if ready is not None and not ready.done():
        ready.set_result(bound)
    housekeeping = loop.create_task(_housekeeping(services, stop))
    try:
        await stop.wait()
    finally:
        event("stopping", pid=os.getpid(), sessions=len(server.sessions))
        await server.stop()
        if http is not None:
            await http.stop()
        housekeeping.cancel()
        await services.close()


async def _housekeeping(services: Any, stop: asyncio.Event) -> None:
    """Timers that never run inside a client's session (DESIGN.md)."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), timeout=1.0)
        except asyncio.TimeoutError:
            pass
        try:
            await services.housekeeping()
        except Exception:
            event("housekeeping.error", logging.ERROR, exc_info=True)
