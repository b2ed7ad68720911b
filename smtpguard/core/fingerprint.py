"""Passive OS fingerprint of a client from its own SYN (issue: fingerprinting).

What it decides: which operating-system family sent a TCP SYN (windows,
linux, macos, ios, android, freebsd, openbsd, other, unknown), how many
hops away it is, and how good the match is (exact, fuzzy, generic, none).

Inputs: the raw bytes that Linux returns for `getsockopt(IPPROTO_TCP,
TCP_SAVED_SYN)` — the IPv4 or IPv6 header, then the TCP header with its
options — and a SignatureSet read from text in p0f v3 `p0f.fp` syntax (only
the `[tcp:request]` section is used; README section 5 of p0f describes it).
Reading the file is the caller's job (sources/fingerprint.py); this module is pure.

Output: an OsFact (a `status` and `as_facts()`, like every fact): `os`, `os_name`,
`os_distance`, `os_match`, the matched label and signature, and the parsed
SynFields for display.

Matching, in the order p0f v3 documents it:
  1. exact: a specific (`s:`) signature matching every field;
  2. fuzzy: a specific signature matching except that `df`/`id+` vanished,
     `id-`/`ecn` appeared, the IPv6 flow label differs, or the TTL is more
     than MAX_DISTANCE hops below the signature's initial TTL;
  3. generic: a `g:` signature, exact first, then fuzzy (quirks only: a
     generic signature needs a TTL within MAX_DISTANCE, see below);
  4. none: a SYN that nothing matched: `os` "unknown", `os_match` "none",
     status NONE. Without a usable SYN every fact is "unknown" (UNKNOWN_OS).
The first matching signature in file order wins within each tier.

Deliberate departures from p0f, and why:
  * A TTL *above* a signature's initial TTL never matches (p0f calls it
    fuzzy). TTLs only decrease in transit, so a SYN with TTL 128 cannot come
    from a stack that starts at 64 unless someone set IP_TTL by hand.
    Consequence: a Linux SYN sent with IP_TTL=128 matches no Linux signature
    (TTL too high) and no Windows one (Linux option layout), and comes out
    `os = "unknown"`, `os_match = "none"`. There is no TTL-only fallback:
    the family is never guessed from the TTL alone, because that is exactly
    the spoofable, weakest signal, and a rule that graylists "windows" must
    not hit a Linux server that happens to use TTL 128.
  * A TTL more than MAX_DISTANCE below the initial TTL makes a specific
    signature fuzzy (as in p0f) but rules a generic one out: a generic
    signature already ignores window and scale, and with the TTL relaxed too
    only the option layout would be left, which stacks share (Solaris 10
    writes Windows' MSS,NOP,WS,NOP,NOP,SACK order with TTL 64).
  * A Windows signature (class `win`) matches an IPv4 SYN without DF only
    fuzzily, and only a specific signature whose layout has the window-scale
    option (Vista and newer: the window, the scale and the option order must
    all be Windows' own); a generic Windows signature or an XP-style layout
    without window scaling never matches without DF, nor does a SYN without
    DF whose IP ID is zero (Windows numbers every datagram; a router that
    clears DF leaves the ID alone). Every Windows since
    NT 4 sets DF (path MTU discovery, EnablePMTUDiscovery=1 by default), so
    a Windows SYN arrives without it only when a router or VPN cleared it
    (real traffic has a few: MSS-clamped Windows 10 SYNs in the Trustable
    p0f data, see tests/data/syn_labelled.tsv), while printers, IP phones,
    consoles, OpenVMS and other TTL-128 stacks without DF share XP's
    MSS,NOP,NOP,SACK layout. The shipped policy refuses only on an exact or
    generic Windows match, so such a SYN is graylisted, never refused
    (STRICT_DF_CLASSES).
  * The IPv6 `flow` quirk may appear or vanish as a fuzzy difference: flow
    labels (RFC 6437) are a per-host policy that stacks switched on over the
    years (Linux auto_flowlabels since 3.17), not a property of the stack.

Failure modes: truncated bytes, a non-TCP packet, header or length fields
that disagree with the bytes, or no SYN flag give UNKNOWN_OS (status
UNKNOWN); malformed TCP options set the `bad` quirk, which no signature
carries, so they give os "unknown" / match "none". Nothing here raises on
packet bytes. `load_signatures` raises ValueError naming the line for text
that is not valid p0f v3 syntax; the caller wraps it into a ConfigError.

Defaults and why:
  * INITIAL_TTLS 32/64/128/255: the initial TTLs stacks use (p0f README §5:
    "almost all operating systems use 64, 128, or 255; ancient versions of
    Windows sometimes used 32").
  * MAX_DISTANCE 35: p0f's MAX_DIST; Internet paths are rarely longer than
    30 hops, so a larger gap means the initial TTL is not what we think.
  * Window multiples: besides the SYN's own MSS, the MSS minus 12 (timestamp
    option bytes, when present) and the plain-Ethernet MSS (1460, or 1440 on
    IPv6) are tried, because routers clamp the MSS option (PPPoE, tunnels)
    without touching the window the host computed from its own MSS.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field, replace
from typing import Iterable, NamedTuple

from smtpguard.core.facts import NONE, OK, UNKNOWN, FactValue

# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------

# p0f v3 quirks, in the order p0f prints them (README §5 "quirks").
QUIRK_NAMES: tuple[str, ...] = (
    "df", "id+", "id-", "ecn", "0+", "flow",
    "seq-", "ack+", "ack-", "uptr+", "urgf+", "pushf+",
    "ts1-", "ts2+", "opt+", "exws", "bad",
)
QUIRKS: dict[str, int] = {name: 1 << i for i, name in enumerate(QUIRK_NAMES)}

# README §5: df/id+/id-/0+ are "ignored for IPv6", flow is "ignored for IPv4".
_V4_ONLY = QUIRKS["df"] | QUIRKS["id+"] | QUIRKS["id-"] | QUIRKS["0+"]
_V6_ONLY = QUIRKS["flow"]
# README §5 note: "'df' and 'id+' quirks are allowed to disappear; 'id-' or
# 'ecn' may appear". flow may do either (see the module docstring).
_MAY_VANISH = QUIRKS["df"] | QUIRKS["id+"] | QUIRKS["flow"]
_MAY_APPEAR = QUIRKS["id-"] | QUIRKS["ecn"] | QUIRKS["flow"]
# Signature classes whose IPv4 SYNs must carry DF to match at all, fuzzy or
# not (see "Deliberate departures" in the module docstring).
STRICT_DF_CLASSES: frozenset[str] = frozenset({"win"})

INITIAL_TTLS: tuple[int, ...] = (32, 64, 128, 255)  # p0f README §5 "ittl"
MAX_DISTANCE = 35  # p0f's MAX_DIST: paths longer than this are implausible

# TCP option kinds (IANA "TCP Option Kind Numbers"; RFC 9293 §3.2, RFC 7323,
# RFC 2018) -> p0f layout token and the length the option must have.
OPTION_TOKENS: dict[int, str] = {2: "mss", 3: "ws", 4: "sok", 5: "sack", 8: "ts"}
OPTION_LENGTHS: dict[int, int] = {2: 4, 3: 3, 4: 2, 8: 10}
LAYOUT_TOKENS = frozenset({"nop", "mss", "ws", "sok", "sack", "ts", "eol"})
MAX_WSCALE = 14  # RFC 7323 §2.3: a shift above 14 is an error ("exws")

# Plain-Ethernet MSS (MTU 1500 minus IPv4/IPv6 + TCP headers), tried as the
# base of `mss*N` windows when a router clamped the MSS option.
ETHERNET_MSS: dict[int, int] = {4: 1460, 6: 1440}
HEADER_BYTES: dict[int, int] = {4: 40, 6: 60}  # IP + TCP header, MSS -> MTU
ETHERNET_MTU = 1500

# Families a rule may name (FACTS["os"]). Label names map to them through
# these tables; anything not listed is "other".
FAMILIES: tuple[str, ...] = (
    "windows", "linux", "macos", "ios", "android", "freebsd", "openbsd", "other", "unknown",
)
FAMILY_BY_NAME: dict[str, str] = {
    "windows": "windows",
    "linux": "linux",
    "android": "android",
    "macos": "macos",
    "mac os": "macos",
    "mac os x": "macos",
    "macos x": "macos",
    "os x": "macos",
    "ios": "ios",
    "freebsd": "freebsd",
    "openbsd": "openbsd",
}
# A flavour that names a more precise family than its label name does
# (p0f.fp has "s:unix:Linux:(Android)").
FAMILY_BY_FLAVOR: tuple[tuple[str, re.Pattern[str], str], ...] = (
    ("linux", re.compile(r"\bandroid\b", re.IGNORECASE), "android"),
)

# os_match values (FACTS["os_match"]) and p0f's API os_match_q numbers.
EXACT, FUZZY, GENERIC, NO_MATCH = "exact", "fuzzy", "generic", "none"
MATCH_BY_P0F_QUALITY: dict[int, str] = {0: EXACT, 1: FUZZY, 2: GENERIC, 3: GENERIC}

# Window notations of p0f v3.
WIN_FIXED, WIN_MSS, WIN_MTU, WIN_MOD, WIN_ANY = "fixed", "mss", "mtu", "mod", "any"

_IPV4 = struct.Struct("!BBHHHBBH4s4s")
_IPV6 = struct.Struct("!IHBB16s16s")
_TCP = struct.Struct("!HHIIBBHHH")
_U16 = struct.Struct("!H")
_TS = struct.Struct("!II")
_IPPROTO_TCP = 6
# IPv6 extension headers that may precede TCP in a SYN (RFC 8200 §4):
# hop-by-hop, routing, destination options (length in 8-octet units, not
# counting the first 8) and fragment (always 8 octets).
_V6_EXT_VARIABLE = frozenset({0, 43, 60})
_V6_EXT_FRAGMENT = 44
_V6_MAX_EXT = 8  # more than this many extension headers is not a real SYN

# TCP flag bits (RFC 9293 §3.1, RFC 3168 §6.1 for ECE/CWR).
_FIN, _SYN, _RST, _PSH, _ACK, _URG, _ECE, _CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80


def _quirk_names(bits: int) -> tuple[str, ...]:
    return tuple(name for name in QUIRK_NAMES if bits & QUIRKS[name])


def initial_ttl(ttl: int) -> int:
    """The initial TTL a stack most likely used: the next of 32/64/128/255."""
    for candidate in INITIAL_TTLS:
        if ttl <= candidate:
            return candidate
    return INITIAL_TTLS[-1]


# --------------------------------------------------------------------------
# The parsed SYN
# --------------------------------------------------------------------------


class SynFields(NamedTuple):
    """Everything a fingerprint reads from one SYN.

    A NamedTuple rather than a frozen dataclass (STYLE.md §3) on purpose: it
    is built for every connection, and a frozen dataclass's __init__ alone
    costs about 4 µs of the 20 µs budget for parse + classify; a NamedTuple
    is just as immutable and costs a tenth of that.
    """

    version: int                 # 4 or 6
    ttl: int                     # TTL or hop limit as received
    initial_ttl: int             # estimated: next of INITIAL_TTLS
    distance: int                # initial_ttl - ttl
    olen: int                    # IPv4 options / IPv6 extension header bytes
    df: bool                     # IPv4 don't-fragment (False on IPv6)
    ip_id: int                   # IPv4 identification (0 on IPv6)
    ecn: bool                    # ECN bits in the IP header or ECE/CWR on the SYN
    flow_label: int              # IPv6 flow label (0 on IPv4)
    window: int                  # TCP window field (unscaled on a SYN)
    mss: int | None              # MSS option, if any
    wscale: int | None           # window scale option, if any
    layout: tuple[str, ...]      # option order: mss nop ws sok sack ts eol ?N
    eol_pad: int                 # bytes after an explicit EOL
    ts1: int | None              # own timestamp (TSval)
    ts2: int | None              # peer timestamp (TSecr)
    quirk_bits: int              # QUIRKS bitmask
    payload: int                 # payload bytes announced by the IP length

    @property
    def quirks(self) -> tuple[str, ...]:
        return _quirk_names(self.quirk_bits)

    @property
    def pclass(self) -> str:
        return "+" if self.payload else "0"

    def window_text(self) -> str:
        """The window as p0f would write it: a multiple of MSS when it is one."""
        if self.mss and self.window and self.window % self.mss == 0:
            return f"mss*{self.window // self.mss}"
        return str(self.window)

    def layout_text(self) -> str:
        return ",".join(f"eol+{self.eol_pad}" if t == "eol" else t for t in self.layout)

    def signature(self) -> str:
        """This SYN as a p0f v3 `sig` line, ready to paste into a .fp file."""
        mss = "*" if self.mss is None else str(self.mss)
        return (
            f"{self.version}:{self.ttl}+{self.distance}:{self.olen}:{mss}:"
            f"{self.window_text()},{self.wscale or 0}:{self.layout_text()}:"
            f"{','.join(self.quirks)}:{self.pclass}"
        )

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready view for the `fingerprint` command and the decision log."""
        return {
            "version": self.version,
            "ttl": self.ttl,
            "initial_ttl": self.initial_ttl,
            "distance": self.distance,
            "olen": self.olen,
            "df": self.df,
            "ip_id": self.ip_id,
            "ecn": self.ecn,
            "flow_label": self.flow_label,
            "window": self.window,
            "mss": self.mss,
            "wscale": self.wscale,
            "layout": self.layout_text(),
            "quirks": ",".join(self.quirks),
            "ts1": self.ts1,
            "ts2": self.ts2,
            "pclass": self.pclass,
            "signature": self.signature(),
        }


def parse_syn(data: bytes) -> SynFields | None:
    """IP + TCP header bytes of a SYN -> SynFields, or None if malformed."""
    try:
        return _parse(bytes(data))
    except (struct.error, IndexError, ValueError, TypeError):  # belt and braces
        return None


def _parse(data: bytes) -> SynFields | None:
    size = len(data)
    if size < 20:
        return None
    version = data[0] >> 4
    quirks = 0
    df = False
    ip_id = 0
    flow = 0
    ecn = False
    if version == 4:
        vihl, tos, total, ip_id, frag, ttl, proto, _csum, _src, _dst = _IPV4.unpack_from(data)
        ihl = (vihl & 0x0F) * 4
        if ihl < 20 or size < ihl or proto != _IPPROTO_TCP:
            return None
        olen = ihl - 20
        tcp_at = ihl
        df = bool(frag & 0x4000)
        if frag & 0x8000:
            quirks |= QUIRKS["0+"]          # the reserved flag bit must be zero (RFC 791 §3.1)
        if df and ip_id:
            quirks |= QUIRKS["df"] | QUIRKS["id+"]
        elif df:
            quirks |= QUIRKS["df"]
        elif not ip_id:
            quirks |= QUIRKS["id-"]
        ecn = bool(tos & 0x03)
    elif version == 6:
        if size < 40:
            return None
        word, plen, next_header, ttl, _src, _dst = _IPV6.unpack_from(data)
        flow = word & 0xFFFFF
        ecn = bool((word >> 20) & 0x03)
        if flow:
            quirks |= QUIRKS["flow"]
        tcp_at = 40
        for _ in range(_V6_MAX_EXT):
            if next_header in _V6_EXT_VARIABLE:
                if size < tcp_at + 2:
                    return None
                header_next, ext_len = data[tcp_at], (data[tcp_at + 1] + 1) * 8
            elif next_header == _V6_EXT_FRAGMENT:
                if size < tcp_at + 8:
                    return None
                header_next, ext_len = data[tcp_at], 8
            else:
                break
            next_header = header_next
            tcp_at += ext_len
        if next_header != _IPPROTO_TCP:
            return None
        olen = tcp_at - 40
        total = 40 + plen
    else:
        return None
    if ecn:
        quirks |= QUIRKS["ecn"]

    if size < tcp_at + 20:
        return None
    _sport, _dport, seq, ack, offset, flags, window, _tcsum, urgent = _TCP.unpack_from(data, tcp_at)
    doff = (offset >> 4) * 4
    opt_end = tcp_at + doff
    if doff < 20 or size < opt_end or not flags & _SYN or flags & _RST:
        return None
    payload = total - opt_end
    if payload < 0:
        return None

    if not seq:
        quirks |= QUIRKS["seq-"]
    if flags & _ACK:
        if not ack:
            quirks |= QUIRKS["ack-"]
    elif ack:
        quirks |= QUIRKS["ack+"]
    if flags & _URG:
        quirks |= QUIRKS["urgf+"]
    elif urgent:
        quirks |= QUIRKS["uptr+"]
    if flags & _PSH:
        quirks |= QUIRKS["pushf+"]
    if flags & (_ECE | _CWR):
        quirks |= QUIRKS["ecn"]

    layout: list[str] = []
    mss: int | None = None
    wscale: int | None = None
    ts1: int | None = None
    ts2: int | None = None
    eol_pad = 0
    i = tcp_at + 20
    while i < opt_end:
        kind = data[i]
        if kind == 0:                      # EOL: the rest is padding
            layout.append("eol")
            eol_pad = opt_end - i - 1
            if any(data[i + 1:opt_end]):
                quirks |= QUIRKS["opt+"]
            break
        if kind == 1:                      # NOP
            layout.append("nop")
            i += 1
            continue
        if i + 1 >= opt_end:
            quirks |= QUIRKS["bad"]
            break
        length = data[i + 1]
        if length < 2 or i + length > opt_end:
            quirks |= QUIRKS["bad"]
            break
        expected = OPTION_LENGTHS.get(kind)
        if expected is not None and length != expected:
            quirks |= QUIRKS["bad"]
            break
        if kind == 2:
            mss = _U16.unpack_from(data, i + 2)[0]
        elif kind == 3:
            wscale = data[i + 2]
            if wscale > MAX_WSCALE:
                quirks |= QUIRKS["exws"]
        elif kind == 8:
            ts1, ts2 = _TS.unpack_from(data, i + 2)
            if not ts1:
                quirks |= QUIRKS["ts1-"]
            if ts2:
                quirks |= QUIRKS["ts2+"]
        layout.append(OPTION_TOKENS.get(kind) or f"?{kind}")
        i += length

    ittl = initial_ttl(ttl)
    return SynFields(
        version=version, ttl=ttl, initial_ttl=ittl, distance=ittl - ttl, olen=olen,
        df=df, ip_id=ip_id, ecn=ecn, flow_label=flow, window=window, mss=mss,
        wscale=wscale, layout=tuple(layout), eol_pad=eol_pad, ts1=ts1, ts2=ts2,
        quirk_bits=quirks, payload=payload,
    )


# --------------------------------------------------------------------------
# Signatures (p0f v3 syntax)
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Label:
    """`label = type:class:name:flavor` plus its `sys =` line, if any."""

    generic: bool                # type "g": considered only after specific ones
    cls: str                     # win, unix, other, ... or "!" for applications
    name: str                    # "Windows", "Linux", ...
    flavor: str                  # "7 or 8", "3.11 and newer", ...
    family: str                  # one of FAMILIES
    sys: tuple[str, ...] = ()

    @property
    def display(self) -> str:
        return f"{self.name} {self.flavor}".strip()

    @property
    def text(self) -> str:
        return f"{'g' if self.generic else 's'}:{self.cls}:{self.name}:{self.flavor}"


def family_of(name: str, flavor: str = "") -> str:
    """The family of a label name (tables FAMILY_BY_NAME / FAMILY_BY_FLAVOR)."""
    key = " ".join(name.lower().split())
    family = FAMILY_BY_NAME.get(key, "other")
    for base, pattern, refined in FAMILY_BY_FLAVOR:
        if family == base and pattern.search(flavor):
            return refined
    return family


@dataclass(frozen=True, slots=True)
class Signature:
    """One `sig = ver:ittl:olen:mss:wsize,scale:olayout:quirks:pclass` line."""

    label: Label
    text: str
    line: int
    version: int | None          # 4, 6 or None for '*'
    ittl: int
    random_ttl: bool             # 'NN-': any TTL up to NN, no distance
    olen: int
    mss: int | None
    win_kind: str                # WIN_FIXED / WIN_MSS / WIN_MTU / WIN_MOD / WIN_ANY
    win_value: int
    wscale: int | None
    layout: tuple[str, ...]
    eol_pad: int
    quirk_bits: int
    pclass: str | None           # "0", "+" or None for '*'


@dataclass(frozen=True, slots=True)
class SignatureSet:
    """The `[tcp:request]` signatures of one file, indexed by option layout."""

    signatures: tuple[Signature, ...]
    source: str = ""
    _by_layout: dict[tuple[tuple[str, ...], int], tuple[Signature, ...]] = field(
        default_factory=dict, compare=False, repr=False)

    def __len__(self) -> int:
        return len(self.signatures)

    def candidates(self, layout: tuple[str, ...], eol_pad: int) -> tuple[Signature, ...]:
        return self._by_layout.get((layout, eol_pad), ())


def _index(signatures: Iterable[Signature], source: str) -> SignatureSet:
    sigs = tuple(signatures)
    buckets: dict[tuple[tuple[str, ...], int], list[Signature]] = {}
    for sig in sigs:
        buckets.setdefault((sig.layout, sig.eol_pad), []).append(sig)
    return SignatureSet(sigs, source, {k: tuple(v) for k, v in buckets.items()})


_ITTL = re.compile(r"^(\d{1,3})(?:\+(\d{1,3}|\?))?(-)?$")
_WIN_PREFIXED: tuple[tuple[str, str], ...] = (("mss*", WIN_MSS), ("mtu*", WIN_MTU), ("%", WIN_MOD))
_SECTION = re.compile(r"^\[([^\]]+)\]$")
_DIRECTIVE = re.compile(r"^([a-z_]+)\s*=\s*(.*)$")


def _number(text: str, what: str, low: int, high: int) -> int:
    if not text.isdigit():
        raise ValueError(f"{what} must be a number, got {text!r}")
    value = int(text)
    if not low <= value <= high:
        raise ValueError(f"{what} must be {low}..{high}, got {value}")
    return value


def _parse_label(text: str, classes: frozenset[str] | None) -> Label:
    parts = text.split(":", 3)
    if len(parts) != 4 or parts[0] not in ("s", "g") or not parts[1] or not parts[2]:
        raise ValueError(f"label must be type:class:name:flavor with type s or g, got {text!r}")
    kind, cls, name, flavor = (p.strip() for p in parts)
    if classes is not None and cls != "!" and cls not in classes:
        raise ValueError(f"label class {cls!r} is not in the classes line ({', '.join(sorted(classes))})")
    family = "other" if cls == "!" else family_of(name, flavor)
    return Label(kind == "g", cls, name, flavor, family)


def _parse_sig(text: str, label: Label, line: int) -> Signature:
    parts = text.split(":")
    if len(parts) != 8:
        raise ValueError(f"sig must have 8 fields ver:ittl:olen:mss:wsize,scale:olayout:quirks:pclass, got {text!r}")
    ver_t, ittl_t, olen_t, mss_t, win_t, layout_t, quirks_t, pclass_t = (p.strip() for p in parts)

    if ver_t not in ("4", "6", "*"):
        raise ValueError(f"ver must be 4, 6 or *, got {ver_t!r}")
    version = None if ver_t == "*" else int(ver_t)

    m = _ITTL.match(ittl_t)
    if not m:
        raise ValueError(f"ittl must be like 64, 54+10 or 64-, got {ittl_t!r}")
    ittl = int(m.group(1)) + (int(m.group(2)) if m.group(2) and m.group(2) != "?" else 0)
    if not 1 <= ittl <= 255:
        raise ValueError(f"ittl must be 1..255, got {ittl}")

    olen = _number(olen_t, "olen", 0, 255)
    mss = None if mss_t == "*" else _number(mss_t, "mss", 0, 65535)

    win_parts = win_t.split(",")
    if len(win_parts) != 2:
        raise ValueError(f"wsize,scale must be two comma-separated values, got {win_t!r}")
    wsize_t, scale_t = (p.strip() for p in win_parts)
    win_kind, win_value = WIN_FIXED, 0
    if wsize_t == "*":
        win_kind = WIN_ANY
    else:
        for prefix, kind in _WIN_PREFIXED:
            if wsize_t.startswith(prefix):
                win_kind = kind
                win_value = _number(wsize_t[len(prefix):], f"wsize {prefix}N", 1, 65535)
                break
        else:
            win_value = _number(wsize_t, "wsize", 0, 65535)
    wscale = None if scale_t == "*" else _number(scale_t, "scale", 0, 255)

    layout: list[str] = []
    eol_pad = 0
    tokens = [t.strip() for t in layout_t.split(",")] if layout_t else []
    for n, token in enumerate(tokens):
        if token.startswith("eol+"):
            if n != len(tokens) - 1:
                raise ValueError(f"eol+N must be the last option, got {layout_t!r}")
            eol_pad = _number(token[4:], "eol padding", 0, 40)
            layout.append("eol")
        elif token.startswith("?"):
            layout.append(f"?{_number(token[1:], 'unknown option kind', 0, 255)}")
        elif token in LAYOUT_TOKENS and token != "eol":
            layout.append(token)
        else:
            raise ValueError(f"unknown option {token!r} in olayout (allowed: eol+N nop mss ws sok sack ts ?N)")

    quirk_bits = 0
    for token in (t.strip() for t in quirks_t.split(",") if t.strip()):
        if token not in QUIRKS:
            raise ValueError(f"unknown quirk {token!r} (allowed: {' '.join(QUIRK_NAMES)})")
        quirk_bits |= QUIRKS[token]

    if pclass_t not in ("0", "+", "*"):
        raise ValueError(f"pclass must be 0, + or *, got {pclass_t!r}")

    return Signature(
        label=label, text=text, line=line, version=version, ittl=ittl,
        random_ttl=bool(m.group(3)), olen=olen, mss=mss, win_kind=win_kind,
        win_value=win_value, wscale=wscale, layout=tuple(layout), eol_pad=eol_pad,
        quirk_bits=quirk_bits, pclass=None if pclass_t == "*" else pclass_t,
    )


def load_signatures(text: str, source: str = "") -> SignatureSet:
    """Parse p0f v3 `.fp` text; only `[tcp:request]` is kept.

    Raises ValueError("line N: what is wrong") for a bad line in that
    section, a `sig` before any `label`, or a label class missing from the
    `classes` directive. Other sections (mtu, tcp:response, http) are skipped.
    """
    classes: frozenset[str] | None = None
    section = ""
    label: Label | None = None
    sigs: list[Signature] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith(";"):
            continue
        try:
            m = _SECTION.match(line)
            if m:
                section = m.group(1).strip()
                label = None
                continue
            d = _DIRECTIVE.match(line)
            if not d:
                if section == "tcp:request":
                    raise ValueError(f"expected 'label = ...', 'sys = ...' or 'sig = ...', got {line!r}")
                continue
            key, value = d.group(1), d.group(2).strip()
            if key == "classes" and not section:
                classes = frozenset(c.strip() for c in value.split(",") if c.strip())
                continue
            if section != "tcp:request":
                continue
            if key == "label":
                label = _parse_label(value, classes)
            elif key == "sys":
                if label is None:
                    raise ValueError("'sys' before any 'label'")
                label = replace(label, sys=tuple(s.strip() for s in value.split(",") if s.strip()))
            elif key == "sig":
                if label is None:
                    raise ValueError("'sig' before any 'label'")
                sigs.append(_parse_sig(value, label, number))
            else:
                raise ValueError(f"unknown directive {key!r} (allowed: label, sys, sig)")
        except ValueError as exc:
            raise ValueError(f"line {number}: {exc}") from None
    return _index(sigs, source)


# --------------------------------------------------------------------------
# The fact and matching
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OsFact:
    """The passive OS fingerprint fact."""

    status: str                  # OK matched, NONE no signature, UNKNOWN no/bad SYN
    os: str                      # one of FAMILIES
    os_name: str                 # "Windows 10/11", "unknown"
    os_distance: int | None      # hops; None only when there was no usable SYN
    os_match: str                # exact fuzzy generic none, "unknown" without a SYN
    label: str = ""              # the matched p0f label, e.g. "s:win:Windows:7 or Vista"
    signature: str = ""          # the matched `sig` text
    fields: SynFields | None = None
    source: str = "syn"          # "syn" (our own parse) or "p0f" (daemon API)

    def as_facts(self) -> dict[str, FactValue]:
        return {
            "os": self.os,
            "os_name": self.os_name,
            "os_distance": UNKNOWN if self.os_distance is None else self.os_distance,
            "os_match": self.os_match,
        }

    def as_dict(self) -> dict[str, object]:
        """JSON-ready: the facts, the label, the signature and the parsed fields."""
        out: dict[str, object] = dict(self.as_facts())
        out["status"] = self.status
        out["label"] = self.label
        out["signature"] = self.signature
        out["fields"] = None if self.fields is None else self.fields.as_dict()
        return out


UNKNOWN_OS = OsFact(status=UNKNOWN, os="unknown", os_name="unknown", os_distance=None, os_match="unknown")


def _window_multipliers(f: SynFields) -> tuple[frozenset[int], frozenset[int]]:
    """The N for which the window is mss*N, and for which it is mtu*N."""
    win = f.window
    mss_bases: set[int] = set()
    mtu_bases: set[int] = {ETHERNET_MTU}
    if f.mss and f.mss >= 100:       # tiny MSS values make every window a multiple
        mss_bases.add(f.mss)
        mss_bases.add(ETHERNET_MSS[f.version])
        if f.ts1 is not None:
            mss_bases.add(f.mss - 12)
            mss_bases.add(ETHERNET_MSS[f.version] - 12)
        mtu_bases.add(f.mss + HEADER_BYTES[f.version])
        mtu_bases.add(f.mss + 40)
    if not win:
        return frozenset(), frozenset()
    return (frozenset(win // b for b in mss_bases if win % b == 0),
            frozenset(win // b for b in mtu_bases if win % b == 0))


def _matches(sig: Signature, f: SynFields, by_mss: frozenset[int], by_mtu: frozenset[int]) -> bool | None:
    """None: no match; False: exact match; True: fuzzy match."""
    if sig.version is not None and sig.version != f.version:
        return None
    if sig.olen != f.olen:
        return None
    if sig.mss is not None and sig.mss != f.mss:
        return None
    if sig.wscale is not None and sig.wscale != (f.wscale or 0):
        return None
    if sig.pclass is not None and sig.pclass != f.pclass:
        return None
    kind = sig.win_kind
    if kind == WIN_FIXED:
        if sig.win_value != f.window:
            return None
    elif kind == WIN_MSS:
        if sig.win_value not in by_mss:
            return None
    elif kind == WIN_MTU:
        if sig.win_value not in by_mtu:
            return None
    elif kind == WIN_MOD:
        if f.window % sig.win_value:
            return None

    fuzzy = False
    ref = sig.quirk_bits
    if sig.version is None:      # quirks of the other IP version do not apply
        ref &= ~(_V6_ONLY if f.version == 4 else _V4_ONLY)
    if ref != f.quirk_bits:
        vanished = ref & ~f.quirk_bits
        appeared = f.quirk_bits & ~ref
        if vanished & ~_MAY_VANISH or appeared & ~_MAY_APPEAR:
            return None
        if vanished & QUIRKS["df"] and sig.label.cls in STRICT_DF_CLASSES and (
                sig.label.generic or sig.win_kind == WIN_ANY or "ws" not in sig.layout
                or f.quirk_bits & QUIRKS["id-"]):
            return None          # without DF only Windows' own scaled window (module docstring)
        fuzzy = True

    if f.ttl > sig.ittl:         # TTLs only go down (see the module docstring)
        return None
    if not sig.random_ttl and sig.ittl - f.ttl > MAX_DISTANCE:
        if sig.label.generic:    # layout alone is too little (module docstring)
            return None
        fuzzy = True
    return fuzzy


def match(fields: SynFields, sigs: SignatureSet) -> OsFact:
    """Classify parsed SYN fields: exact, then fuzzy, then generic, else none."""
    by_mss, by_mtu = _window_multipliers(fields)
    fuzzy_specific: Signature | None = None
    exact_generic: Signature | None = None
    fuzzy_generic: Signature | None = None
    for sig in sigs.candidates(fields.layout, fields.eol_pad):
        result = _matches(sig, fields, by_mss, by_mtu)
        if result is None:
            continue
        if not sig.label.generic:
            if not result:
                return _fact(sig, fields, EXACT)
            if fuzzy_specific is None:
                fuzzy_specific = sig
        elif not result:
            if exact_generic is None:
                exact_generic = sig
        elif fuzzy_generic is None:
            fuzzy_generic = sig
    if fuzzy_specific is not None:
        return _fact(fuzzy_specific, fields, FUZZY)
    best = exact_generic or fuzzy_generic
    if best is not None:
        return _fact(best, fields, GENERIC)
    return OsFact(status=NONE, os="unknown", os_name="unknown", os_distance=fields.distance,
                  os_match=NO_MATCH, fields=fields)


def _fact(sig: Signature, fields: SynFields, quality: str) -> OsFact:
    distance = fields.distance if sig.random_ttl else sig.ittl - fields.ttl
    return OsFact(status=OK, os=sig.label.family, os_name=sig.label.display, os_distance=distance,
                  os_match=quality, label=sig.label.text, signature=sig.text, fields=fields)


def classify(data: bytes | None, sigs: SignatureSet) -> OsFact:
    """Raw SYN bytes (or None) -> OsFact. Never raises on the bytes."""
    if not data:
        return UNKNOWN_OS
    fields = parse_syn(data)
    if fields is None:
        return UNKNOWN_OS
    return match(fields, sigs)


# --------------------------------------------------------------------------
# A SYN from an observed signature (labelled data, `fingerprint --sig`)
# --------------------------------------------------------------------------

_OPTION_BYTES: dict[str, bytes] = {"nop": b"\x01", "sok": b"\x04\x02", "sack": b"\x05\x02"}


def synthesize(observed: str) -> bytes:
    """IP + TCP header bytes of a SYN described by an *observed* signature.

    `observed` is a p0f v3 `sig` line with concrete values, as
    `SynFields.signature()` prints them without the `+distance`: the TTL as
    received, a literal MSS and window, the scale, the option layout, the
    quirks and the payload class, e.g. `4:116:0:1460:64240,8:mss,nop,ws,nop,
    nop,sok:df,id+:0`. Quirks are written the way they arise: `df` sets DF,
    `id+` (with df) or the absence of `id-` (without) gives a non-zero IP ID,
    `flow` a flow label, `ecn` ECE+CWR on the SYN, `ts1-`/`ts2+` the
    timestamp values. The labelled SYN sets (tests/data/syn_labelled.tsv)
    and the evaluation are built with it, so that a reader sees the fields.
    Raises ValueError naming what it cannot build.
    """
    parts = observed.strip().split(":")
    if len(parts) != 8:
        raise ValueError(f"expected ver:ttl:olen:mss:wsize,scale:olayout:quirks:pclass, got {observed!r}")
    ver_t, ttl_t, olen_t, mss_t, win_t, layout_t, quirks_t, pclass_t = (p.strip() for p in parts)
    if ver_t not in ("4", "6"):
        raise ValueError(f"ver must be 4 or 6, got {ver_t!r}")
    version = int(ver_t)
    ttl = _number(ttl_t.split("+")[0], "ttl", 1, 255)
    if _number(olen_t, "olen", 0, 0):
        raise ValueError("olen must be 0")
    mss = None if mss_t in ("*", "") else _number(mss_t, "mss", 0, 65535)
    wsize_t, _, scale_t = win_t.partition(",")
    window = _number(wsize_t, "wsize", 0, 65535)
    scale = _number(scale_t or "0", "scale", 0, 255)
    quirks = {q.strip() for q in quirks_t.split(",") if q.strip()}
    unknown = quirks - set(QUIRK_NAMES)
    if unknown:
        raise ValueError(f"unknown quirk(s) {', '.join(sorted(unknown))}")

    ts1 = 0 if "ts1-" in quirks else 0x1C2D3E4F
    ts2 = 0x01020304 if "ts2+" in quirks else 0
    opts = b""
    tokens = [t.strip() for t in layout_t.split(",") if t.strip()]
    pad = 0
    for n, token in enumerate(tokens):
        if token == "mss":
            opts += struct.pack("!BBH", 2, 4, 1460 if mss is None else mss)
        elif token == "ws":
            opts += struct.pack("!BBB", 3, 3, scale)
        elif token == "ts":
            opts += struct.pack("!BBII", 8, 10, ts1, ts2)
        elif token in _OPTION_BYTES:
            opts += _OPTION_BYTES[token]
        elif token.startswith("eol+") and n == len(tokens) - 1:
            pad = _number(token[4:], "eol padding", 0, 40)
            opts += b"\x00" * (1 + pad)
        elif token.startswith("?"):
            opts += bytes([_number(token[1:], "option kind", 9, 255), 2])
        else:
            raise ValueError(f"cannot build option {token!r}")
    if len(opts) % 4:   # the data offset counts 32-bit words (RFC 9293 §3.1)
        raise ValueError(f"options of {len(opts)} bytes: write the padding as nop or eol+N")
    if len(opts) > 40:
        raise ValueError("more than 40 bytes of TCP options")
    flags = _SYN
    if "ecn" in quirks:
        flags |= _ECE | _CWR
    if "pushf+" in quirks:
        flags |= _PSH
    if "urgf+" in quirks:
        flags |= _URG
    seq = 0 if "seq-" in quirks else 0x5EED1234
    ack = 0x0BADF00D if "ack+" in quirks else 0
    payload = b"" if pclass_t in ("0", "*") else b"x"
    doff = (20 + len(opts)) // 4
    tcp = struct.pack("!HHIIBBHHH", 40000, 25, seq, ack, doff << 4, flags, window, 0,
                      0x0101 if "uptr+" in quirks else 0) + opts
    if version == 4:
        df = "df" in quirks
        ip_id = (0x1B2C if ("id+" in quirks or not df) and "id-" not in quirks else 0)
        frag = (0x4000 if df else 0) | (0x8000 if "0+" in quirks else 0)
        total = 20 + len(tcp) + len(payload)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, ip_id, frag, ttl, _IPPROTO_TCP, 0,
                         bytes([192, 0, 2, 1]), bytes([198, 51, 100, 25]))
    else:
        word = (6 << 28) | (0x5A3C1 if "flow" in quirks else 0)
        ip = struct.pack("!IHBB16s16s", word, len(tcp) + len(payload), _IPPROTO_TCP, ttl,
                         bytes.fromhex("20010db8000000000000000000000001"),
                         bytes.fromhex("20010db8000000000000000000000025"))
    return ip + tcp + payload
