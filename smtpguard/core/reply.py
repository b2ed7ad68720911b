"""Every reply that smtpguard itself writes is built here (DESIGN.md).

Decides: the wire text of a refusal, deferral or local error.
Inputs: a reason code (REASONS below), optional explanation, the resolution
URL template and the session's context (ip, helo, sender, rcpt, session).
Output: `Reply`, rendered as `<code> <enhanced> [<REASON>] <text> <URL>`.
Failure modes: none; client-supplied strings are stripped of control
characters and the line is bounded (RFC 5321 §4.5.3.1.5: 512 octets).
Defaults: the codes of RFC 5321 §4.2 and enhanced codes of RFC 3463.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping
from urllib.parse import quote

# RFC 5321 §4.5.3.1.5: a reply line is at most 512 octets including CRLF.
MAX_REPLY_LINE = 510
# Room left for client-supplied text (domains, addresses) inside a reply.
MAX_FIELD = 100

# reason code -> (code, enhanced code, default text). Codes from RFC 5321
# §4.2.2/§4.2.3, enhanced codes from RFC 3463 §3.
REASONS: dict[str, tuple[int, str, str]] = {
    # the relay and its limits (issue: foundation)
    "RELAY": (550, "5.7.1", "relaying is not allowed here"),
    "BAD-ADDRESS": (553, "5.1.3", "this address form is not accepted here"),
    "SIZE": (552, "5.3.4", "message size exceeds the limit"),
    "RCPT-LIMIT": (452, "4.5.3", "too many recipients, send the rest in another transaction"),
    "UPSTREAM": (451, "4.4.1", "the mail server behind this gateway is unavailable, try again later"),
    "UPSTREAM-TIMEOUT": (451, "4.4.2", "the mail server behind this gateway did not answer in time, try again later"),
    "ERRORS": (421, "4.7.0", "too many errors in this session, closing"),
    "IDLE": (421, "4.4.2", "idle for too long, closing"),
    "SHUTDOWN": (421, "4.3.2", "service shutting down, try again later"),
    "INTERNAL": (451, "4.3.0", "internal error, try again later"),
    "NO-AUTH": (502, "5.5.1", "no authentication on this port: submit mail through your provider's submission service"),
    "LINE-TOO-LONG": (500, "5.5.2", "line too long (RFC 5321 section 4.5.3.1)"),
    "DATA-LINE-TOO-LONG": (500, "5.6.0", "message has a line longer than 998 characters (RFC 5322 section 2.1.1)"),
    "SYNTAX": (501, "5.5.4", "syntax error"),
    "REFUSED": (503, "5.5.1", "this session has been refused"),
    "SEQUENCE": (503, "5.5.1", "bad sequence of commands"),
    # RFC 6531 §3.5 / RFC 3463 5.6.7: a UTF-8 address where SMTPUTF8 is not in force.
    "NO-SMTPUTF8": (553, "5.6.7", "UTF-8 addresses need SMTPUTF8"),
    # RFC 5321 §4.1.4 allows a repeated EHLO; hundreds of them are an attack
    # on the DNS lookups each one starts.
    "HELO-LIMIT": (421, "4.7.0", "too many HELO/EHLO commands in this session"),
    # policy (issue: policy)
    "POLICY": (550, "5.7.1", "refused by local policy"),
    "GEO": (550, "5.7.1", "mail from this country is not accepted here"),
    "GEO-OS": (550, "5.7.1", "mail from this kind of host in this country is not accepted here"),
    "OS-RDNS": (550, "5.7.1", "mail from a desktop host without a mail server's reverse DNS is not accepted"),
    # 5.7.25: "reverse DNS validation failed" (RFC 7372 §3.3)
    "RDNS": (550, "5.7.25", "the client address has no reverse DNS"),
    "DNSBL": (550, "5.7.1", "the client address is listed by a DNS blocklist"),
    "HELO-FORGED": (550, "5.7.1", "the client claims to be this server in HELO"),
    "DNS-TEMP": (451, "4.4.3", "a DNS lookup failed, try again later"),
    "TEMP": (451, "4.7.1", "temporarily refused by local policy, try again later"),
    # graylisting (issue: graylisting)
    "GRAYLIST": (451, "4.7.1", "graylisted, try again later"),
    "GRAYLIST-STORE": (451, "4.3.0", "the graylist store is unavailable, try again later"),
    "TRAP": (550, "5.7.1", "this client sent mail to a spam trap"),
    # the screen (issue: the screen): postscreen's replies
    "PREGREET": (550, "5.5.1", "protocol error: the client talked before the greeting"),
    # RFC 3463 §3.8 X.7.0 for one client over its limit (the screen writes
    # X.3.2 "system not accepting network messages" when the process is full).
    "BUSY": (421, "4.7.0", "too many connections from your address, try again later"),
    "RATE": (421, "4.7.0", "too many connections from your address in the last minute, try again later"),
}

_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")


@dataclass(frozen=True, slots=True)
class Reply:
    """One reply of the proxy's own: never an exception text, never client bytes unescaped."""

    code: int
    enhanced: str
    reason: str
    text: str


def clean(value: str, limit: int = MAX_FIELD) -> str:
    """Client-supplied text fit for a reply or a log line: no control characters, bounded."""
    value = _CONTROL.sub("?", value)
    if len(value) > limit:
        value = value[: limit - 3] + "..."
    return value


def make(reason: str, text: str | None = None, *, code: int | None = None,
         enhanced: str | None = None) -> Reply:
    """The reply for a reason code, with the table's code and text unless overridden."""
    base_code, base_enhanced, base_text = REASONS.get(reason, REASONS["POLICY"])
    return Reply(code or base_code, enhanced or base_enhanced, reason, text or base_text)


def for_recipient(reason: str, domain: str = "", code: int | None = None) -> Reply:
    """The refusal of a RCPT address (core.address.Refused), the same in a session and in `check`."""
    if reason == "RELAY":
        return make("RELAY", f"relay to {clean(domain) or 'another host'} is not allowed here")
    if code == 501:
        return make(reason, "the address contains control characters", code=501)
    return make(reason)


def resolution_url(template: str, context: Mapping[str, str]) -> str:
    """Fill `{code} {ip} {helo} {sender} {rcpt} {session}`, each URL-encoded.

    Unknown placeholders stay literally (validated at config load), so a
    template can never raise here.
    """
    if not template:
        return ""
    out = template
    for key in ("code", "ip", "helo", "sender", "rcpt", "session"):
        token = "{" + key + "}"
        if token in out:
            out = out.replace(token, quote(clean(context.get(key, ""), 256), safe=""))
    return out


def render(reply: Reply, url_template: str = "", context: Mapping[str, str] | None = None) -> str:
    """The single wire line, without CRLF."""
    ctx = dict(context or {})
    ctx["code"] = reply.reason
    url = resolution_url(url_template, ctx)
    line = f"{reply.code} {reply.enhanced} [{reply.reason}] {clean(reply.text, 300)}"
    if url:
        line = f"{line} {url}"
    # RFC 5321 §4.2: reply text is ASCII; a UTF-8 name from a client or a
    # configured text never makes the reply unsendable.
    return line[:MAX_REPLY_LINE].encode("ascii", "replace").decode("ascii")
