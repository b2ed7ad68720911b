"""Country of an IP address: one merged, sorted range table per address family.

Decides:
    which country (ISO 3166-1 alpha-2 code) lists an address, from
    (network, country) pairs that zone files or a database supply; whether an
    address is local (loopback, private, link-local, shared CGNAT space); and
    whether a string is a country code that a rule may name.
Inputs:
    `RangeTable.build(entries)` takes (network, country) pairs, the network as
    CIDR text (`192.0.2.0/24`, `2001:db8::/32`, a bare address meaning /32 or
    /128) or an `ipaddress` network object. `lookup(ip, version)` takes the
    address as text, or as an int together with its version (4 or 6).
Output:
    `lookup` -> the upper-case country code, or None when no network lists the
    address; `classify_local(ip) -> bool`; `is_country_code(code) -> bool`;
    `serialise(table, key, meta) -> bytes` and `deserialise(data) -> Compiled`
    for the compiled cache.
Failure modes:
    a malformed network, a network with host bits set or a malformed country
    code raises ValueError with a message fit for a warning (the loader adds
    file:line); a truncated, damaged, foreign or old compiled cache raises
    CacheFormatError (a ValueError) and the loader rebuilds it.
Defaults and why:
    * CIDR networks either nest or are disjoint. Nested: the more specific one
      wins inside it and the wider one keeps the rest, as longest-prefix match
      does for routes (RFC 1812 §5.2.4.3); so an admin's override file (a
      partner's /24 listed under its real country) takes precedence over a
      country's aggregated list. The same network under two countries: the
      entry given last wins (the loader feeds files in sorted path order, so
      the outcome is reproducible) and `conflicts` counts it.
    * Touching ranges of the same country are merged into one range: the
      answers are the same and the table is smaller.
    * IPv4-mapped IPv6 addresses (`::ffff:192.0.2.1`, what a dual-stack
      socket reports for an IPv4 client, RFC 4291 §2.5.5.2) are looked up as
      IPv4.
    * Storage: IPv4 bounds in 32-bit arrays; IPv6 bounds as two 64-bit halves
      (hi, lo) in 64-bit arrays; a 16-bit country index per range. Measured
      (bench/bench_geo.py) against a Python list of 128-bit ints: the halves
      take a third of the memory and deserialise without a per-item loop,
      since the cache's sections are cast in place (`memoryview.cast`), which
      also lets worker processes share one mmap'ed cache file.
    * Country codes: the 249 officially assigned ISO 3166-1 alpha-2 codes plus
      EXTRA_CODES (EU, AP, XK) that RIR and MaxMind/DB-IP data use.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
import struct
from array import array
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence, Union

# ---------------------------------------------------------------------------
# Country codes

# ISO 3166-1 alpha-2, officially assigned codes (249), by first letter.
ISO_3166_ALPHA2: frozenset[str] = frozenset(
    """
    AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ
    BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ
    CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ
    DE DJ DK DM DO DZ
    EC EE EG EH ER ES ET
    FI FJ FK FM FO FR
    GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY
    HK HM HN HR HT HU
    ID IE IL IM IN IO IQ IR IS IT
    JE JM JO JP
    KE KG KH KI KM KN KP KR KW KY KZ
    LA LB LC LI LK LR LS LT LU LV LY
    MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ
    NA NC NE NF NG NI NL NO NP NR NU NZ
    OM
    PA PE PF PG PH PK PL PM PN PR PS PT PW PY
    QA
    RE RO RS RU RW
    SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ
    TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ
    UA UG UM US UY UZ
    VA VC VE VG VI VN VU
    WF WS
    YE YT
    ZA ZM ZW
    """.split()
)

# Codes outside ISO 3166-1 that country data really contains, so a rule may
# name them and a zone file may be called after them.
EXTRA_CODES: dict[str, str] = {
    "EU": "Europe, unspecified country (RIPE NCC delegations; MaxMind legacy)",
    "AP": "Asia/Pacific, unspecified country (APNIC delegations; MaxMind legacy)",
    "XK": "Kosovo (user-assigned code used by MaxMind, DB-IP and the EU)",
}

COUNTRY_CODES: frozenset[str] = ISO_3166_ALPHA2 | frozenset(EXTRA_CODES)

# The two special values a lookup through GeoDB can give besides a code.
LOCAL = "local"      # classify_local() is true and no zone lists the address
UNKNOWN = "unknown"  # listed nowhere

_TWO_LETTERS = re.compile(r"[A-Za-z]{2}\Z")


def is_country_code(code: str) -> bool:
    """True for an ISO 3166-1 alpha-2 code (any case) or one of EXTRA_CODES."""
    return bool(_TWO_LETTERS.match(code)) and code.upper() in COUNTRY_CODES


def normalise_country(code: str) -> str:
    """The upper-case code; ValueError naming the value when it is not one."""
    if not isinstance(code, str) or not _TWO_LETTERS.match(code):
        raise ValueError(f"{code!r} is not a two-letter country code")
    upper = code.upper()
    if upper not in COUNTRY_CODES:
        raise ValueError(f"{code!r} is not an ISO 3166-1 alpha-2 country code")
    return upper


# ---------------------------------------------------------------------------
# Networks and addresses as integers

_V4_MAX = (1 << 32) - 1
_V6_MAX = (1 << 128) - 1
_LO64 = (1 << 64) - 1
_V4_MAPPED = 0xFFFF << 32  # ::ffff:0:0/96, RFC 4291 §2.5.5.2

# Dotted quad without leading zeros (ipaddress refuses them too: `010.1.1.1`
# is octal to some parsers, decimal to others).
_OCTET = r"(25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_V4_TEXT = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}\Z")
_PREFIX = re.compile(r"(0|[1-9]\d{0,2})\Z")

Network = Union[str, ipaddress.IPv4Network, ipaddress.IPv6Network]


def _v4_int(text: str) -> int | None:
    m = _V4_TEXT.match(text)
    if m is None:
        return None
    a, b, c, d = m.groups()
    return (int(a) << 24) | (int(b) << 16) | (int(c) << 8) | int(d)


def parse_address(text: str) -> tuple[int, int]:
    """(version, integer) of an address; IPv4-mapped IPv6 comes back as IPv4."""
    n = _v4_int(text)
    if n is not None:
        return 4, n
    try:
        addr = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"not an IPv4 or IPv6 address: {text[:80]!r}") from None
    if addr.version == 6:
        value = int(addr)
        if value >> 32 == 0xFFFF:
            return 4, value & _V4_MAX
        return 6, value
    return 4, int(addr)


def _plain_address(text: str) -> tuple[int, int]:
    """(version, int) of an address as written: no scope, no v4 mapping."""
    n = _v4_int(text)
    if n is not None:
        return 4, n
    if ":" not in text or "%" in text:
        raise ValueError(text)
    return 6, int(ipaddress.IPv6Address(text))


AddressParser = Callable[[str], tuple[int, int]]


def parse_network(text: str, address: AddressParser | None = None) -> tuple[int, int, int]:
    """(version, first, last) of `addr/prefix` or of a bare address.

    `address` may supply a quicker parser of the address part with the same
    contract as `_plain_address` (the loader passes one built on inet_pton,
    which ipaddress takes 5x longer to match on IPv6). Host bits set
    (`192.0.2.1/24`) is an error, not silently masked: in a zone file it
    means the line is not what its author thought.
    """
    addr_text, slash, prefix_text = text.strip().partition("/")
    try:
        version, value = (address or _plain_address)(addr_text)
    except ValueError:
        raise ValueError(f"not an IPv4 or IPv6 network: {text[:80]!r}") from None
    bits = 32 if version == 4 else 128
    if slash:
        if not _PREFIX.match(prefix_text) or int(prefix_text) > bits:
            raise ValueError(f"bad prefix length /{prefix_text[:10]} in {text[:80]!r}"
                             f" (0 to {bits} allowed)")
        prefix = int(prefix_text)
    else:
        prefix = bits
    host = (1 << (bits - prefix)) - 1
    if value & host:
        first = value & ~host
        raise ValueError(f"host bits set in {text[:80]!r}"
                         f" (the network is {_int_text(version, first)}/{prefix})")
    return version, value, value | host


def _int_text(version: int, value: int) -> str:
    if version == 4:
        return str(ipaddress.IPv4Address(value))
    return str(ipaddress.IPv6Address(value))


def _network_bounds(net: Network) -> tuple[int, int, int]:
    if isinstance(net, str):
        return parse_network(net)
    return net.version, int(net.network_address), int(net.broadcast_address)


# ---------------------------------------------------------------------------
# Local addresses

# Addresses that belong to no country; GeoDB answers LOCAL for them unless a
# zone lists them. (network, why).
LOCAL_NETWORKS: tuple[tuple[str, str], ...] = (
    ("127.0.0.0/8", "loopback, RFC 1122 §3.2.1.3"),
    ("10.0.0.0/8", "private, RFC 1918 §3"),
    ("172.16.0.0/12", "private, RFC 1918 §3"),
    ("192.168.0.0/16", "private, RFC 1918 §3"),
    ("169.254.0.0/16", "link-local, RFC 3927 §2.1"),
    ("100.64.0.0/10", "shared address space (carrier-grade NAT), RFC 6598 §7"),
    ("::1/128", "loopback, RFC 4291 §2.5.3"),
    ("fc00::/7", "unique local, RFC 4193 §3.1"),
    ("fe80::/10", "link-local unicast, RFC 4291 §2.5.6"),
)

_LOCAL_BOUNDS: dict[int, tuple[tuple[int, int], ...]] = {
    version: tuple((lo, hi) for v, lo, hi in map(parse_network, (n for n, _ in LOCAL_NETWORKS))
                   if v == version)
    for version in (4, 6)
}


def classify_local(ip: str | int, version: int | None = None) -> bool:
    """True when `ip` is in LOCAL_NETWORKS (IPv4-mapped IPv6 as IPv4).

    A string that is no address is not local (False); an int needs `version`.
    """
    if isinstance(ip, str):
        try:
            version, value = parse_address(ip)
        except ValueError:
            return False
    else:
        if version not in (4, 6):
            raise ValueError("an integer address needs version=4 or version=6")
        value = ip
        if version == 6 and value >> 32 == 0xFFFF:
            version, value = 4, value & _V4_MAX
    for lo, hi in _LOCAL_BOUNDS[version]:
        if lo <= value <= hi:
            return True
    return False


# ---------------------------------------------------------------------------
# The range table

# Fixed-width unsigned typecodes. 'I' is 4 bytes on every platform CPython
# supports today; the check keeps a surprise from corrupting the cache.
_U16 = "H"
_U32 = next(t for t in ("I", "L") if array(t).itemsize == 4)
_U64 = "Q"


@dataclass(frozen=True, slots=True)
class RangeTable:
    """Disjoint, sorted [first, last] ranges per family, each with a country.

    Built by `build` or `deserialise`, never mutated. The sequences are
    arrays after `build` and zero-copy memoryviews after `deserialise`.
    """

    countries: tuple[str, ...]
    v4_first: Sequence[int]
    v4_last: Sequence[int]
    v4_country: Sequence[int]
    v6_first_hi: Sequence[int]
    v6_first_lo: Sequence[int]
    v6_last_hi: Sequence[int]
    v6_last_lo: Sequence[int]
    v6_country: Sequence[int]
    networks4: int = 0   # networks given to build (before nesting and merging)
    networks6: int = 0
    conflicts: int = 0   # the same network given under two countries

    # -- construction -----------------------------------------------------

    @classmethod
    def build(cls, entries: Iterable[tuple[Network, str]]) -> RangeTable:
        """A table from (network, country) pairs; ValueError on a bad one."""
        return cls.from_bounds(
            (*_network_bounds(net), country) for net, country in entries
        )

    @classmethod
    def from_bounds(cls, entries: Iterable[tuple[int, int, int, str]]) -> RangeTable:
        """A table from (version, first, last, country) as `parse_network`
        gives them (the loader parses each line once, to report it)."""
        index: dict[str, int] = {}        # normalised code -> index
        spelled: dict[str, int] = {}      # code as given -> index (`us` and `US`)
        v4: list[tuple[int, int, int, int]] = []  # (first, -last, seq, country)
        v6: list[tuple[int, int, int, int]] = []
        for seq, (version, first, last, country) in enumerate(entries):
            cc = spelled.get(country)
            if cc is None:
                code = normalise_country(country)
                cc = index.setdefault(code, len(index))
                spelled[country] = cc
            limit = _V4_MAX if version == 4 else _V6_MAX
            if version not in (4, 6) or not 0 <= first <= last <= limit:
                raise ValueError(f"bad range {first}-{last} for IPv{version}")
            (v4 if version == 4 else v6).append((first, -last, seq, cc))
        r4, c4 = _flatten(v4)
        r6, c6 = _flatten(v6)
        countries = tuple(index)
        return cls(
            countries=countries,
            v4_first=array(_U32, r4[0]),
            v4_last=array(_U32, r4[1]),
            v4_country=array(_U16, r4[2]),
            v6_first_hi=array(_U64, (x >> 64 for x in r6[0])),
            v6_first_lo=array(_U64, (x & _LO64 for x in r6[0])),
            v6_last_hi=array(_U64, (x >> 64 for x in r6[1])),
            v6_last_lo=array(_U64, (x & _LO64 for x in r6[1])),
            v6_country=array(_U16, r6[2]),
            networks4=len(v4),
            networks6=len(v6),
            conflicts=c4 + c6,
        )

    # -- queries ------------------------------------------------------------

    def lookup(self, ip: str | int, version: int | None = None) -> str | None:
        """The country listing `ip`, or None. Text is parsed (ValueError if it
        is no address); an int needs `version` 4 or 6."""
        if isinstance(ip, str):
            version, value = parse_address(ip)
        else:
            value = ip
            if version == 6 and value >> 32 == 0xFFFF:
                version, value = 4, value & _V4_MAX
        if version == 4:
            if not 0 <= value <= _V4_MAX:
                raise ValueError(f"{value} is not an IPv4 address")
            i = bisect_right(self.v4_first, value) - 1
            if i >= 0 and value <= self.v4_last[i]:
                return self.countries[self.v4_country[i]]
            return None
        if version == 6:
            if not 0 <= value <= _V6_MAX:
                raise ValueError(f"{value} is not an IPv6 address")
            return self._lookup6(value >> 64, value & _LO64)
        raise ValueError("an integer address needs version=4 or version=6")

    def _lookup6(self, hi: int, lo: int) -> str | None:
        first_hi = self.v6_first_hi
        j = bisect_right(first_hi, hi)
        k = j - 1
        if k >= 0 and first_hi[k] == hi:
            # Several ranges may start in the same /64: order them by the low half.
            i = bisect_left(first_hi, hi, 0, j)
            k = bisect_right(self.v6_first_lo, lo, i, j) - 1
            if k < i:
                k = i - 1
        if k < 0:
            return None
        last_hi = self.v6_last_hi[k]
        if last_hi > hi or (last_hi == hi and self.v6_last_lo[k] >= lo):
            return self.countries[self.v6_country[k]]
        return None

    def __len__(self) -> int:
        return len(self.v4_first) + len(self.v6_first_hi)

    @property
    def ranges4(self) -> int:
        return len(self.v4_first)

    @property
    def ranges6(self) -> int:
        return len(self.v6_first_hi)

    def ranges(self, version: int) -> Iterator[tuple[int, int, str]]:
        """(first, last, country) of every range of one family, in order."""
        if version == 4:
            for a, b, c in zip(self.v4_first, self.v4_last, self.v4_country):
                yield a, b, self.countries[c]
        elif version == 6:
            for ah, al, bh, bl, c in zip(self.v6_first_hi, self.v6_first_lo,
                                         self.v6_last_hi, self.v6_last_lo, self.v6_country):
                yield (ah << 64) | al, (bh << 64) | bl, self.countries[c]
        else:
            raise ValueError("version must be 4 or 6")


def _flatten(items: list[tuple[int, int, int, int]]) -> tuple[tuple[list[int], list[int], list[int]], int]:
    """Nested CIDR blocks -> disjoint ranges, innermost wins; merge neighbours.

    `items` are (first, -last, seq, country): sorted, an enclosing block comes
    before the blocks inside it, and identical blocks keep their input order
    so the later one ends up innermost (last given wins).
    """
    items.sort()
    firsts: list[int] = []
    lasts: list[int] = []
    codes: list[int] = []

    def emit(first: int, last: int, cc: int) -> None:
        if codes and codes[-1] == cc and lasts[-1] + 1 == first:
            lasts[-1] = last
        else:
            firsts.append(first)
            lasts.append(last)
            codes.append(cc)

    stack: list[tuple[int, int]] = []   # (last, country) of open blocks, innermost on top
    cursor = 0                          # first address not yet emitted
    conflicts = 0
    prev: tuple[int, int, int] | None = None
    for first, neg_last, _seq, cc in items:
        last = -neg_last
        if prev is not None and prev[0] == first and prev[1] == last and prev[2] != cc:
            conflicts += 1
        prev = (first, last, cc)
        while stack and stack[-1][0] < first:
            top_last, top_cc = stack.pop()
            if cursor <= top_last:
                emit(cursor, top_last, top_cc)
                cursor = top_last + 1
        if stack and cursor < first:
            emit(cursor, first - 1, stack[-1][1])
        cursor = first
        stack.append((last, cc))
    while stack:
        top_last, top_cc = stack.pop()
        if cursor <= top_last:
            emit(cursor, top_last, top_cc)
            cursor = top_last + 1
    return (firsts, lasts, codes), conflicts


# ---------------------------------------------------------------------------
# Compiled cache: bytes in, table out

MAGIC = b"SGGEOTBL"
# Bump when the layout or the meaning of a table changes: an old cache is
# then refused (CacheFormatError) and rebuilt.
FORMAT_VERSION = 1
_HEAD = struct.Struct("<8sII")  # magic, format version, header JSON length
_BYTEORDER = "little" if array(_U16, [1]).tobytes() == b"\x01\x00" else "big"


class CacheFormatError(ValueError):
    """The bytes are not a compiled table this code can read."""


@dataclass(frozen=True, slots=True)
class Compiled:
    """A deserialised cache: the table, the caller's key and meta data."""

    table: RangeTable
    key: bytes
    meta: dict[str, object]


def _pad8(n: int) -> int:
    return (8 - n % 8) % 8


def serialise(table: RangeTable, key: bytes, meta: Mapping[str, object] | None = None) -> bytes:
    """The table as bytes: fixed head, JSON header, 8-aligned native arrays.

    `key` is the caller's checksum of the inputs (it is stored, not computed
    here); `meta` is any JSON-able mapping (the loader keeps its statistics
    and warnings there). The header holds a SHA-256 of the body so a torn or
    damaged file is refused rather than misread.
    """
    sections: list[tuple[str, str, Sequence[int]]] = [
        ("v4_first", _U32, table.v4_first), ("v4_last", _U32, table.v4_last),
        ("v4_country", _U16, table.v4_country),
        ("v6_first_hi", _U64, table.v6_first_hi), ("v6_first_lo", _U64, table.v6_first_lo),
        ("v6_last_hi", _U64, table.v6_last_hi), ("v6_last_lo", _U64, table.v6_last_lo),
        ("v6_country", _U16, table.v6_country),
    ]
    body = bytearray()
    layout: list[list[object]] = []
    for name, code, seq in sections:
        raw = seq.tobytes() if isinstance(seq, array) else array(code, seq).tobytes()
        layout.append([name, code, len(body), len(seq)])
        body += raw
        body += b"\0" * _pad8(len(body))
    header = json.dumps({
        "byteorder": _BYTEORDER,
        "key": key.hex(),
        "countries": list(table.countries),
        "networks4": table.networks4,
        "networks6": table.networks6,
        "conflicts": table.conflicts,
        "sections": layout,
        "body_sha256": hashlib.sha256(body).hexdigest(),
        "meta": dict(meta or {}),
    }, separators=(",", ":"), sort_keys=True).encode()
    header += b" " * _pad8(_HEAD.size + len(header))
    return _HEAD.pack(MAGIC, FORMAT_VERSION, len(header)) + header + bytes(body)


_SECTION_NAMES = ("v4_first", "v4_last", "v4_country", "v6_first_hi", "v6_first_lo",
                  "v6_last_hi", "v6_last_lo", "v6_country")
_SECTION_CODES = {"v4_first": _U32, "v4_last": _U32, "v4_country": _U16,
                  "v6_first_hi": _U64, "v6_first_lo": _U64, "v6_last_hi": _U64,
                  "v6_last_lo": _U64, "v6_country": _U16}


def deserialise(data: bytes | bytearray | memoryview) -> Compiled:
    """The table back from `serialise`'s bytes, without copying the arrays.

    The table's sequences are memoryviews into `data` (an mmap works), so the
    buffer lives as long as the table. CacheFormatError on anything amiss.
    """
    view = memoryview(data).cast("B")
    if len(view) < _HEAD.size:
        raise CacheFormatError("compiled geo cache is truncated")
    magic, version, header_len = _HEAD.unpack_from(view, 0)
    if magic != MAGIC:
        raise CacheFormatError("not a compiled geo cache")
    if version != FORMAT_VERSION:
        raise CacheFormatError(f"compiled geo cache format {version}, this smtpguard reads {FORMAT_VERSION}")
    start = _HEAD.size + header_len
    if len(view) < start:
        raise CacheFormatError("compiled geo cache is truncated")
    try:
        header = json.loads(bytes(view[_HEAD.size:start]))
        if header["byteorder"] != _BYTEORDER:
            raise CacheFormatError("compiled geo cache was written on a machine of another byte order")
        body = view[start:]
        if hashlib.sha256(body).hexdigest() != header["body_sha256"]:
            raise CacheFormatError("compiled geo cache is damaged (checksum mismatch)")
        arrays: dict[str, memoryview] = {}
        for name, code, offset, count in header["sections"]:
            if name not in _SECTION_CODES or _SECTION_CODES[name] != code:
                raise CacheFormatError(f"compiled geo cache has an unexpected section {name!r}")
            size = array(code).itemsize * count
            if offset < 0 or offset + size > len(body):
                raise CacheFormatError("compiled geo cache is truncated")
            arrays[name] = body[offset:offset + size].cast(code)
        if set(arrays) != set(_SECTION_NAMES):
            raise CacheFormatError("compiled geo cache lacks a section")
        countries = tuple(str(c) for c in header["countries"])
        if any(c not in COUNTRY_CODES for c in countries):
            raise CacheFormatError("compiled geo cache names an unknown country code")
        n4, n6 = len(arrays["v4_first"]), len(arrays["v6_first_hi"])
        if (len(arrays["v4_last"]), len(arrays["v4_country"])) != (n4, n4) or any(
            len(arrays[s]) != n6 for s in ("v6_first_lo", "v6_last_hi", "v6_last_lo", "v6_country")
        ):
            raise CacheFormatError("compiled geo cache sections disagree in length")
        table = RangeTable(
            countries=countries,
            v4_first=arrays["v4_first"], v4_last=arrays["v4_last"],
            v4_country=arrays["v4_country"],
            v6_first_hi=arrays["v6_first_hi"], v6_first_lo=arrays["v6_first_lo"],
            v6_last_hi=arrays["v6_last_hi"], v6_last_lo=arrays["v6_last_lo"],
            v6_country=arrays["v6_country"],
            networks4=int(header["networks4"]), networks6=int(header["networks6"]),
            conflicts=int(header["conflicts"]),
        )
        meta = header.get("meta", {})
        if not isinstance(meta, dict):
            raise CacheFormatError("compiled geo cache meta data is not a mapping")
        return Compiled(table=table, key=bytes.fromhex(header["key"]), meta=meta)
    except CacheFormatError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise CacheFormatError(f"compiled geo cache header is malformed ({exc.__class__.__name__})") from None
