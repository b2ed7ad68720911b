"""Generic reverse-DNS names: does a PTR name mark an access-pool address?

What it decides
    Whether a reverse-DNS name looks like one an access provider generated
    for a pool of end-user addresses (``c-73-15-22-101.hsd1.ca.comcast.net``,
    ``p4fc2a3b4.dip0.t-ipconnect.de``) or a hoster's default PTR for a rented
    machine (``ec2-54-210-33-7.compute-1.amazonaws.com``), rather than a name
    an operator chose for a mail server (``mail-ej1-f54.google.com``). This is
    the long-standing practice behind Spamhaus PBL and the naming conventions
    catalogued in draft-msullivan-dnsop-generic-naming-schemes: generic names
    embed the address and carry a pool word; server names do not, or carry a
    mail word that outweighs both.

Inputs
    The PTR name, the client address, whether the name is forward-confirmed,
    optionally its registrable domain (the rDNS source passes the ICANN Public
    Suffix List answer; without it a two/three-label heuristic is used), and
    the admin's extra generic patterns and exceptions (see ``compile_rules``).

Output
    ``GenericVerdict(generic, score, reasons)``. ``reasons`` names every piece
    of evidence (``ip:full-decimal``, ``word:dynamic=dyn``, ``mail:smtp``,
    ``unconfirmed``...) for the decision log. ``RdnsFact`` (built by
    sources/rdns.py) carries the verdict with the lookups' outcome and
    flattens to the ``rdns*`` facts.

Rules, in order
    1. An admin exception matching the name: not generic.
    2. An admin generic pattern matching the name: generic.
    3. Otherwise a score, the sum of the strongest evidence of each kind in
       ``WEIGHTS``; generic when ``score >= GENERIC_THRESHOLD``:
       - the address embedded in the name (decimal dashed/dotted/any separator,
         zero-padded, reversed, scattered with words between the octets, hex,
         three octets in hex, 12 padded digits, the address as one 32-bit
         number; IPv6 groups padded or not, 32 nibbles, reversed nibbles). The
         whole name is searched, as some providers put the network in the
         domain (``ip-51-91-12.eu``);
       - a numbering plan without the address: a MAC address (cable modems,
         ``s0106001a2b3c4d5e``) or a machine serial (``vmi123456``,
         ``li1234-56``, ``vps-12ab34cd``), the latter helped by a hoster's
         word in the registrable domain (``contaboserver.net``);
       - pool words in the *host part* (labels left of the registrable
         domain), by tier (``WORD_TIERS``). A word in the domain says nothing:
         ``mx1.dyndns.org`` is the provider's own server;
       - a second, different pool word counts for (``dynamic-ip-adsl``);
       - mail words in the host part (``MAIL_WORDS``) count against;
       - an unconfirmed name counts for (an operator who chose a name for a
         mail server also publishes its A record);
       - a forward-confirmed name with digits but no numbering plan (no
         address, serial, MAC or three numbers: ``static1.company.com``,
         ``client2.university.edu``) was named by hand: its pool word counts
         at most CHOSEN_NAME_WORD_CAP, so it needs a second witness;
       - a forward-confirmed name that is also the client's HELO name (when
         the caller knows it) counts against;
       - a host part without a single digit counts against (pool names are
         numbered by construction).
    A mail word outweighs a partial address (``a8-31.smtp-out.amazonses.com``)
    and even a full one (``66-220-144-178.mail-mail.facebook.com``), but not
    a full address *and* a dynamic word (``mx-ll-180.183.96-3.dynamic.3bb.co.th``).

    ``static`` counts as a pool word: ISPs name fixed end-user lines that way
    and Spamhaus PBL lists them; a mail server on such a line is expected to
    have a PTR its operator chose.

Failure modes
    None: pure, total on any string. A name or address that does not parse
    simply yields less evidence. Bad admin regexes are refused by
    ``compile_rules`` (ValueError) so that the config loader can name the key.

Defaults and why
    Weights and the threshold were set on the tuning set
    (tests/data/rdns_labelled.tsv and the `tune` rows of
    tests/data/rdns_eval.tsv); bench/detection_eval.py measures them on the
    held-out `eval` rows. A full embedded address alone, a dynamic/access
    word alone in a generated-looking name, or a MAC address is enough;
    half-evidence (a serial, a hosting word, part of the address) needs a
    second witness.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence, Union

from smtpguard.core.facts import NONE, OK, UNKNOWN, FactValue
from smtpguard.core.ip import unmapped

# -- evidence weights ------------------------------------------------------
# Generic when the score reaches GENERIC_THRESHOLD. One full embedded address
# or one access word is sufficient on its own (PBL practice: either marks the
# name as derived from the address plan); a partial address needs a second
# witness.
GENERIC_THRESHOLD = 3

WEIGHTS: dict[str, int] = {
    "ip:full": 3,        # all four octets / >=4 IPv6 groups / hex / nibbles
    "ip:scattered": 2,   # all four octets within six numbers, any order
    "ip:three": 2,       # three consecutive octets (network or host end)
    "ip:two": 1,         # the last two octets: ESPs do this too (a8-31.smtp-out)
    "word:dynamic": 4,   # the provider says the address is dynamic
    "word:access": 3,    # end-user access line (dsl, cable, cpe, static...)
    "word:hosting": 2,   # a rented machine's default name (vps, compute)
    "word:weak": 1,      # host, ip: common in pool names and elsewhere
    "word:second": 1,    # a second, different pool word (dynamic-ip-adsl)
    "serial": 2,         # a machine serial: vmi123456, h2890123, a random hex id
    "mac": 3,            # a MAC address (cable modems: s0106001a2b3c4d5e)
    "domain:hosting": 1, # a hoster's domain (contaboserver.net), only with a serial
    "mail": -3,          # a mail word chosen by the operator
    "unconfirmed": 1,    # no forward confirmation
    "no-digits": -2,     # host part without any digit
    "helo-is-name": -1,  # forward-confirmed and the client's HELO name: chosen
}

# A forward-confirmed name that shows no numbering plan (no address, serial,
# MAC or run of numbers: ``static1.company.com``, ``client2.university.edu``)
# was named by hand: its pool word counts at most this much, so that it
# needs a second witness. Pool names are generated from a plan by
# construction; a single word with a small index is not one.
CHOSEN_NAME_WORD_CAP = 2

# -- pool words, matched against each alphabetic run of the host part -------
# (``hsd1`` gives ``hsd``; ``cpe00fc8d`` gives ``cpe``) and each dash-separated
# piece (``4g``). Sources: the token list of
# draft-msullivan-dnsop-generic-naming-schemes §3 and the PBL's published
# examples, extended with the words the labelled set's providers use.
WORD_TIERS: dict[str, frozenset[str]] = {
    "word:dynamic": frozenset({
        "dyn", "dynamic", "dynip", "dynamicip", "dhcp", "dial", "dialup",
        "dialin", "dip", "ppp", "pppoe", "pppoa", "pool", "pools", "apn",
        "gprs", "cgnat", "nat", "ras", "ipoe", "dsldyn", "dhcpd",
    }),
    "word:access": frozenset({
        "dsl", "adsl", "xdsl", "vdsl", "sdsl", "dslb", "cable", "catv",
        "cablemodem", "modemcable", "cm", "cpe", "cpc", "broadband", "broad",
        "bb", "bbcust", "hsd", "hsi", "ftth", "fttb", "fttc", "fttp", "fttx",
        "fibre", "fiber", "fios", "wifi", "wireless", "wlan", "wimax",
        "mobile", "mob", "3g", "4g", "5g", "lte", "umts", "cust", "customer",
        "customers", "client", "clients", "dclient", "subscriber", "subs",
        "sub", "user", "users", "res", "residential", "home", "static",
        "staticip", "abo", "fbx", "access", "members", "fixed", "laajakaista",
        "hfc", "bras", "triband", "pools", "xdslb",
        # NTT FLET'S access lines as OCN names them (p<port>-ipngn<id><city>,
        # p<port>-ipbf<id><city>): the line type, not a host name
        "ipngn", "ipbf",
    }),
    "word:hosting": frozenset({
        "vps", "vm", "compute", "instances", "instance", "cloud", "dedicated",
        "usercontent", "clients",
    }),
    "word:weak": frozenset({"host", "ip", "ipv4", "ipv6", "ip4", "ip6", "node"}),
}

# Long, unambiguous stems also count inside a longer run (``dynamicip``,
# ``adslplus``): none of them occurs inside an ordinary word.
WORD_STEMS: dict[str, tuple[str, ...]] = {
    "word:dynamic": ("dynamic", "dialup", "dialin", "pppoe"),
    "word:access": ("broadband", "adsl", "vdsl", "xdsl", "cable", "ftth", "static", "residential"),
}

# -- mail words: an operator named this host for mail --------------------------
MAIL_WORDS: frozenset[str] = frozenset({
    "mail", "email", "mailout", "mailer", "smtp", "smtpout", "mx", "mxout",
    "out", "outbound", "outgoing", "relay", "mta", "mo", "mout", "bounce",
    "bounces", "sender", "esa", "forward",
})
# Stems that mark mail inside a longer run (``mailgw``, ``resomta``, ``cvsmtppost``).
MAIL_STEMS: tuple[str, ...] = ("mail", "smtp", "mta")

# Common second-level labels under country codes, for the fallback
# registrable-domain heuristic when no Public Suffix List answer is given.
_SECOND_LEVEL = frozenset({
    "co", "com", "net", "org", "ac", "ad", "ne", "or", "gov", "edu", "go", "gr", "lg",
})

_DIGITS = re.compile(r"\d+")
_ALPHA = re.compile(r"[a-z]+")
_HEXRUN = re.compile(r"[0-9a-f]{16,}")
# A machine serial as a hoster writes it: a short prefix and five or more
# digits (vmi123456, ns3012345, srv123456, p3261234), a linode-style
# li1234-56 (four digits: so254-35.mailgun.net is a sender's pool), or a random hex id of eight or more with letters and digits.
_SERIAL = re.compile(r"[a-z]{1,5}\d{5,}|[a-z]{2}\d{4,}-\d{1,3}")
_HEX_ID = re.compile(r"[0-9a-f]{8,}")
# A MAC address, alone or behind a short hex prefix (Shaw's s0106 + MAC).
_MAC = re.compile(r"[0-9a-f]{12,16}")
_LETTERS = re.compile(r"[a-f]")
_DIGIT = re.compile(r"\d")
# Hoster words in the registrable domain (contaboserver.net, hstgr.cloud):
# a witness for a serial only, never on their own (mx1.dyndns.org).
HOSTING_DOMAIN_STEMS: tuple[str, ...] = ("server", "cloud", "vps", "host", "linode", "hstgr")
_REGEX_META = frozenset("^$*+?()[]{}|\\")
_PLAIN_DOMAIN = re.compile(r"\.?[a-z0-9-]+(\.[a-z0-9-]+)*")


@dataclass(frozen=True, slots=True)
class GenericVerdict:
    """The classifier's answer with its evidence, for the decision log."""

    generic: bool
    score: int
    reasons: tuple[str, ...]


def compile_rules(entries: Iterable[str]) -> tuple[re.Pattern[str], ...]:
    """Compile admin entries: a plain domain or a regular expression.

    ``example.com`` matches that name only and ``.example.com`` any name under
    it (the project's domain-list rule); anything with a regex metacharacter
    is a regular expression searched case-insensitively in the name.
    Raises ValueError naming the bad entry.
    """
    out: list[re.Pattern[str]] = []
    for entry in entries:
        text = entry.strip().lower()
        if not text:
            raise ValueError("empty entry")
        if not (_REGEX_META & set(text)) and _PLAIN_DOMAIN.fullmatch(text):
            if text.startswith("."):
                out.append(re.compile(r"\." + re.escape(text[1:].rstrip(".")) + r"\Z"))
            else:
                out.append(re.compile(r"\A" + re.escape(text.rstrip(".")) + r"\Z"))
            continue
        try:
            out.append(re.compile(text, re.IGNORECASE))
        except re.error as exc:
            raise ValueError(f"{entry!r} is not a valid regular expression: {exc}") from None
    return tuple(out)


def registrable_guess(name: str) -> str:
    """Fallback registrable domain: the last two labels, or three under a
    common country-code second level (``ocn.ne.jp``). The rDNS source uses
    the Public Suffix List instead."""
    labels = name.split(".")
    if len(labels) >= 3 and len(labels[-1]) == 2 and labels[-2] in _SECOND_LEVEL:
        return ".".join(labels[-3:])
    return ".".join(labels[-2:])


def host_part(name: str, domain: str | None = None) -> str:
    """The labels left of the registrable domain ("" when there are none)."""
    name = _normalise(name)
    dom = _normalise(domain) if domain else registrable_guess(name)
    if name == dom or not name.endswith("." + dom):
        return "" if name == dom else name
    return name[: -len(dom) - 1]


def classify(
    name: str,
    ip: str,
    *,
    confirmed: bool,
    domain: str | None = None,
    extra_patterns: Sequence[re.Pattern[str]] = (),
    exceptions: Sequence[re.Pattern[str]] = (),
    helo: str | None = None,
) -> GenericVerdict:
    """Classify a PTR name; see the module docstring for the rules.

    ``helo``: the client's HELO name when known (the check command, the HELO
    stage); a forward-confirmed name that the client also gives as its HELO
    name was chosen by its operator and needs one more piece of evidence.
    """
    name = _normalise(name)
    for pat in exceptions:
        if pat.search(name):
            return GenericVerdict(False, 0, (f"exception:{pat.pattern}",))
    for pat in extra_patterns:
        if pat.search(name):
            return GenericVerdict(True, GENERIC_THRESHOLD, (f"pattern:{pat.pattern}",))

    reasons: list[str] = []
    score = 0
    ip_kind = _address_evidence(name, ip)
    if ip_kind is not None:
        kind, form = ip_kind
        score += WEIGHTS[kind]
        reasons.append(f"{kind}-{form}")

    host = host_part(name, domain)
    runs, pieces = _tokens(host)
    numbering = _numbering(host, pieces)
    if numbering is not None:
        score += WEIGHTS[numbering[0]]
        reasons.append(f"{numbering[0]}={numbering[1]}")
        if numbering[0] == "serial":
            registrable = name[len(host) + 1:] if host else name
            if any(stem in registrable for stem in HOSTING_DOMAIN_STEMS):
                score += WEIGHTS["domain:hosting"]
                reasons.append("domain:hosting")
    tier = _strongest_word(runs, pieces)
    if tier is not None:
        weight = WEIGHTS[tier[0]]
        plan = ip_kind is not None or numbering is not None or len(_DIGITS.findall(host)) >= 3
        if confirmed and not plan and weight > CHOSEN_NAME_WORD_CAP and any(c.isdigit() for c in host):
            weight = CHOSEN_NAME_WORD_CAP
            reasons.append("chosen-name")
        score += weight
        reasons.append(f"{tier[0]}={tier[1]}")
        second = _second_pool_word(runs, pieces, tier[1])
        if second is not None:
            score += WEIGHTS["word:second"]
            reasons.append(f"word:second={second}")
    mail = next((r for r in runs if r in MAIL_WORDS or any(s in r for s in MAIL_STEMS)), None)
    if mail is not None:
        score += WEIGHTS["mail"]
        reasons.append(f"mail:{mail}")
    if not confirmed:
        score += WEIGHTS["unconfirmed"]
        reasons.append("unconfirmed")
    if not any(c.isdigit() for c in host):
        score += WEIGHTS["no-digits"]
        reasons.append("no-digits")
    if confirmed and helo is not None and _normalise(helo) == name:
        score += WEIGHTS["helo-is-name"]
        reasons.append("helo-is-name")
    return GenericVerdict(score >= GENERIC_THRESHOLD, score, tuple(reasons))


def is_generic(
    name: str,
    ip: str,
    *,
    confirmed: bool,
    domain: str | None = None,
    extra_patterns: Sequence[re.Pattern[str]] = (),
    exceptions: Sequence[re.Pattern[str]] = (),
    helo: str | None = None,
) -> bool:
    """``classify(...).generic``."""
    return classify(
        name, ip, confirmed=confirmed, domain=domain,
        extra_patterns=extra_patterns, exceptions=exceptions, helo=helo,
    ).generic


# -- the fact ----------------------------------------------------------------

# The `rdns` fact's values (core/facts.py: none unconfirmed confirmed unknown).
RDNS_NONE = "none"                # no PTR record
RDNS_UNCONFIRMED = "unconfirmed"  # no PTR name resolves back to the address
RDNS_CONFIRMED = "confirmed"      # a PTR name's A/AAAA contain the address
RDNS_UNKNOWN = UNKNOWN            # a lookup failed and nothing confirmed

# rdns value -> the fact's status (OK/NONE/UNKNOWN).
RDNS_STATUS: dict[str, str] = {
    RDNS_NONE: NONE,
    RDNS_UNCONFIRMED: OK,
    RDNS_CONFIRMED: OK,
    RDNS_UNKNOWN: UNKNOWN,
}

Tri = Union[bool, str]  # True, False or UNKNOWN


@dataclass(frozen=True, slots=True)
class RdnsFact:
    """Reverse DNS of one client (built by sources/rdns.py)."""

    rdns: str                       # RDNS_NONE / _UNCONFIRMED / _CONFIRMED / _UNKNOWN
    name: str = ""                  # the confirmed name, else the first PTR name, else ""
    domain: str = ""                # its registrable domain (ICANN PSL), else ""
    generic: Tri = False            # classify(); UNKNOWN when rdns is unknown
    names: tuple[str, ...] = ()     # the PTR names looked at (bounded)
    reasons: tuple[str, ...] = ()   # the classifier's evidence, for the log
    error: str = ""                 # why rdns is unknown (timeout, servfail, deadline...)

    @property
    def status(self) -> str:
        return RDNS_STATUS[self.rdns]

    def as_facts(self) -> dict[str, FactValue]:
        # A failed PTR lookup leaves no name: the name is then "unknown" too.
        name = self.name or (UNKNOWN if self.rdns == RDNS_UNKNOWN else "")
        domain = self.domain or (UNKNOWN if self.rdns == RDNS_UNKNOWN and not self.name else "")
        return {
            "rdns": self.rdns,
            "rdns_name": name,
            "rdns_domain": domain,
            "rdns_generic": self.generic,
        }


# -- evidence ----------------------------------------------------------------


def _normalise(name: str) -> str:
    return name.strip().lower().rstrip(".")


def _tokens(host: str) -> tuple[list[str], list[str]]:
    """Alphabetic runs and dash/underscore-separated pieces of the host part."""
    pieces = [p for label in host.split(".") for p in re.split(r"[-_]", label) if p]
    runs = [r for p in pieces for r in _ALPHA.findall(p)]
    return runs, pieces


def _strongest_word(runs: list[str], pieces: list[str]) -> tuple[str, str] | None:
    best: tuple[str, str] | None = None
    for tier, words in WORD_TIERS.items():
        stems = WORD_STEMS.get(tier, ())
        hit = next((t for t in (*runs, *pieces) if t in words), None)
        if hit is None:
            hit = next((r for r in runs if any(s in r for s in stems)), None)
        if hit is not None and (best is None or WEIGHTS[tier] > WEIGHTS[best[0]]):
            best = (tier, hit)
    return best


_POOL_TIERS = ("word:dynamic", "word:access")


def _second_pool_word(runs: list[str], pieces: list[str], first: str) -> str | None:
    """Another dynamic/access word than `first` (``dynamic-ip-adsl``)."""
    words = WORD_TIERS["word:dynamic"] | WORD_TIERS["word:access"]
    if first not in words:
        return None
    return next((t for t in dict.fromkeys((*runs, *pieces)) if t in words and t != first), None)


def _numbering(host: str, pieces: list[str]) -> tuple[str, str] | None:
    """A MAC address or a machine serial in the host part, if any."""
    for piece in pieces:
        if len(piece) >= 12:
            for run in _HEX_ID.findall(piece):
                if _MAC.fullmatch(run) and _LETTERS.search(run) and _DIGIT.search(run):
                    return ("mac", run)
    for part in (*host.split("."), *pieces):
        if _SERIAL.fullmatch(part):
            return ("serial", part)
    for piece in pieces:
        if len(piece) >= 8 and _HEX_ID.fullmatch(piece):
            letters = len(_LETTERS.findall(piece))
            if letters >= 2 and len(piece) - letters >= 2:
                return ("serial", piece)
    return None


def _address_evidence(name: str, ip: str) -> tuple[str, str] | None:
    """The strongest form in which the address appears in the name."""
    try:
        addr = unmapped(ipaddress.ip_address(ip.strip().strip("[]")))
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv4Address):
        return _v4_evidence(name, addr)
    return _v6_evidence(name, addr)


def _v4_evidence(name: str, addr: ipaddress.IPv4Address) -> tuple[str, str] | None:
    octets = tuple(addr.packed)
    hexform = addr.packed.hex()
    if hexform in name:
        return ("ip:full", "hex")
    if str(int(addr)) in _DIGITS.findall(name):
        return ("ip:full", "integer")         # ip-1383734404: the address as one number
    padded = "".join(f"{o:03d}" for o in octets)
    padded_rev = "".join(f"{o:03d}" for o in reversed(octets))
    texts = [m.group() for m in _DIGITS.finditer(name)]
    if padded in texts or padded_rev in texts:
        return ("ip:full", "padded")
    # Numbers of at most three digits, in order; longer runs break adjacency.
    nums = [int(t) if len(t) <= 3 else -1 for t in texts]
    fwd, rev = octets, octets[::-1]
    windows = {n: [tuple(nums[i:i + n]) for i in range(len(nums) - n + 1)] for n in (2, 3, 4)}
    if fwd in windows[4]:
        return ("ip:full", "decimal")
    if rev in windows[4]:
        return ("ip:full", "reversed")
    need = Counter(octets)
    for size in (4, 5, 6):
        for i in range(len(nums) - size + 1):
            if not need - Counter(nums[i:i + size]):
                return ("ip:scattered", "decimal")
    threes = {fwd[1:], fwd[:3], rev[:3], rev[1:]}
    if any(w in threes for w in windows[3]):
        return ("ip:three", "decimal")
    if addr.packed[:3].hex() in name or addr.packed[1:].hex() in name:
        return ("ip:three", "hex")            # dsl-hkibng12-54f8a1-9: three octets in hex
    if any(w in {fwd[2:], rev[:2]} for w in windows[2]):
        return ("ip:two", "decimal")
    return None


def _v6_evidence(name: str, addr: ipaddress.IPv6Address) -> tuple[str, str] | None:
    nibbles = addr.exploded.replace(":", "")
    for run in _HEXRUN.findall(name):
        if run in nibbles:
            return ("ip:full", "nibbles")
    pieces = re.split(r"[-._:]", name)
    # Reversed nibble labels, as in ip6.arpa: 1.0.0.0.0.0...
    singles = ""
    for p in [*pieces, ""]:
        if len(p) == 1 and p in "0123456789abcdef":
            singles += p
            continue
        if len(singles) >= 16 and singles[::-1] in nibbles:
            return ("ip:full", "reversed-nibbles")
        singles = ""
    groups = [int(g, 16) for g in addr.exploded.split(":")]
    forms = [{f"{g:04x}", f"{g:x}"} for g in groups]
    # Runs of consecutive groups; a partial run counts only at the host end
    # (ending at the last group): the leading groups are the provider's
    # prefix, which every customer's name shares.
    best = tail = 0
    for start in range(len(pieces)):
        for g0 in range(8):
            n = 0
            while start + n < len(pieces) and g0 + n < 8 and pieces[start + n] in forms[g0 + n]:
                n += 1
            if sum(1 for g in groups[g0:g0 + n] if g) < 2:
                continue
            best = max(best, n)
            if g0 + n == 8:
                tail = max(tail, n)
    if best >= 4:
        return ("ip:full", "groups")
    if tail >= 2:
        return ("ip:two", "groups")
    return None
