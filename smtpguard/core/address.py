"""Which recipients this proxy accepts: never an open relay.

Decides: whether a RCPT address is for one of the served domains.
Inputs: the address as aiosmtpd parsed it (angle brackets removed) and the
served domain list (`example.com` exact, `.example.com` its subdomains).
Output: `Recipient` (local part, domain) or a refusal reason code.
Failure modes: none; anything unusual is refused.
Defaults and why: the relay tricks refused are those that open relays were
abused with and that Postfix refuses by default (`allow_percent_hack`,
`swap_bangpath`, `allow_untrusted_routing`, `resolve_dequoted_address`):
source routes `@a:u@b` (RFC 5321 §4.1.1.3: SHOULD be ignored; we refuse
them unless the final domain is ours), `%` and `!` in the local part,
a quoted local part containing `@`, and address literals `u@[192.0.2.1]`.
"""

from __future__ import annotations

from dataclasses import dataclass


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
            name = normalise_domain(entry)
            if entry.startswith("."):
                parents.append("." + name.lstrip("."))
            else:
                exact.add(name)
        return cls(frozenset(exact), tuple(parents))

    def __contains__(self, domain: object) -> bool:
        if not isinstance(domain, str):
            return False
        name = normalise_domain(domain)
        return name in self.exact or any(name.endswith(p) for p in self.parents)

    def __bool__(self) -> bool:
        return bool(self.exact or self.parents)


def normalise_domain(domain: str) -> str:
    """Case-insensitive, without a trailing dot (RFC 5321 §2.4, §2.3.5)."""
    return domain.strip().rstrip(".").lower()


def split_recipient(address: str) -> tuple[str, str] | None:
    """(local, domain) of an address, or None for what is not a plain mailbox."""
    if address.startswith("@"):
        # A source route "@relay1,@relay2:user@domain" (RFC 5321 §4.1.1.3).
        _, sep, address = address.partition(":")
        if not sep:
            return None
    local, at, domain = address.rpartition("@")
    if not at or not local or not domain:
        return None
    return local, domain


def hidden_destinations(local: str) -> list[str]:
    """Hosts that a relay hack in the local part points at.

    `user%host` (the percent hack), `host!user` (a UUCP bang path) and
    `"user@host"` (a quoted local part with an at sign): each names another
    destination that a naive MTA may route to after accepting the address.
    """
    unquoted = local[1:-1] if len(local) >= 2 and local[0] == local[-1] == '"' else local
    found: list[str] = []
    if "@" in unquoted:
        found.append(unquoted.rpartition("@")[2])
        unquoted = unquoted.rpartition("@")[0]
    if "%" in unquoted:
        found.append(unquoted.rpartition("%")[2])
    if "!" in unquoted:
        found.append(unquoted.partition("!")[0])
    return found


def check_recipient(address: str, served: DomainSet) -> Recipient | str:
    """The recipient, or the reason code for refusing it (RELAY or BAD-ADDRESS).

    A source route is ignored when its final domain is ours (RFC 5321
    §4.1.1.3: "SHOULD ignore the route"); a relay hack passes only when
    every destination it names is a served domain too.
    """
    if address.lower() == "postmaster":
        # RFC 5321 §4.1.1.3: "RCPT TO:<Postmaster>" without a domain must be accepted.
        return Recipient(address, "")
    parts = split_recipient(address)
    if parts is None:
        return "BAD-ADDRESS"
    local, domain = parts
    if domain.startswith("[") or normalise_domain(domain) not in served:
        # An address literal names a host, not one of our domains.
        return "RELAY"
    for hidden in hidden_destinations(local):
        if hidden.startswith("[") or not hidden or hidden not in served:
            return "RELAY"
    return Recipient(local, normalise_domain(domain))
