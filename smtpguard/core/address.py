"""Which recipients this proxy accepts: never an open relay.

Decides: whether a RCPT address is for one of the served domains.
Inputs: the address as aiosmtpd parsed it (angle brackets removed) and the
served domain list (`example.com` exact, `.example.com` its subdomains).
Output: `Recipient` (local part, domain) or `Refused` (reason code and the
domain really targeted).
Failure modes: none; anything unusual is refused.
Defaults and why: only a plain local part (RFC 5321 §4.1.2 Dot-string or
Quoted-string) at a served domain passes. The relay tricks refused are
those that open relays were abused with and that Postfix refuses by default
(`allow_percent_hack = no`, `swap_bangpath`, `allow_untrusted_routing = no`):
source routes `@a:u@b`, `%`, `!` and `@` anywhere in the local part (quoted
or not), and address literals `u@[192.0.2.1]` — whatever the hops name,
because the MTA behind may route such an address onwards once accepted.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass

import idna


@dataclass(frozen=True, slots=True)
class Recipient:
    local: str
    domain: str  # lower case, no trailing dot

    @property
    def address(self) -> str:
        return f"{self.local}@{self.domain}" if self.domain else self.local


@dataclass(frozen=True, slots=True)
class DomainSet:
    """Served domains: exact names and, for entries written `.example.com`, subdomains."""

    exact: frozenset[str]
    parents: tuple[str, ...]  # each with its leading dot

    @classmethod
    def parse(cls, entries: tuple[str, ...] | list[str]) -> "DomainSet":
        exact: set[str] = set()
        parents: list[str] = []
        for entry in entries:
            name = domain_key(entry.lstrip(".")) or normalise_domain(entry.lstrip("."))
            if entry.startswith("."):
                parents.append("." + name)
            else:
                exact.add(name)
        return cls(frozenset(exact), tuple(parents))

    def __contains__(self, domain: object) -> bool:
        if not isinstance(domain, str):
            return False
        name = domain_key(domain)
        if name is None:
            return False
        return name in self.exact or any(name.endswith(p) for p in self.parents)

    def __bool__(self) -> bool:
        return bool(self.exact or self.parents)


def normalise_domain(domain: str) -> str:
    """Case-insensitive, without a trailing dot (RFC 5321 §2.4, §2.3.5); UTF-8 in NFC (RFC 6530 §10.1)."""
    name = domain.strip().rstrip(".")
    return name.lower() if name.isascii() else unicodedata.normalize("NFC", name).lower()


def domain_key(domain: str) -> str | None:
    """The A-label form two spellings of one domain share (`münchen.example` and
    `xn--mnchen-3ya.example`), or None for a name that is not a valid IDN.

    Strict IDNA 2008 (RFC 5891) without UTS #46 mapping: a zero-width or
    otherwise disallowed character is refused, never mapped away, so no
    look-alike of a served domain can pass as it.
    """
    name = normalise_domain(domain)
    if name.isascii():
        return name
    try:
        return idna.encode(name, uts46=False).decode("ascii")
    except (idna.IDNAError, UnicodeError, ValueError):
        return None


# RFC 5321 §4.1.2 atext, plus UTF-8 (RFC 6531 §3.3), which only reaches
# here when the client was offered SMTPUTF8.
_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~\u0080-\U0010ffff"
_DOT_STRING = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
# Quoted-string: qtextSMTP and quoted-pairSMTP.
_QUOTED_STRING = re.compile(r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010ffff]|\\[\x20-\x7e])*"')
# A domain as a client may write it: LDH labels (U-labels allowed), at most
# 255 octets (RFC 5321 §4.5.3.1.2).
_DOMAIN = re.compile(r"(?:[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]{0,61}[A-Za-z0-9\u0080-\U0010ffff])?\.)*"
                     r"[A-Za-z0-9\u0080-\U0010ffff](?:[A-Za-z0-9\-\u0080-\U0010ffff]{0,61}[A-Za-z0-9\u0080-\U0010ffff])?\.?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Characters that route mail onwards from inside a local part: the percent
# hack, UUCP bang paths and a second at sign (quoted or not).
_ROUTING = re.compile(r"[%!@]")


@dataclass(frozen=True, slots=True)
class Refused:
    """Why a recipient is refused: a reason code and, for RELAY, the domain really targeted."""

    reason: str          # RELAY or BAD-ADDRESS
    domain: str = ""     # RELAY: the destination the address tries to reach
    code: int | None = None  # 501 for an address that carries control characters


def has_control(value: str) -> bool:
    """Control characters (NUL, CR, LF, ...) in a stranger's string: never passed on."""
    return _CONTROL.search(value) is not None


def split_address(address: str) -> tuple[str, str] | None:
    """(local, domain) of `local@domain`, or None; the domain is what follows the last `@`."""
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return None
    return local, domain


def is_plain_local_part(local: str) -> bool:
    """A Dot-string or Quoted-string (RFC 5321 §4.1.2) of at most 64 octets (§4.5.3.1.1)."""
    if len(local.encode("utf-8", "surrogateescape")) > 64:
        return False
    return bool(_DOT_STRING.fullmatch(local) or _QUOTED_STRING.fullmatch(local))


def hidden_destinations(local: str) -> list[str]:
    """Hosts that a relay hack in the local part names, in the order written.

    `user%host` (the percent hack), `host!user` (a UUCP bang path) and
    `"user@host"` (a quoted local part with an at sign): each names another
    destination that a naive MTA may route to after accepting the address.
    """
    unquoted = local.replace('"', "").replace("\\", "")
    hosts: list[str] = []
    for i, part in enumerate(re.split(r"[@%]", unquoted)):
        bang = part.split("!")
        if i > 0:
            # after @ or %: a host, unless it is itself a bang path's start
            hosts.extend(h for h in bang if h)
        else:
            hosts.extend(h for h in bang[:-1] if h)
    return hosts


def check_recipient(address: str, served: DomainSet) -> Recipient | Refused:
    """The recipient, or why it is refused.

    Only a plain local part at a served domain passes: any local part with
    `%`, `!` or `@` (quoted or not) and any source route is refused as
    RELAY whatever its hops say, as Postfix does with
    `allow_untrusted_routing = no` and `allow_percent_hack = no` — an MTA
    behind us might otherwise route it onwards. `<Postmaster>` without a
    domain is accepted (RFC 5321 §4.1.1.3).
    """
    if has_control(address):
        return Refused("BAD-ADDRESS", code=501)
    if address.lower() == "postmaster":
        return Recipient(address, "")
    if address.startswith("@"):
        # A source route "@relay1,@relay2:user@domain" (RFC 5321 §4.1.1.3):
        # the first hop is where it asks to go.
        first = address[1:].split(",", 1)[0].split(":", 1)[0]
        return Refused("RELAY", first or "a source route")
    parts = split_address(address)
    if parts is None:
        return Refused("BAD-ADDRESS")
    local, domain = parts
    if domain.startswith("["):
        # An address literal names a host, not one of our domains.
        return Refused("RELAY", domain)
    if not _DOMAIN.fullmatch(domain) or domain_key(domain) is None:
        return Refused("BAD-ADDRESS")
    if domain not in served:
        return Refused("RELAY", domain)
    if _ROUTING.search(local):
        hosts = hidden_destinations(local)
        foreign = [h for h in hosts if h.startswith("[") or h not in served]
        target = foreign[0] if foreign else (hosts[-1] if hosts else domain)
        return Refused("RELAY", target)
    if not is_plain_local_part(local):
        return Refused("BAD-ADDRESS")
    return Recipient(local, normalise_domain(domain))


# A MAIL FROM domain's label as Postfix's valid_hostname() takes it: LDH plus
# underscore (names with one exist and send mail), UTF-8 under SMTPUTF8.
_SENDER_LABEL = re.compile(r"(?!-)[A-Za-z0-9_\-\u0080-\U0010ffff]{1,63}(?<!-)\Z")


def is_sender_domain(domain: str) -> bool:
    """The domain of a MAIL FROM address as Postfix takes it (valid_hostname):
    labels of letters, digits, `-` and `_`, none empty or with a hyphen at
    either end, not all of them digits (`1.2.3.4` is no domain), at most 255
    octets; or an address literal. The local part is left alone: real
    senders use ones RFC 5321 does not allow (`foo.@docomo.ne.jp`), and
    Postfix takes them."""
    if domain.startswith("["):
        return is_ehlo_argument(domain)
    labels = domain.split(".")
    return (len(domain.encode("utf-8", "surrogateescape")) <= 255
            and all(_SENDER_LABEL.match(label) for label in labels)
            and not all(label.isdigit() for label in labels))


_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_ADDRESS_LITERAL = re.compile(r"\[(?:\d{1,3}(?:\.\d{1,3}){3}|IPv6:[0-9A-Fa-f:.]{2,45})\]\Z")


def is_hostname(name: str) -> bool:
    """A host name fit for a header or XCLIENT: ASCII LDH labels, at most 253 octets (RFC 1123 §2.1).

    PTR names and HELO names are strangers' strings: DNS carries any octet in
    a label, so a confirmed PTR name is used in a header only when this holds.
    """
    name = name[:-1] if name.endswith(".") else name
    return 0 < len(name) <= 253 and all(_HOST_LABEL.match(label) for label in name.split("."))


def is_ehlo_argument(name: str) -> bool:
    """A valid EHLO/HELO argument: a host name or an address literal (RFC 5321 §4.1.1.1, §4.1.3)."""
    if is_hostname(name):
        return True
    if _ADDRESS_LITERAL.match(name) is None:
        return False
    try:
        ipaddress.ip_address(name[1:-1].removeprefix("IPv6:"))
    except ValueError:
        return False
    return True
