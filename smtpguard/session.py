"""One client's session: the orchestrator (DESIGN.md's one data path).

At each stage (connect, helo, mail, rcpt, data) the session asks the fact
sources for what that stage needs (concurrently, within one deadline), asks
the pure policy for a verdict, and either writes the proxy's own reply or
carries the command to the upstream MTA and forwards the MTA's reply. It is
the only place that calls sources, policy and upstream, in stage order.

Connection state (facts, HELO, TLS, the policy's sticky verdicts) is kept
apart from transaction state (sender, recipients, the upstream
transaction): RSET and the end of DATA clear the latter only (STYLE.md §12).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import time
from email.utils import formatdate
from typing import Any, Awaitable, Callable, Protocol

from smtpguard.adapters.spool import MessageSpool
from smtpguard.adapters.upstream import ClientIdentity, Transaction, Upstream, UpstreamReply
from smtpguard.config import Config
from smtpguard.core import reply as replies
from smtpguard.core.address import (Recipient, Refused, check_recipient, has_control, is_ehlo_argument, is_hostname,
                                    is_sender_domain, normalise_domain)
from smtpguard.core.facts import ClientInfo, FactValue
from smtpguard.core.policy import ACCEPT_SCOPE, Verdict, reply_code
from smtpguard.errors import UpstreamError
from smtpguard.observe.log import event
from smtpguard.observe.replay import Trail, close_fields
from smtpguard.sources import dkim
from smtpguard.sources.dkim import DkimFact

# HELO/EHLO per session: a client greets once, again after STARTTLS, and
# perhaps once more after RSET; 25,000 EHLOs on one connection were seen
# driving DNS lookups to names the client chose.
MAX_HELO = 5
# How much of a message data-stage sources may read into memory (DKIM, whose
# library verifies a whole message in memory, about five times its size at
# the peak): a larger message is relayed without our DKIM verdict, and its
# memory stays the spool's (the MTA behind can still verify it).
CONTENT_LIMIT = 4 * 1000 * 1000
# When the upstream transaction fails after recipients were told 250, it is
# rebuilt (MAIL and those recipients again) at most this often; after that
# the client is told (451) rather than kept waiting on a failing MTA.
MAX_REBUILDS = 1
LOST_TEXT = ("the mail server behind this gateway lost the transaction; "
             "send the message again later")


# A MAIL FROM domain Postfix's valid_hostname() refuses (core.address.is_sender_domain).
BAD_SENDER = replies.Reply(501, "5.1.7", "BAD-ADDRESS", "bad sender address syntax")
# RFC 6531 §3.4: a UTF-8 address outside an SMTPUTF8 transaction.
UTF8_WITHOUT_SMTPUTF8 = replies.Reply(553, "5.6.7", "NO-SMTPUTF8",
                                      "a UTF-8 address needs the SMTPUTF8 parameter on MAIL FROM")


class TransactionLost(Exception):
    """The upstream transaction failed and the accepted recipients could not be carried over."""

class Services(Protocol):
    """Per-process shared parts: config, upstream pool, fact sources, policy."""

    config: Config
    upstream: Upstream

    async def facts(self, stage: str, session: "ClientSession") -> dict[str, FactValue]: ...

    def decide(self, stage: str, facts: dict[str, FactValue], pending: Verdict | None = None) -> Verdict: ...

    async def graylist(self, session: "ClientSession", rcpt: str, strict: bool) -> dict[str, FactValue]: ...

    async def trap(self, session: "ClientSession", rcpt: str) -> dict[str, FactValue]: ...


class ClientSession:
    """One connection's decisions and relay, in SMTP's terms only: commands
    in, reply lines out (server.py adapts aiosmtpd to it; `smtpguard check`
    drives the same stage methods without a socket)."""

    def __init__(self, services: Services, client: ClientInfo) -> None:
        self.services = services
        self.config = services.config
        self.client = client
        self.started = time.monotonic()
        self.facts: dict[str, FactValue] = {"ip": client.ip, "port": client.port, "tls": False}
        self.helo = ""
        self.esmtp = False
        self.tls_info = ""
        # The fact sources' results by source name (services' stage loop fills
        # it; later sources read it): the DNS lists' text for a DNSBL reply,
        # the message's DKIM results for the Authentication-Results header.
        self.source_results: dict[str, Any] = {}
        self.dns_budget: Any = None             # services: this session's DNS lookups spend it
        # sticky policy state for the connection
        self.accepted_by: str | None = None     # a session-scoped `accept` rule: later rules skipped
        self.txn_accepted_by: str | None = None # a transaction-scoped one (MAIL stage)
        self.pending: Verdict | None = None     # a refusal held back to RCPT (reject_at)
        self.tarpit = 0.0
        self.banner_refusal: replies.Reply | None = None  # a 554 greeting was given
        self.dropped = False                    # a connect-stage `drop`: the screen closes
        self.helos = 0
        self.dsn_params: list[str] = []        # RFC 3461 parameters of the command being handled, verbatim
        # transaction state
        self.sender: str | None = None
        self.mail_options: list[str] = []
        self.txn: Transaction | None = None
        # Recipients told 250 in this transaction, with their options: the
        # invariant is that the upstream transaction that takes the message
        # has accepted every one of them (DESIGN.md: relay in real time).
        self.accepted: list[tuple[str, list[str]]] = []
        self.lost = False                       # the upstream transaction could not be rebuilt
        self.rebuilds = 0
        self.message: MessageSpool | None = None  # the message, during the data stage
        # counters for the summary line
        self.messages = 0
        self.refusals = 0
        self.last_reason = ""
        self.verbatim: str | None = None  # the upstream reply being forwarded as is
        # Every decision with the facts it saw, when a list: `smtpguard check` reads them.
        self.decisions: list[tuple[str, Verdict, dict[str, FactValue]]] | None = None
        self.pause: Callable[[float], Awaitable[None]] = asyncio.sleep  # the tarpit's; check waits for nothing
        self.trail: Trail | None = None   # every decision's facts, for the close line (report and replay)

    @property
    def content(self) -> bytes | None:
        """The whole message for data-stage sources, when small enough to hold."""
        return self.message.read(CONTENT_LIMIT) if self.message is not None else None

    # --- replies -------------------------------------------------------

    def url_context(self, rcpt: str = "") -> dict[str, str]:
        return {"ip": self.client.ip, "helo": self.helo, "sender": self.sender or "",
                "rcpt": rcpt, "session": self.client.session_id}

    def render(self, reply: replies.Reply, rcpt: str = "") -> str:
        return replies.render(reply, self.config.server.resolution_url, self.url_context(rcpt))

    def refuse(self, stage: str, reply: replies.Reply, rcpt: str = "", rule: str | None = None,
               action: str = "reject") -> str:
        line = self.render(reply, rcpt)
        self.refusals += 1
        self.last_reason = reply.reason
        event("reject" if reply.code >= 500 else "defer", logging.INFO,
              session=self.client.session_id, ip=self.client.ip, port=self.client.port,
              stage=stage, action=action, reason=reply.reason, rule=rule,
              sender=self.sender, rcpt=rcpt, reply=line)
        return line

    def forward(self, r: UpstreamReply) -> str:
        self.verbatim = r.wire()
        return self.verbatim

    # --- policy --------------------------------------------------------

    async def run_stage(self, stage: str) -> Verdict | None:
        """Gather the stage's facts, then decide; None when an accept rule already holds."""
        self.facts.update(await self.services.facts(stage, self))
        if self.accepted_by or (self.txn_accepted_by and stage != "connect"):
            return None
        return self.decide(stage)

    def decide(self, stage: str) -> Verdict:
        verdict = self.services.decide(stage, self.facts, self.pending)
        if self.decisions is not None:
            self.decisions.append((stage, verdict, dict(self.facts)))
        # Every fact this decision saw, for the close line (report and replay).
        trail = self.trail
        if trail is None:
            trail = self.trail = Trail()
        trail.record(stage, self.facts, verdict, [a for a, _ in self.accepted], self.messages)
        for rule, action, reason in verdict.observed:
            event("observe", session=self.client.session_id, ip=self.client.ip, stage=stage,
                  rule=rule, would=action, reason=reason, sender=self.sender, rcpt=self.facts.get("rcpt"))
        self.tarpit = max(self.tarpit, verdict.delay)
        if verdict.action == "accept" and verdict.sticky:
            if ACCEPT_SCOPE[stage] == "session":
                self.accepted_by = verdict.rule
                self.pending = None
            else:
                self.txn_accepted_by = verdict.rule
            event("accept", session=self.client.session_id, ip=self.client.ip, stage=stage,
                  rule=verdict.rule, scope=ACCEPT_SCOPE[stage])
        elif verdict.deferred_to and verdict is not self.pending and self.pending is None:
            self.pending = verdict
            event("reject.deferred", session=self.client.session_id, ip=self.client.ip, stage=stage,
                  rule=verdict.rule, reason=verdict.reason, until=verdict.deferred_to)
        return verdict

    @staticmethod
    def refuses_now(verdict: Verdict | None) -> bool:
        # `drop` (521, then the server closes) is never held back
        return verdict is not None and verdict.action in ("reject", "tempfail", "drop") and not verdict.deferred_to

    def verdict_reply(self, verdict: Verdict, stage: str) -> replies.Reply:
        code, enhanced = reply_code(verdict.action, verdict.reason, stage) or (550, "5.7.1")
        text = verdict.text or replies.REASONS.get(verdict.reason, replies.REASONS["POLICY"])[2]
        listed = getattr(self.source_results.get("dnsbl"), "text", "")
        if verdict.reason == "DNSBL" and listed:
            text = f"{text}: {listed}"     # "listed by zen.spamhaus.org (127.0.0.2)"
        return replies.Reply(code, enhanced, verdict.reason, text)

    async def slow(self) -> None:
        if self.tarpit:
            await self.pause(self.tarpit)  # spamd-style stuttering: a deliberate delay, not synchronisation

    # --- stages ---------------------------------------------------------
    # Each `screen_*` runs one stage's facts and policy and says whether the
    # command may go on (None, or the recipient) or what the client is told;
    # a live session and `smtpguard check` run exactly these.

    async def on_connect(self, pregreet: "bool | Awaitable[bool] | None" = None) -> str | None:
        """The connect stage, run by the screen before the greeting's last line.

        `pregreet` is the early-talker test: its result, or an awaitable that
        gives it when the wait is over (the connect-stage lookups run
        meanwhile), or None when the client was not tested (the fact stays
        unknown). A line returned is the screen's answer instead of the
        greeting: 521 and close when `dropped`, else 554 or 421 (RFC 5321 §3.1)."""
        event("connect", logging.DEBUG, session=self.client.session_id, ip=self.client.ip, port=self.client.port)
        self.facts.update(await self.services.facts("connect", self))
        if pregreet is not None:
            self.facts["pregreet"] = pregreet if isinstance(pregreet, bool) else await pregreet
        verdict = None if self.accepted_by else self.decide("connect")
        await self.slow()
        if verdict is not None and verdict.action == "drop":
            # postscreen's drop: 521 and close, never held back
            self.dropped = True
            return self.refuse("connect", self.verdict_reply(verdict, "connect"), rule=verdict.rule,
                               action="drop")
        if verdict is not None and self.refuses_now(verdict):
            # RFC 5321 §3.1: 554 in place of the greeting (421 for a tempfail, §4.3.2)
            self.banner_refusal = self.verdict_reply(verdict, "connect")
            return self.refuse("connect", self.banner_refusal, rule=verdict.rule, action=verdict.action)
        return None

    def refused_session(self) -> str | None:
        """After a 554 greeting every command but QUIT gets 503 (RFC 5321 §3.1)."""
        if self.banner_refusal is None:
            return None
        r = self.banner_refusal
        return self.render(replies.Reply(503, "5.5.1", r.reason, r.text))

    async def screen_helo(self, hostname: str, esmtp: bool) -> str | None:
        """HELO/EHLO: a refusal line, or None and the greeting stands."""
        refused = self.refused_session()
        if refused:
            return refused
        self.helos += 1
        if self.helos > MAX_HELO:
            return self.refuse("helo", replies.make("HELO-LIMIT"))
        self.helo = hostname
        self.esmtp = esmtp
        self.facts["helo"] = hostname
        self._reset_transaction()
        verdict = await self.run_stage("helo")
        await self.slow()
        if self.refuses_now(verdict):
            assert verdict is not None
            return self.refuse("helo", self.verdict_reply(verdict, "helo"), rule=verdict.rule, action=verdict.action)
        return None

    async def screen_mail(self, address: str, options: list[str]) -> str | None:
        """MAIL: a refusal line, or None and the sender is taken (nothing goes
        upstream before the first accepted recipient)."""
        refused = self.refused_session()
        if refused:
            return refused
        self._reset_transaction()
        options = list(options) + self.dsn_params
        self.dsn_params = []
        if has_control(address) or any(has_control(o) for o in options):
            return self.refuse("mail", replies.for_recipient("BAD-ADDRESS", code=501))
        if not address.isascii() and "SMTPUTF8" not in options:
            return self.refuse("mail", UTF8_WITHOUT_SMTPUTF8)
        sender = "" if address == "<>" else address
        if sender and not is_sender_domain(sender.rpartition("@")[2]):
            # Refused here, as Postfix does at MAIL, not as the MTA's refusal of
            # our MAIL answered to every RCPT.
            return self.refuse("mail", BAD_SENDER)
        self.sender = sender
        self.mail_options = options
        self.facts["sender"] = sender
        self.facts["sender_domain"] = normalise_domain(sender.rpartition("@")[2]) if "@" in sender else ""
        verdict = await self.run_stage("mail")
        await self.slow()
        if self.refuses_now(verdict):
            assert verdict is not None
            self.sender = None
            return self.refuse("mail", self.verdict_reply(verdict, "mail"), rule=verdict.rule, action=verdict.action)
        return None

    async def mail(self, address: str, options: list[str]) -> str:
        return await self.screen_mail(address, options) or "250 2.1.0 OK"

    async def screen_rcpt(self, address: str, options: list[str]) -> str | tuple[Recipient, list[str]]:
        """RCPT: a refusal line, or the recipient and its options, to be relayed."""
        refused = self.refused_session()
        if refused:
            return refused
        options = list(options) + self.dsn_params
        self.dsn_params = []
        if not address.isascii() and "SMTPUTF8" not in self.mail_options:
            return self.refuse("rcpt", UTF8_WITHOUT_SMTPUTF8, address)
        limits = self.config.server
        if len(self.accepted) >= limits.max_recipients:
            return self.refuse("rcpt", replies.make("RCPT-LIMIT"), address)
        checked = check_recipient(address, limits.served)
        if isinstance(checked, Refused):
            return self.refuse("rcpt", replies.for_recipient(checked.reason, checked.domain, checked.code),
                               address, rule=checked.reason.lower())
        if any(has_control(o) for o in options):
            return self.refuse("rcpt", replies.for_recipient("BAD-ADDRESS", code=501), address)
        self.facts["rcpt"] = checked.address
        self.facts["rcpt_domain"] = checked.domain
        # The graylist fact belongs to one recipient.
        for key in ("graylist", "graylist_wait", "graylist_error", "graylist_on_error"):
            self.facts.pop(key, None)
        verdict = await self.run_stage("rcpt")
        if verdict is not None and "graylist" in verdict.needs:
            self.facts.update(await self.services.graylist(self, checked.address, verdict.strict))
            verdict = self.decide("rcpt")
        await self.slow()
        if verdict is not None:
            if self.refuses_now(verdict):
                return self.refuse("rcpt", self.verdict_reply(verdict, "rcpt"), address, rule=verdict.rule,
                                   action=verdict.action)
            if verdict.action == "graylist":
                refused = self.graylisted(verdict, checked)
                if refused is not None:
                    return refused
            elif verdict.action != "accept":
                # Spamtraps hold for every client, graylisted or not (spamd's greytrapping).
                self.facts.update(await self.services.trap(self, checked.address))
                if self.facts.get("graylist") == "trapped":
                    return self.refuse("rcpt", replies.make("TRAP"), address, rule="trap")
        return checked, options

    async def rcpt(self, address: str, options: list[str]) -> str:
        """RCPT: our refusal, or the MTA's reply to the recipient (relayed in real time)."""
        screened = await self.screen_rcpt(address, options)
        if isinstance(screened, str):
            return screened
        return await self.relay_rcpt(address, screened[1])

    def graylisted(self, verdict: Verdict, rcpt: Recipient) -> str | None:
        """The reply for a recipient the graylist has not passed (postgrey/spamd semantics)."""
        state = self.facts.get("graylist")
        if state == "trapped":
            return self.refuse("rcpt", replies.make("TRAP"), rcpt.address, rule=verdict.rule)
        if state == "unknown":
            if self.facts.get("graylist_on_error") == "accept":
                event("graylist.store_error", logging.WARNING, session=self.client.session_id,
                      ip=self.client.ip, action="accept", error=self.facts.get("graylist_error"))
                return None
            event("graylist.store_error", logging.ERROR, session=self.client.session_id,
                  ip=self.client.ip, action="tempfail", error=self.facts.get("graylist_error"))
            return self.refuse("rcpt", replies.make("GRAYLIST-STORE"), rcpt.address, rule=verdict.rule,
                               action="tempfail")
        wait = self.facts.get("graylist_wait")
        wait = wait if isinstance(wait, int) else 0
        reply = replies.make("GRAYLIST", f"graylisted, try again in {wait} seconds" if wait else None)
        line = self.render(reply, rcpt.address)
        self.refusals += 1
        self.last_reason = "GRAYLIST"
        event("graylist.defer", session=self.client.session_id, ip=self.client.ip, rule=verdict.rule,
              state=state, sender=self.sender, rcpt=rcpt.address, wait=wait, reply=line)
        return line

    def _identity(self) -> ClientIdentity:
        rdns = self.facts.get("rdns")
        ptr = str(self.facts.get("rdns_name") or "") if rdns in ("confirmed", "unconfirmed") else ""
        return ClientIdentity(self.client.ip, ptr if rdns == "confirmed" else "", self.helo, self.esmtp,
                              reverse_name=ptr, lookup_failed=rdns == "unknown")

    async def _open_transaction(self) -> UpstreamReply:
        """The upstream transaction for this client's, opened or rebuilt; the MTA's MAIL reply.

        After a failure, or when the MTA closed the connection while the
        client was slow, the new transaction carries MAIL and every recipient
        already told 250 (each accepted again by the MTA), or TransactionLost.
        """
        txn = self.txn
        idle_closed = txn is not None and txn.open and not txn.alive
        if idle_closed:
            # The MTA closed the connection while the client took its time:
            # Postfix's smtpd_timeout (300 s) runs out during a long, steady
            # upload, after which every DATA of that message failed (451),
            # so a large message over a slow link was never delivered. Not
            # an MTA fault: the rebuild does not count against MAX_REBUILDS.
            event("relay.idle_closed", session=self.client.session_id, ip=self.client.ip,
                  rcpts=len(self.accepted))
            self._drop_transaction()
        elif txn is not None and txn.mail_reply is not None and (txn.open or not txn.mail_reply.ok):
            return txn.mail_reply
        if self.accepted and not idle_closed:
            if self.rebuilds >= MAX_REBUILDS:
                raise TransactionLost
            self.rebuilds += 1
        txn = self.txn = Transaction(self.services.upstream, self._identity())
        mail = await txn.begin(self.sender or "", self.mail_options)
        if not mail.ok:
            event("relay.mail_refused", session=self.client.session_id, ip=self.client.ip,
                  sender=self.sender, code=mail.code, text=mail.text)
            if self.accepted:
                raise TransactionLost
            return mail
        for address, options in self.accepted:
            r = await txn.rcpt(address, options)
            if not r.ok:
                raise TransactionLost
        if self.accepted:
            event("relay.rebuilt", logging.INFO if idle_closed else logging.WARNING,
                  session=self.client.session_id, ip=self.client.ip, rcpts=len(self.accepted))
        return mail

    def _drop_transaction(self) -> None:
        """The upstream connection's state is unknown: close it; the accepted recipients stay."""
        txn, self.txn = self.txn, None
        if txn is not None:
            txn.abort()

    def _lose_transaction(self, stage: str, rcpt: str = "") -> str:
        self._drop_transaction()
        self.lost = True
        event("relay.lost", logging.WARNING, session=self.client.session_id, ip=self.client.ip,
              rcpts=len(self.accepted))
        return self.refuse(stage, replies.make("UPSTREAM", LOST_TEXT), rcpt)

    async def relay_rcpt(self, address: str, options: list[str]) -> str:
        """Mirror the RCPT on the upstream and forward its reply (DESIGN.md: relay in real time)."""
        if self.lost:
            return self.refuse("rcpt", replies.make("UPSTREAM", LOST_TEXT), address)
        try:
            mail = await self._open_transaction()
            if not mail.ok:
                # The MTA refused the sender: every recipient gets its answer.
                return self.forward(mail)
            assert self.txn is not None
            r = await self.txn.rcpt(address, options)
        except TransactionLost:
            return self._lose_transaction("rcpt", address)
        except UpstreamError as e:
            self._drop_transaction()
            return self.refuse("rcpt", replies.make(e.reason), address)
        if r.ok:
            self.accepted.append((address, options))
        else:
            event("relay.rcpt_refused", session=self.client.session_id, ip=self.client.ip,
                  sender=self.sender, rcpt=address, code=r.code, text=r.text)
        return self.forward(r)

    def data_refusal(self) -> str | None:
        """At the DATA command: a transaction already lost is refused before the client sends it."""
        if self.lost:
            return self.refuse("data", replies.make("UPSTREAM", LOST_TEXT))
        return None

    async def on_data(self, message: MessageSpool) -> str:
        """The end of DATA: the data stage, then the message to the MTA; its reply, or ours."""
        self.message = message
        try:
            return await self._data(message)
        finally:
            self.message = None
            self.source_results.pop("dkim", None)   # the next message's own
            self._reset_transaction()

    async def _data(self, message: MessageSpool) -> str:
        verdict = await self.run_stage("data")
        await self.slow()
        if self.refuses_now(verdict):
            assert verdict is not None
            return self.refuse("data", self.verdict_reply(verdict, "data"), rule=verdict.rule, action=verdict.action)
        if self.lost:
            return self.refuse("data", replies.make("UPSTREAM", LOST_TEXT))
        try:
            mail = await self._open_transaction()
        except TransactionLost:
            return self._lose_transaction("data")
        except UpstreamError as e:
            self._drop_transaction()
            return self.refuse("data", replies.make(e.reason))
        txn = self.txn
        if not mail.ok or txn is None or not txn.open:
            return self.refuse("data", replies.make("UPSTREAM", LOST_TEXT))
        told = [address for address, _ in self.accepted]
        if collections.Counter(told) != collections.Counter(txn.rcpts):
            # The invariant: a 250 at the end of DATA covers every recipient
            # that was told 250. Never reached unless a path above is wrong.
            event("relay.invariant", logging.ERROR, session=self.client.session_id, ip=self.client.ip,
                  told=len(told), upstream=len(txn.rcpts))
            return self._lose_transaction("data")
        # RFC 8601 §5: Authentication-Results claiming our authserv-id are
        # forgeries and go; ours, with each signature's result, is added.
        authserv = dkim.authserv(self.config.dkim, self.config.server.hostname)
        headers = dkim.strip_authentication_results(message.headers, authserv)
        trace = self.received_header(told)
        verified: DkimFact | None = self.source_results.get("dkim")
        if verified is not None:
            trace += dkim.authentication_results(authserv, verified)
        relay_started = time.monotonic()
        try:
            r = await txn.data(message.blocks(headers=headers, prefix=trace))
        except UpstreamError as e:
            self.txn = None
            return self.refuse("data", replies.make(e.reason))
        self.txn = None
        if r.ok:
            self.messages += 1
            event("relay.accepted", session=self.client.session_id, ip=self.client.ip,
                  size=message.size, rcpts=len(told), reply=r.text.split("\n")[-1],
                  seconds=round(time.monotonic() - relay_started, 4))
        else:
            event("relay.refused", session=self.client.session_id, ip=self.client.ip,
                  size=message.size, code=r.code, reply=r.text.split("\n")[-1],
                  seconds=round(time.monotonic() - relay_started, 4))
        return self.forward(r)

    async def rset(self) -> str:
        self._reset_transaction()
        return "250 2.0.0 OK"

    @staticmethod
    def vrfy(address: str) -> str:
        # RFC 5321 §3.5.3: 252 when the server will not verify; never a callout.
        return "252 2.1.5 Cannot VRFY user, but will accept message and attempt delivery"

    async def quit(self) -> str:
        self._reset_transaction()
        return "221 2.0.0 Bye"

    async def internal_error(self, error: Exception) -> str:
        # No exception text ever reaches a client (DESIGN.md).
        event("internal_error", logging.ERROR, exc_info=True, session=self.client.session_id,
              ip=self.client.ip, error=type(error).__name__)
        txn, self.txn = self.txn, None
        if txn is not None:
            txn.abort()  # its state is unknown: never reuse the connection
        return self.render(replies.make("INTERNAL"))

    def _reset_transaction(self) -> None:
        self.sender = None
        self.txn_accepted_by = None
        self.mail_options = []
        self.accepted = []
        self.lost = False
        self.rebuilds = 0
        txn, self.txn = self.txn, None
        if txn is not None:
            txn.reset()   # QUIT in the background: nothing to wait for

    async def on_close(self) -> None:
        trail = self.trail
        if trail is not None:
            trail.settle("close", [a for a, _ in self.accepted], self.messages)
        self._reset_transaction()
        digest = " ".join(f"{k}={v}" for k, v in self.facts.items()
                          if k in ("country", "os", "rdns", "dnsbl_score", "graylist") and v not in (None, ""))
        event("close", session=self.client.session_id, ip=self.client.ip, port=self.client.port,
              helo=self.helo, duration=round(time.monotonic() - self.started, 3),
              messages=self.messages, refusals=self.refusals, reason=self.last_reason or None,
              rule=self.accepted_by, facts=digest or None, **close_fields(trail))

    # --- trace ------------------------------------------------------------

    def received_header(self, rcpts: list[str]) -> bytes:
        """RFC 5321 §4.4 trace: the real client, as the MTA behind cannot see it."""
        # Strangers' names go into the header only when they are valid host
        # names; otherwise the client is named by its address literal, the
        # form RFC 5321 §4.4 allows, and a reader of the first [ip] finds the
        # real one (a HELO with spaces and brackets could mislead it).
        ip = self.client.ip
        literal = f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"
        helo = self.helo if self.helo and is_ehlo_argument(self.helo) else ""
        rdns = str(self.facts.get("rdns_name") or "") if self.facts.get("rdns") == "confirmed" else ""
        host = rdns.rstrip(".") if rdns and is_hostname(rdns) else "unknown"
        note = ""
        if self.helo and not helo:
            note = " helo=" + re.sub(r"[^A-Za-z0-9.:_-]", "_", self.helo[:64])
        utf8 = "SMTPUTF8" in self.mail_options
        proto = ("UTF8SMTP" if utf8 else "ESMTP") if self.esmtp else "SMTP"  # RFC 6531 §4.3
        proto += "S" if self.tls_info else ""
        tls = f"\r\n\t(using {self.tls_info})" if self.tls_info else ""
        for_clause = f"\r\n\tfor <{replies.clean(rcpts[0], 256)}>" if len(rcpts) == 1 else ""
        header = (f"Received: from {helo or literal} ({host} {literal}{note}){tls}\r\n"
                  f"\tby {self.config.server.hostname} (smtpguard) with {proto} id {self.client.session_id}"
                  f"{for_clause};\r\n\t{trace_date()}\r\n")
        return header.encode("utf-8", "surrogateescape") if utf8 else header.encode("ascii", "replace")


_DATE: list[Any] = [None, ""]   # the second and its RFC 5322 date-time


def trace_date(now: float | None = None) -> str:
    """The Received: date in local time (RFC 5322 §3.3), formatted once per
    second: time-zone arithmetic is a measurable part of a relayed message's
    CPU (issue 15)."""
    second = int(time.time() if now is None else now)
    if _DATE[0] != second:
        _DATE[0], _DATE[1] = second, formatdate(second, localtime=True)
    return str(_DATE[1])
