"""The resolution page: what a refused sender's admin reads at the URL of a refusal.

Decides:
    the words shown for one refusal: a title, what happened and what to fix,
    per reason code (`TEXTS`, one entry for every code of core/reply.py's
    REASONS and for those the screen adds), or the generic text for a code
    that has none (a rule's own `reason`).
Inputs:
    the query parameters of the URL (`code`, `ip`, `session`; `helo`,
    `sender`, `rcpt` are accepted and never shown), the time of the request
    (`now`, given by the caller), the `[http]` settings (contact line, text
    overrides, DNS list removal links), the codes the running policy knows,
    the graylist delay, and the lists that name the address (looked up by
    the caller for `DNSBL`).
Output:
    `Page` (the validated values and the chosen text), rendered as HTML
    (`render_html`, no scripts, no external resources, readable on a phone)
    or plain text (`render_text`, for curl and `smtpguard page CODE`).
Failure modes:
    none: every parameter is a stranger's string. `ip` must parse as an IP
    address, `session` must be at most 32 hex digits, `code` must be a code
    the running server knows; anything else is shown as "unknown" (a bad
    `ip` is quoted, truncated and escaped, so the reader sees what the link
    carried). Everything shown is HTML-escaped.
Defaults and why:
    the page never shows recipients, other clients, or the facts and
    thresholds that decided (a spammer would learn the policy from them):
    only what the SMTP reply already said, in more words, and the way out.
    Pure: no I/O, no clock.
"""

from __future__ import annotations

import html
import ipaddress
import re
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping

# A session id is hex (server.py: 6 digits of prefix + a counter); 32 is
# far above what the server makes and bounds what a stranger can put here.
MAX_SESSION = 32
# A code is a reason code of core/reply.py or a rule's `reason`.
CODE_RE = re.compile(r"^[A-Z0-9][A-Z0-9-]{0,31}$")
SESSION_RE = re.compile(r"^[0-9a-f]{1,%d}$" % MAX_SESSION)
# How much of a bad `ip` parameter is quoted back: enough to recognise it.
MAX_QUOTED = 40
UNKNOWN = "unknown"
# Placeholders a text (ours or an override) may use.
PLACEHOLDERS = ("ip", "delay", "code")


@dataclass(frozen=True, slots=True)
class Text:
    """The words for one reason code."""

    title: str
    what: str   # what happened, for a sending admin
    fix: str    # what to do about it


# reason code -> text. `{ip}` is the client's address (or "your address"),
# `{delay}` the graylist delay in minutes, `{code}` the reason code.
TEXTS: dict[str, Text] = {
    # the relay and its limits
    "RELAY": Text(
        "Relaying refused",
        "This server accepts mail only for its own domains, and the recipient's domain is not one of them.",
        "Check the recipient address for typing errors. To send mail to other domains, use your own "
        "provider's outgoing mail server: this one is not an open relay."),
    "BAD-ADDRESS": Text(
        "Address form not accepted",
        "An envelope address (MAIL FROM or RCPT TO) had a form this server does not accept, such as a "
        "source route, a '%' or '!' routing hack, or characters that do not belong in an address.",
        "Send with plain addresses of the form user@domain (RFC 5321 section 4.1.2)."),
    "SIZE": Text(
        "Message too large",
        "The message was larger than this server accepts. The limit is announced in the SIZE keyword "
        "of its EHLO reply.",
        "Send a smaller message: put large files on a file-sharing service and send a link instead."),
    "RCPT-LIMIT": Text(
        "Too many recipients at once",
        "One transaction named more recipients than this server takes at once. Only the extra "
        "recipients were refused, and only for now.",
        "Nothing to do for a real mail server: it sends the remaining recipients in another "
        "transaction by itself."),
    "UPSTREAM": Text(
        "Our mail server is unavailable",
        "The mail server behind this gateway could not be reached, so your message was not accepted. "
        "Nothing is wrong on your side.",
        "Nothing: your mail server will try again later. If this lasts for hours, contact us."),
    "UPSTREAM-TIMEOUT": Text(
        "Our mail server did not answer in time",
        "The mail server behind this gateway did not answer in time, so your message was not accepted. "
        "Nothing is wrong on your side.",
        "Nothing: your mail server will try again later. If this lasts for hours, contact us."),
    "ERRORS": Text(
        "Too many errors",
        "The sending client made too many errors in one session (unknown commands, bad syntax, "
        "refused recipients), and the connection was closed.",
        "Check the SMTP dialogue of the sending software; a mail server that follows RFC 5321 does "
        "not run into this limit."),
    "IDLE": Text(
        "Idle connection closed",
        "The sending client sent nothing for several minutes, and the connection was closed "
        "(RFC 5321 section 4.5.3.2).",
        "Nothing, if your mail server retries. Otherwise look for network trouble between your "
        "server and ours."),
    "SHUTDOWN": Text(
        "Service restarting",
        "The service was being restarted or shut down while your server was connected.",
        "Nothing: your mail server will try again, and the message will be delivered."),
    "INTERNAL": Text(
        "Internal error",
        "Something went wrong on our side while handling this session; the message was not accepted.",
        "Nothing: your mail server will try again. If it keeps happening, contact us and quote the "
        "session id below."),
    "NO-AUTH": Text(
        "No logins on this port",
        "This server receives mail for its own domains on port 25 and accepts no logins there.",
        "To send mail as a user, use your provider's submission service (port 587 or 465) with "
        "your account."),
    "LINE-TOO-LONG": Text(
        "Command line too long",
        "A command line was longer than RFC 5321 section 4.5.3.1 allows (512 octets).",
        "Fix the sending software: a mail server that follows RFC 5321 never sends such lines."),
    "DATA-LINE-TOO-LONG": Text(
        "Message line too long",
        "The message had a line longer than 998 characters, which RFC 5322 section 2.1.1 forbids.",
        "Encode the message (quoted-printable or base64) so that its lines stay short; mail "
        "software normally does this by itself."),
    "SYNTAX": Text(
        "Syntax error",
        "A command from the sending client could not be understood.",
        "Check the commands of the sending software against RFC 5321."),
    "REFUSED": Text(
        "Session refused",
        "This session had already been refused when it began, so no further commands were accepted.",
        "Look at the first refusal of the session and its reason code: that is what to change."),
    "NO-SMTPUTF8": Text(
        "Internationalised address without SMTPUTF8",
        "An envelope address contained non-ASCII (UTF-8) characters, but the client did not ask for "
        "SMTPUTF8 on MAIL FROM (RFC 6531 section 3.4).",
        "Send with SMTPUTF8 (the MAIL FROM parameter) when an address has non-ASCII characters, or use "
        "the ASCII form of the address."),
    "SEQUENCE": Text(
        "Commands out of order",
        "A command came in an order that SMTP does not allow (for instance RCPT before MAIL).",
        "Fix the sending software; a mail server that follows RFC 5321 does not do this."),
    "HELO-LIMIT": Text(
        "Too many HELO/EHLO commands",
        "The sending client repeated HELO or EHLO far more often than any mail server needs to.",
        "Fix the sending software: one EHLO per connection (and one after STARTTLS) is enough."),
    # policy
    "POLICY": Text(
        "Refused by local policy",
        "This site's policy does not accept this mail.",
        "If you believe this is a mistake, contact us and quote the address, time and session id "
        "below."),
    "GEO": Text(
        "Mail from this country is not accepted",
        "This site does not accept mail sent directly from servers in the country of your address {ip}.",
        "Send through a mail server in another country (your mail provider's outgoing service, for "
        "example), or reach us another way, using the contact below, and ask for your server to "
        "be allowed."),
    "GEO-OS": Text(
        "Mail from this kind of host is not accepted from this country",
        "Mail from hosts like yours, in the country of your address {ip}, is not accepted here.",
        "Send through your mail provider's outgoing server or a dedicated mail server, or contact us "
        "if you run a mail server at this address."),
    "OS-RDNS": Text(
        "A desktop host without a mail server's name",
        "Your address {ip} looks like a desktop or home machine, and its reverse DNS does not name a "
        "mail server.",
        "Send through your provider's mail server, or set up forward-confirmed reverse DNS for {ip}: "
        "a PTR record naming your mail server (mail.example.com) whose A or AAAA record points back "
        "to {ip}."),
    "OS": Text(
        "Refused because of the kind of host",
        "Mail sent directly from hosts of your kind is not accepted here.",
        "Send through your provider's mail server or a dedicated mail server, or contact us if you "
        "run a mail server at {ip}."),
    "RDNS": Text(
        "No reverse DNS",
        "Your address {ip} has no reverse DNS (PTR) record, or the name it has does not lead back to "
        "{ip}.",
        "Set up forward-confirmed reverse DNS for {ip} that names a mail server: ask whoever runs the "
        "address block (your hosting or network provider) for a PTR record such as mail.example.com, "
        "and make sure that name's A or AAAA record points to {ip}."),
    "RDNS-GENERIC": Text(
        "Generic reverse DNS",
        "The reverse DNS name of your address {ip} looks like one that providers give to dynamic or "
        "customer addresses, not like a mail server's name.",
        "Set up forward-confirmed reverse DNS for {ip} that names a mail server (mail.example.com, "
        "with an A or AAAA record back to {ip}), or send through your provider's mail server."),
    "DNSBL": Text(
        "Listed by a DNS blocklist",
        "Your address {ip} is listed by a public DNS blocklist that this site uses.",
        "Look up {ip} on the list's web site, find out why it was listed (often an infected machine "
        "or a misconfigured server on your network), fix the cause and ask the list to remove it. "
        "Your mail server's next attempt after the removal will pass."),
    "HELO-FORGED": Text(
        "HELO names this server",
        "Your server introduced itself in HELO/EHLO with this server's own name or address.",
        "Configure your server to announce its own fully qualified name in HELO/EHLO (Postfix: "
        "smtp_helo_name; Exim: helo_data; Exchange: the send connector's FQDN)."),
    "DNS-TEMP": Text(
        "Temporary DNS failure",
        "A DNS lookup needed to decide about your mail failed for the moment.",
        "Nothing: your mail server will try again. If it lasts, check that the DNS servers of your "
        "domain and of your address's reverse zone answer."),
    "TEMP": Text(
        "Temporarily refused",
        "Your mail was refused for the moment by this site's policy.",
        "Nothing: your mail server will try again later by itself."),
    # graylisting
    "GRAYLIST": Text(
        "Graylisted: please try again",
        "This site delays the first mail from a new sender for a short time (graylisting). A real "
        "mail server tries again by itself, and the message will pass after about {delay} minutes.",
        "Nothing: let your mail server retry, as it does by itself. If you send from a script or "
        "web application that does not retry, send through a real mail server."),
    "GRAYLIST-STORE": Text(
        "Temporary failure",
        "A database this site needs to accept mail was unavailable for the moment.",
        "Nothing: your mail server will try again later by itself."),
    "TRAP": Text(
        "Mail to a spam trap",
        "Mail from {ip} was sent to an address that never receives legitimate mail.",
        "Check your mailing lists for addresses collected without consent; remove those that bounce "
        "or were never confirmed. Then contact us to be cleared."),
    # the screen
    "PREGREET": Text(
        "Spoke before the greeting",
        "The sending client sent commands before this server had sent its greeting. RFC 5321 section "
        "3.1 requires a client to wait for the 220 greeting; real mail servers do.",
        "Fix the sending software so that it waits for the greeting; Postfix, Exim and Exchange "
        "already do."),
    "BUSY": Text(
        "Server busy",
        "Too many connections were open at once, from your address or to this server in total.",
        "Nothing: your mail server will try again later. If you send a lot at once, open fewer "
        "connections to us in parallel."),
    "RATE": Text(
        "Too many connections",
        "Your address {ip} opened new connections faster than this site allows.",
        "Open fewer connections per minute, and send several messages over one connection; your "
        "mail server will deliver the rest when it retries."),
    "PROXY": Text(
        "Connection refused at the load balancer",
        "The connection did not come through this site's load balancer in the expected way.",
        "Nothing on your side; if it lasts, contact us and quote the session id below."),
    "DROP": Text(
        "Connection dropped",
        "The connection was closed without an answer by this site's policy.",
        "If you run a real mail server at {ip}, contact us and quote the time below."),
}

# A code without a text of its own (a rule's own reason): the generic text.
GENERIC = Text(
    "Mail refused or delayed",
    "This server refused or delayed your mail (reason code {code}).",
    "If the reply began with 4 (a temporary refusal), your mail server tries again by itself. "
    "Otherwise contact us and quote the address, time and session id below.")
# The code of the URL is not one this server knows.
UNKNOWN_TEXT = Text(
    "Mail refused or delayed",
    "This server refused or delayed your mail; the link did not say why in a form we recognise.",
    "Look at the reply your mail server received (it has a reason code in brackets), or contact "
    "us and quote the address, time and session id below.")


# Without `[http] contact`: the address RFC 5321 §4.5.1 requires every mail domain to have.
NO_CONTACT = ("write to the postmaster of the recipient's domain (postmaster@ that domain) from "
              "another mail server, or reach the recipient another way.")


@dataclass(frozen=True, slots=True)
class Listing:
    """A DNS list that names the address, and where to ask for removal."""

    name: str
    removal: str = ""


@dataclass(frozen=True, slots=True)
class Page:
    """One page, its values validated: built by `build`, rendered twice."""

    code: str            # a known code, or "unknown"
    ip: str              # a valid address, or "unknown"
    bad_ip: str          # what the link carried when it was not an address (shown quoted)
    session: str         # hex, or "unknown"
    when: str            # the time of the request, UTC
    text: Text
    contact: str = ""
    listings: tuple[Listing, ...] = field(default_factory=tuple)


def valid_ip(value: str) -> str:
    """The address in its canonical form, or "" when it is not one."""
    try:
        return str(ipaddress.ip_address(value.strip()))
    except ValueError:
        return ""


def valid_code(value: str, known: Iterable[str]) -> str:
    code = value.strip().upper()
    return code if CODE_RE.match(code) and code in set(known) else ""


def valid_session(value: str) -> str:
    session = value.strip().lower()
    return session if SESSION_RE.match(session) else ""


def text_for(code: str, overrides: Mapping[str, Text] | None = None,
             rule_texts: Mapping[str, str] | None = None) -> Text:
    """The text for a code: the config's override, ours, the rule's own words, or the generic one."""
    if overrides and code in overrides:
        return overrides[code]
    if code in TEXTS:
        return TEXTS[code]
    if not code:
        return UNKNOWN_TEXT
    if rule_texts and rule_texts.get(code):
        return Text(GENERIC.title, rule_texts[code].rstrip(".") + ".", GENERIC.fix)
    return GENERIC


def fill(text: str, values: Mapping[str, str]) -> str:
    """Replace the known placeholders; anything else stays as written.

    Without a valid address, "your address {ip}" reads "your address" and
    any other {ip} "your address"."""
    if not values.get("ip"):
        text = text.replace("your address {ip}", "your address").replace("Your address {ip}", "Your address")
        values = {**values, "ip": "your address"}
    for key in PLACEHOLDERS:
        text = text.replace("{" + key + "}", values.get(key, ""))
    return text


def build(params: Mapping[str, str], now: float, known_codes: Iterable[str], *,
          contact: str = "", overrides: Mapping[str, Text] | None = None,
          rule_texts: Mapping[str, str] | None = None, graylist_delay: float = 180.0,
          listings: Iterable[Listing] = ()) -> Page:
    """The page for a request's parameters (strangers' strings, all of them)."""
    raw_ip = str(params.get("ip", ""))[:200]
    code = valid_code(str(params.get("code", ""))[:64], known_codes)
    ip = valid_ip(raw_ip)
    bad_ip = ""
    if raw_ip and not ip:
        bad_ip = raw_ip[:MAX_QUOTED] + ("…" if len(raw_ip) > MAX_QUOTED else "")
    session = valid_session(str(params.get("session", ""))[:64])
    base = text_for(code, overrides, rule_texts)
    values = {"ip": ip, "delay": str(max(1, round(graylist_delay / 60))),
              "code": code or UNKNOWN}
    text = Text(fill(base.title, values), fill(base.what, values), fill(base.fix, values))
    return Page(code or UNKNOWN, ip or UNKNOWN, bad_ip, session or UNKNOWN,
                time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(now)), text, contact,
                tuple(listings) if code == "DNSBL" else ())


def _lines(page: Page) -> list[tuple[str, str]]:
    """The facts to quote, as (label, value)."""
    ip = page.ip
    if page.bad_ip:
        ip = f'unknown (the link carried "{page.bad_ip}", which is not an IP address)'
    return [("Reason code", page.code), ("Your address", ip), ("Time", page.when),
            ("Session id", page.session)]


def render_text(page: Page) -> str:
    """The page as plain text (curl, `smtpguard page CODE`)."""
    out = [page.text.title, "=" * len(page.text.title), "", "What happened: " + page.text.what, "",
           "What to do: " + page.text.fix, ""]
    for listing in page.listings:
        out.append(f"Listed by {listing.name}" + (f"; removal: {listing.removal}" if listing.removal else ""))
    if page.listings:
        out.append("")
    out += [f"{label}: {value}" for label, value in _lines(page)]
    out += ["", "Contact: " + (page.contact or NO_CONTACT)]
    out += ["", "Please quote the reason code, address, time and session id when you write to us."]
    # Strangers' strings never carry control characters to a terminal.
    return re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "?", "\n".join(out)) + "\n"


# Inline style only: no external resources, readable on a phone (viewport,
# relative sizes, wrapping of long words).
_STYLE = ("body{font-family:system-ui,sans-serif;max-width:40em;margin:0 auto;padding:1em;"
          "line-height:1.5;color:#222;background:#fff;overflow-wrap:anywhere}"
          "h1{font-size:1.4em}h2{font-size:1.1em;margin-bottom:0}dl{display:grid;grid-template-columns:max-content 1fr;gap:.2em 1em}"
          "dt{font-weight:bold}dd{margin:0;font-family:monospace}"
          ".note{color:#555;font-size:.9em}")


def _link(value: str) -> str:
    """A contact or removal link: a mailto: or http(s) link, else plain escaped text."""
    e = html.escape(value, quote=True)
    if re.fullmatch(r"https?://[^\s\"'<>]+", value):
        return f'<a href="{e}" rel="noreferrer nofollow">{e}</a>'
    if re.fullmatch(r"[^\s@\"'<>]+@[^\s@\"'<>]+", value):
        return f'<a href="mailto:{e}">{e}</a>'
    return e


def render_html(page: Page) -> str:
    """The page as HTML5: every value escaped, no script, no external resource."""
    esc = html.escape
    items = "".join(f"<dt>{esc(label)}</dt><dd>{esc(value)}</dd>" for label, value in _lines(page))
    listings = ""
    if page.listings:
        rows = "".join(f"<li>{esc(x.name)}" + (f" (removal: {_link(x.removal)})" if x.removal else "")
                       + "</li>" for x in page.listings)
        listings = f"<p>Listed by:</p><ul>{rows}</ul>"
    contact = f"<p>Contact: {_link(page.contact)}</p>" if page.contact else f"<p>Contact: {esc(NO_CONTACT)}</p>"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        "<meta name=\"robots\" content=\"noindex\">"
        f"<title>{esc(page.text.title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{esc(page.text.title)}</h1>"
        f"<h2>What happened</h2><p id=\"what\">{esc(page.text.what)}</p>"
        f"<h2>What to do</h2><p id=\"fix\">{esc(page.text.fix)}</p>{listings}"
        f"<dl id=\"facts\">{items}</dl>{contact}"
        "<p class=\"note\">Please quote the reason code, address, time and session id when you write "
        "to us.</p></body></html>\n")
