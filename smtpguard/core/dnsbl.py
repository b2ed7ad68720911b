"""DNS block and allow lists: query names, answer codes and the score.

Decides:
    what each list's answer means for a client: a listing (the answer code is
    one the admin configured for that list), nothing (NXDOMAIN/NODATA) or a
    list error (a code outside the configured ones, a 127.255.255.x refusal,
    an answer outside 127.0.0.0/8, a timeout); and from all lists the client's
    score: the sum of the weights of the listing entries (allowlists such as
    DNSWL carry negative weights), as postscreen_dnsbl_sites scores.
Inputs:
    the configured lists (`DnsblList`, built by sources/dnsbl.py from
    `[[dnsbl]]`), the client address, and per zone what DNS said
    (`ZoneAnswer`: status OK/NONE/UNKNOWN and the A-record addresses).
Output:
    `query_name(ip, zone)`; `evaluate(lists, answers) -> DnsblFact` with the
    status, score, hits (`label=code`), errors (for the log) and the reply
    text ("listed by zen.spamhaus.org (127.0.0.2)").
Failure modes:
    bad configuration text raises ValueError (the caller names the key);
    evaluation never raises: a list that fails contributes nothing to the
    score and is named in `errors`, and the fact's status is UNKNOWN.
Defaults and why:
    * weight 1 (postscreen's default weight for a site without `*N`).
    * codes: every 127.0.0.0/8 answer except 127.0.0.1 and 127.0.0.255.
      RFC 5782 §2.1 puts list answers in 127.0.0.0/8; lists use 127.0.0.1
      for "query refused" (URIBL) and 127.0.0.255 for "over quota" (DNSWL.org),
      never for a listing. Configure codes for a list with several meanings
      (zen: SBL 127.0.0.2-3, XBL 127.0.0.4-7, PBL 127.0.0.10-11).
    * 127.255.255.0/24 is always an error, even inside configured codes:
      Spamhaus answers 127.255.255.252 (typing error in the zone name),
      .254 (query through a public resolver) and .255 (too many queries);
      taking those for listings would reject all mail.
    * An answer outside 127.0.0.0/8 is an error: a resolver that rewrites
      NXDOMAIN to an advertising page's address would otherwise list everyone.
    * A list that failed contributes 0 and makes the status UNKNOWN, the score
      stays the sum of the lists that answered (a DNSBL outage must not block
      mail, as in postscreen); if every list failed the score is "unknown".
      That sum is a lower bound of the true score only while every list that
      failed weighs more than 0: when a list with a negative weight (an
      allowlist such as DNSWL) fails, the score is "unknown" (issue 19 item
      4: an allowlist outage must not turn into a certain, higher score and
      a 550).
    * 127.0.0.1 and 127.0.0.255 ("query refused", "over quota") answered to
      a list that does not configure them as codes are list errors, like a
      timeout: not a real answer that merely lists nothing.
    * Entries with the same zone share one query; each entry scores once if
      any answer code matches it (postscreen counts a site once per reply).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

from smtpguard.core.facts import NONE, OK, UNKNOWN, FactValue
from smtpguard.core.ip import unmapped

# RFC 5782 §2.1: DNSxL answers are addresses in 127.0.0.0/8.
LIST_NETWORK = ipaddress.IPv4Network("127.0.0.0/8")

# Answers that are errors whatever the configured codes say (a table: the
# log line names the meaning).
ERROR_CODES: dict[str, str] = {
    "127.255.255.252": "typing error in the zone name (Spamhaus)",
    "127.255.255.254": "query through a public or open resolver refused (Spamhaus)",
    "127.255.255.255": "excessive number of queries (Spamhaus)",
}
ERROR_NETWORK = ipaddress.IPv4Network("127.255.255.0/24")  # Spamhaus reserves it for errors

# Not listings unless configured: "query refused" (URIBL) and "over quota"
# (DNSWL.org) answers.
DEFAULT_EXCLUDED: dict[str, str] = {
    "127.0.0.1": "query refused (URIBL and others)",
    "127.0.0.255": "query volume exceeded (DNSWL.org)",
}

DEFAULT_WEIGHT = 1  # postscreen_dnsbl_sites: a site without *N weighs 1

# The longest query prefix is an IPv6 address in nibble form: 32 nibbles and
# 32 dots (RFC 3596 §2.5); a name is at most 253 characters (RFC 1035 §2.3.4).
_PREFIX_MAX = 64
ZONE_MAX = 253 - _PREFIX_MAX
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


@dataclass(frozen=True, slots=True)
class CodeRange:
    """An inclusive range of IPv4 answer codes, as integers."""

    low: int
    high: int

    def __contains__(self, code: int) -> bool:
        return self.low <= code <= self.high

    def __str__(self) -> str:
        low, high = ipaddress.IPv4Address(self.low), ipaddress.IPv4Address(self.high)
        return str(low) if self.low == self.high else f"{low}-{high}"


def _ranges_without(network: ipaddress.IPv4Network, holes: Sequence[str]) -> tuple[CodeRange, ...]:
    out: list[CodeRange] = []
    low = int(network.network_address)
    for hole in sorted(int(ipaddress.IPv4Address(h)) for h in holes):
        if hole > low:
            out.append(CodeRange(low, hole - 1))
        low = hole + 1
    out.append(CodeRange(low, int(network.broadcast_address)))
    return tuple(out)


# The default codes: 127.0.0.0/8 less the default exclusions (the error
# network is refused separately, before codes are looked at).
DEFAULT_CODES: tuple[CodeRange, ...] = _ranges_without(LIST_NETWORK, tuple(DEFAULT_EXCLUDED))


@dataclass(frozen=True, slots=True)
class DnsblList:
    """One `[[dnsbl]]` entry."""

    zone: str                                 # lower case, no final dot
    weight: int = DEFAULT_WEIGHT              # negative: an allowlist (DNSWL)
    codes: tuple[CodeRange, ...] = ()         # empty: DEFAULT_CODES
    name: str = ""                            # shown instead of the zone (hides a DQS key)

    @property
    def label(self) -> str:
        return self.name or self.zone

    @property
    def ranges(self) -> tuple[CodeRange, ...]:
        return self.codes or DEFAULT_CODES

    def matches(self, code: int) -> bool:
        return any(code in r for r in self.ranges)


@dataclass(frozen=True, slots=True)
class ZoneAnswer:
    """What DNS said for one zone's query name."""

    status: str                        # OK, NONE or UNKNOWN
    addresses: tuple[str, ...] = ()    # the A records when OK
    reason: str = ""                   # why UNKNOWN (timeout, servfail, ...)


# The `dnsbl` fact: whether any list lists the client, or a list could not
# tell (so a rule can tempfail while a list is down rather than pass).
DNSBL_STATE: dict[str, str] = {OK: "listed", NONE: "none", UNKNOWN: "unknown"}


@dataclass(frozen=True, slots=True)
class DnsblFact:
    """The client's standing on all configured lists."""

    status: str                   # OK: listed somewhere; NONE: on no list; UNKNOWN: a list failed
    score: int = 0                # sum of the weights of listing entries, lists that answered
    hits: tuple[str, ...] = ()    # "label=code", by label then code
    errors: tuple[str, ...] = ()  # "label: reason", for the log
    text: str = ""                # for the reply: "listed by zen.spamhaus.org (127.0.0.2)"
    answered: int = 0             # zones that gave a usable answer
    failed: int = 0               # zones that did not
    allow_failed: bool = False    # a failed zone has an entry of negative weight

    def as_facts(self) -> dict[str, FactValue]:
        score: FactValue = self.score
        if (self.failed and not self.answered) or self.allow_failed:
            score = UNKNOWN
        return {"dnsbl": DNSBL_STATE[self.status], "dnsbl_score": score, "dnsbl_hits": self.hits}


def parse_code(text: str) -> CodeRange:
    """`127.0.0.2`, `127.0.0.2-127.0.0.11` or `127.0.0.0/24` -> ranges.

    Codes must lie in 127.0.0.0/8 (RFC 5782 §2.1): anything else can never
    be a listing here."""
    text = text.strip()
    try:
        if "/" in text:
            net = ipaddress.IPv4Network(text, strict=True)
            low, high = int(net.network_address), int(net.broadcast_address)
        elif "-" in text:
            first, last = (ipaddress.IPv4Address(p.strip()) for p in text.split("-", 1))
            low, high = int(first), int(last)
        else:
            low = high = int(ipaddress.IPv4Address(text))
    except ValueError:
        raise ValueError(f"expected an address like 127.0.0.2, a range like 127.0.0.2-127.0.0.11 "
                         f"or a network like 127.0.0.0/24, got {text!r}") from None
    if low > high:
        raise ValueError(f"range {text!r} ends before it starts")
    net_low, net_high = int(LIST_NETWORK.network_address), int(LIST_NETWORK.broadcast_address)
    if low < net_low or high > net_high:
        raise ValueError(f"{text!r} is outside 127.0.0.0/8, where DNS lists answer (RFC 5782 §2.1)")
    return CodeRange(low, high)


def parse_zone(text: str) -> str:
    """A list's zone: lower case, no final dot; short enough for IPv6 queries."""
    zone = text.strip().lower().rstrip(".")
    if not zone or len(zone) > ZONE_MAX:
        raise ValueError(f"expected a DNS zone like zen.spamhaus.org of at most {ZONE_MAX} characters, got {text!r}")
    if not all(_LABEL.match(label) for label in zone.split(".")):
        raise ValueError(f"{text!r} is not a DNS name (letters, digits, '-', '_' in dot-separated labels)")
    return zone


def query_name(ip: str, zone: str) -> str:
    """The name to ask a list about an address (RFC 5782 §2.1, §2.4):
    IPv4 octets reversed (192.0.2.1 -> 1.2.0.192.zone); IPv6 as 32 nibbles
    reversed; an IPv4-mapped IPv6 address as IPv4. Raises ValueError."""
    addr = unmapped(ipaddress.ip_address(ip.strip()))
    if isinstance(addr, ipaddress.IPv4Address):
        prefix = ".".join(reversed(str(addr).split(".")))
    else:
        prefix = ".".join(reversed(addr.exploded.replace(":", "")))
    return f"{prefix}.{zone}"


def zones(lists: Sequence[DnsblList]) -> tuple[str, ...]:
    """The distinct zones to ask, in configuration order."""
    return tuple(dict.fromkeys(entry.zone for entry in lists))


def _error(code: str) -> str | None:
    """Why an answer address can never be a listing, or None."""
    try:
        addr = ipaddress.IPv4Address(code)
    except ValueError:
        return f"answer {code!r} is not an IPv4 address"
    if addr not in LIST_NETWORK:
        return f"answer {code} is outside 127.0.0.0/8 (a resolver rewriting NXDOMAIN?)"
    if addr in ERROR_NETWORK:
        meaning = ERROR_CODES.get(code, "error code")
        return f"answer {code}: {meaning}"
    return None


def evaluate(lists: Sequence[DnsblList], answers: Mapping[str, ZoneAnswer]) -> DnsblFact:
    """Score a client from each zone's answer (keyed by zone); see the module
    docstring for what counts as a listing and what as an error."""
    if not lists:
        return DnsblFact(NONE)
    by_zone: dict[str, list[DnsblList]] = {}
    for entry in lists:
        by_zone.setdefault(entry.zone, []).append(entry)

    score = 0
    hits: set[str] = set()
    errors: list[str] = []
    listed_text: list[str] = []
    answered = failed = 0
    allow_failed = False
    for zone, entries in by_zone.items():
        label = entries[0].label
        answer = answers.get(zone, ZoneAnswer(UNKNOWN, reason="not asked"))
        if answer.status == UNKNOWN:
            failed += 1
            allow_failed = allow_failed or any(e.weight < 0 for e in entries)
            errors.append(f"{label}: {answer.reason or 'no answer'}")
            continue
        if answer.status == NONE:
            answered += 1
            continue
        usable = False
        matched: dict[int, list[str]] = {}  # entry index -> its codes that matched
        for code in answer.addresses:
            why = _error(code)
            if why is None:
                value = int(ipaddress.IPv4Address(code))
                owners = [i for i, entry in enumerate(entries) if entry.matches(value)]
                if owners:
                    usable = True
                    hits.add(f"{entries[owners[0]].label}={code}")
                    for i in owners:
                        matched.setdefault(i, []).append(code)
                    continue
                if code in DEFAULT_EXCLUDED:
                    why = f"answer {code}: {DEFAULT_EXCLUDED[code]}"  # an error, not an answer
                else:
                    usable = True  # a real answer, just not one we score
                    why = f"answer {code} is not among the configured codes"
            errors.append(f"{label}: {why}")
        if not usable:
            failed += 1
            allow_failed = allow_failed or any(e.weight < 0 for e in entries)
            continue
        answered += 1
        for i, codes in sorted(matched.items()):
            entry = entries[i]
            score += entry.weight
            if entry.weight > 0:
                listed_text.append(f"{entry.label} ({', '.join(sorted(set(codes), key=_code_order))})")

    if failed:
        status = UNKNOWN
    elif hits:
        status = OK
    else:
        status = NONE
    text = f"listed by {', '.join(dict.fromkeys(listed_text))}" if listed_text else ""
    ordered = sorted(hits, key=lambda hit: (hit.rpartition("=")[0], _code_order(hit.rpartition("=")[2])))
    return DnsblFact(status, score, tuple(ordered), tuple(errors), text, answered, failed, allow_failed)


def _code_order(code: str) -> int:
    """Numeric order of answer codes (127.0.0.4 before 127.0.0.10)."""
    return int(ipaddress.IPv4Address(code))
