"""HELO/EHLO syntax facts: what the client's greeting name says on its face.

What it decides
    From the HELO/EHLO argument alone (plus the client's address and our own
    identity): whether it is a syntactically valid domain or address literal,
    a bare IP, a literal equal to the client's address, or a claim to be us.
    Nothing here rejects: RFC 5321 §4.1.4 forbids refusing a client only
    because its HELO does not match its address; rules decide.

Inputs
    The argument as the client sent it, the client's IP, our hostnames, our
    served domains (``example.com`` exact, ``.example.com`` subdomains: the
    project's domain-list rule) and our own addresses (addresses or networks).

Output
    ``HeloSyntax`` (kind, valid, bare_ip, literal_matches, is_us and the
    normalised name); ``HeloFact`` (core of sources/helo.py) adds the DNS
    answers and flattens to the ``helo*`` facts.

Rules and sources
    * valid (RFC 5321 §4.1.1.1 ``"EHLO" SP ( Domain / address-literal )``):
      a fully qualified domain (§2.3.5: a name that is not an FQDN is a local
      alias and MUST NOT appear in a transaction), so at least one dot, labels
      ``Let-dig [Ldh-str]`` of at most 63 octets (§4.1.2, RFC 1035 §2.3.4),
      at most 255 octets in all (§4.5.3.1.2), and a top label that is not all
      digits (RFC 3696 §2: otherwise ``1.2.3.4`` would be a "domain");
      U-labels count when they encode to valid A-labels (RFC 6531 §3.7.1); or
      an address literal (§4.1.3) ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``.
      General literals with another tag are syntactically allowed by §4.1.3
      but no tag other than IPv6 is registered, so they count as invalid.
    * bare_ip: an address without the brackets §4.1.3 requires (a common
      spam-ware habit; Postfix ``reject_invalid_helo_hostname`` refuses it).
    * literal_matches: a literal equal to the client's address (IPv4-mapped
      IPv6 compared as IPv4, RFC 4291 §2.5.5.2).
    * is_us: our hostname, one of our served domains, one of our addresses
      (bare or literal), or, from a client that is not on loopback, a
      loopback name or address (``localhost``, RFC 6761 §6.3; ``127.0.0.1``)
      — no outside client can be any of these: a forgery (postscreen and
      spamd operators have long refused it).
    Case-insensitive; one trailing dot ignored (§2.3.5 allows neither, but
    it changes nothing).

Failure modes
    None: total on any string; an empty argument is kind ``empty``.

Defaults and why
    ``MAX_HELO_LENGTH`` 255: the longest domain RFC 5321 §4.5.3.1.2 allows; a
    longer argument is truncated in the fact (and by the logger again).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Iterable, Union

from smtpguard.core.address import DomainSet
from smtpguard.core.facts import NONE, OK, UNKNOWN, FactValue
from smtpguard.core.ip import unmapped

# RFC 5321 §4.5.3.1.2: a domain is at most 255 octets.
MAX_HELO_LENGTH = 255
# RFC 5321 §4.5.3.1.2 / RFC 1035 §2.3.4: a label is at most 63 octets.
MAX_LABEL_LENGTH = 63

# Kinds of argument, and which syntax facts each implies (a table, STYLE §2).
EMPTY = "empty"
FQDN = "fqdn"
LITERAL = "literal"
BARE_IP = "bare_ip"
INVALID = "invalid"

KIND_FACTS: dict[str, tuple[bool, bool]] = {
    #          (valid, bare_ip)
    EMPTY:     (False, False),
    FQDN:      (True, False),
    LITERAL:   (True, False),
    BARE_IP:   (False, True),
    INVALID:   (False, False),
}

# RFC 5321 §4.1.2 sub-domain: Let-dig [Ldh-str].
_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?\Z")
_SNUM = re.compile(r"[0-9]{1,3}\Z")
# RFC 6761 §6.3: localhost and names under it are the loopback host.
_LOOPBACK_NAMES = DomainSet.parse(["localhost", ".localhost", "localhost.localdomain"])

IP = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclass(frozen=True, slots=True)
class HeloSyntax:
    """What the HELO argument says on its face."""

    name: str                   # normalised (lower case, no trailing dot), truncated to 255
    kind: str                   # EMPTY FQDN LITERAL BARE_IP INVALID
    valid: bool
    bare_ip: bool
    literal_matches: bool
    is_us: bool
    address: str | None = None  # the address of a literal or bare IP (compressed)


@dataclass(frozen=True, slots=True)
class OurIdentity:
    """Who we are, parsed once at start (see ``identity``)."""

    names: frozenset[str] = frozenset()
    domains: DomainSet = DomainSet(frozenset(), ())
    networks: tuple[Network, ...] = ()


def identity(names: Iterable[str] = (), domains: Iterable[str] = (),
             ips: Iterable[str] = ()) -> OurIdentity:
    """Our hostnames, served domains and addresses (``192.0.2.1`` or
    ``192.0.2.0/24``). Raises ValueError naming a bad address."""
    nets: list[Network] = []
    for text in ips:
        try:
            nets.append(ipaddress.ip_network(text.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{text!r} is not an IP address or network") from None
    return OurIdentity(
        frozenset(normalise(n) for n in names if n.strip()),
        DomainSet.parse([d for d in domains if d.strip()]),
        tuple(nets),
    )


def normalise(helo: str) -> str:
    """Lower case, surrounding space and one trailing dot removed (not
    truncated: a name is judged whole, and only stored truncated)."""
    text = helo.strip().lower()
    if text.endswith(".") and not text.endswith(".."):
        text = text[:-1]
    return text


def parse_address(text: str) -> IP | None:
    """An IPv4 (RFC 5321 §4.1.3 Snum: 1-3 digits, leading zeros allowed) or
    IPv6 address (no zone index), or None."""
    parts = text.split(".")
    if len(parts) == 4 and all(_SNUM.match(p) for p in parts):
        octets = [int(p) for p in parts]
        return ipaddress.IPv4Address(bytes(octets)) if max(octets) <= 255 else None
    if ":" not in text or "%" in text:
        return None
    try:
        return ipaddress.IPv6Address(text)
    except ValueError:
        return None


def literal_address(name: str) -> IP | None:
    """The address of an RFC 5321 §4.1.3 address literal, or None."""
    if not (name.startswith("[") and name.endswith("]")):
        return None
    inner = name[1:-1]
    if inner.lower().startswith("ipv6:"):
        addr = parse_address(inner[5:])
        return addr if isinstance(addr, ipaddress.IPv6Address) else None
    addr = parse_address(inner)
    return addr if isinstance(addr, ipaddress.IPv4Address) else None


def bare_address(name: str) -> IP | None:
    """An address written without brackets (``192.0.2.1``, ``2001:db8::1``,
    ``ipv6:2001:db8::1``), or None."""
    inner = name[5:] if name.lower().startswith("ipv6:") else name
    return parse_address(inner)


def is_fqdn(name: str) -> bool:
    """RFC 5321 §2.3.5 / §4.1.2 fully qualified domain (see module docstring)."""
    try:
        ascii_name = name.encode("idna").decode("ascii") if not name.isascii() else name
    except UnicodeError:
        return False
    if not ascii_name or len(ascii_name) > MAX_HELO_LENGTH:
        return False
    labels = ascii_name.lower().split(".")
    if len(labels) < 2 or labels[-1].isdigit():
        return False
    return all(len(label) <= MAX_LABEL_LENGTH and _LABEL.match(label) for label in labels)


def check(helo: str, client_ip: str, us: OurIdentity = OurIdentity()) -> HeloSyntax:
    """Classify a HELO/EHLO argument (see the module docstring)."""
    name = normalise(helo)
    try:
        client: IP | None = unmapped(ipaddress.ip_address(client_ip.strip()))
    except ValueError:
        client = None
    address: IP | None = None
    if not name:
        kind = EMPTY
    elif (address := literal_address(name)) is not None:
        kind = LITERAL
    elif (address := bare_address(name)) is not None:
        kind = BARE_IP
    elif is_fqdn(name):
        kind = FQDN
    else:
        kind = INVALID
    if address is not None:
        address = unmapped(address)
    valid, bare = KIND_FACTS[kind]
    client_on_loopback = client is not None and client.is_loopback
    if address is not None:
        is_us = any(address in net for net in us.networks) or (
            address.is_loopback and not client_on_loopback)
    else:
        is_us = bool(name) and (
            name in us.names or name in us.domains
            or (name in _LOOPBACK_NAMES and not client_on_loopback))
    return HeloSyntax(
        name=name[:MAX_HELO_LENGTH],
        kind=kind,
        valid=valid,
        bare_ip=bare,
        literal_matches=kind == LITERAL and client is not None and address == client,
        is_us=is_us,
        address=address.compressed if address is not None else None,
    )


# -- the fact --------------------------------------------------------------

Tri = Union[bool, str]  # True, False or UNKNOWN ("unknown")


@dataclass(frozen=True, slots=True)
class HeloFact:
    """The HELO facts of one session (built by sources/helo.py)."""

    status: str                   # OK; NONE (no argument); UNKNOWN (the lookup failed)
    helo: str                     # as sent, stripped and truncated
    syntax: HeloSyntax
    resolves: Tri = False         # the name has A or AAAA records
    matches_ip: Tri = False       # ... and they contain the client's address
    matches_rdns: Tri = False     # the name equals the rDNS name
    addresses: tuple[str, ...] = ()
    reason: str = ""              # why a lookup is UNKNOWN (timeout, servfail...)
    # False: the name's addresses were not looked up (no rule reads
    # helo_resolves or helo_matches_ip), and those two facts are absent.
    looked_up: bool = True

    def as_facts(self) -> dict[str, FactValue]:
        if not self.looked_up:
            return {"helo": self.helo, "helo_valid": self.syntax.valid, "helo_bare_ip": self.syntax.bare_ip,
                    "helo_literal_matches": self.syntax.literal_matches, "helo_is_us": self.syntax.is_us,
                    "helo_matches_rdns": self.matches_rdns}
        return {
            "helo": self.helo,
            "helo_valid": self.syntax.valid,
            "helo_bare_ip": self.syntax.bare_ip,
            "helo_literal_matches": self.syntax.literal_matches,
            "helo_is_us": self.syntax.is_us,
            "helo_resolves": self.resolves,
            "helo_matches_ip": self.matches_ip,
            "helo_matches_rdns": self.matches_rdns,
        }


def matches_rdns(syntax: HeloSyntax, rdns_status: str, rdns_name: str) -> Tri:
    """Whether the HELO name is the rDNS name (case-insensitive, no trailing
    dot). UNKNOWN when the PTR lookup failed; False without a PTR name."""
    if syntax.kind != FQDN:
        return False
    if rdns_status == UNKNOWN and not rdns_name:
        return UNKNOWN
    return bool(rdns_name) and normalise(rdns_name) == syntax.name


def fact_status(syntax: HeloSyntax, lookup_status: str | None) -> str:
    """OK, NONE for an empty argument, UNKNOWN when the lookup failed."""
    if syntax.kind == EMPTY:
        return NONE
    return UNKNOWN if lookup_status == UNKNOWN else OK
