"""The pure country table: lookups at range edges, nesting, local addresses,
the compiled-cache bytes and country-code validation."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpguard.core.geo import (
    EXTRA_CODES,
    FORMAT_VERSION,
    ISO_3166_ALPHA2,
    CacheFormatError,
    RangeTable,
    classify_local,
    deserialise,
    is_country_code,
    normalise_country,
    parse_address,
    parse_network,
    serialise,
)

TABLE = RangeTable.build([
    ("192.0.2.0/24", "us"),
    ("198.51.100.0/24", "CA"),
    ("198.51.100.128/25", "MX"),          # nested: the /25 wins inside the /24
    ("198.51.100.200/32", "de"),          # nested twice
    ("203.0.113.0/25", "FR"),
    ("203.0.113.128/25", "FR"),           # adjacent, same country: merged
    ("2001:db8::/32", "de"),
    ("2001:db8:0:0:8000::/65", "fr"),     # starts inside the first /64 of the /32
    ("2001:db8:0:1::/64", "it"),          # a second range sharing the high half's neighbourhood
    ("2001:db8:0:1::1/128", "es"),        # a single host inside it
    ("2001:db9::/32", "de"),
])

LOOKUPS = [
    ("the first address of a range", "192.0.2.0", "US"),
    ("the last address of a range", "192.0.2.255", "US"),
    ("the address just before a range", "192.0.1.255", None),
    ("the address just after a range", "192.0.3.0", None),
    ("the wide block below a nested one", "198.51.100.127", "CA"),
    ("the first address of a nested block", "198.51.100.128", "MX"),
    ("a host route inside a nested block", "198.51.100.200", "DE"),
    ("the address after a host route", "198.51.100.201", "MX"),
    ("the last address of the nested block", "198.51.100.255", "MX"),
    ("the seam of two merged blocks", "203.0.113.128", "FR"),
    ("the lowest IPv4 address", "0.0.0.0", None),
    ("the highest IPv4 address", "255.255.255.255", None),
    ("an IPv4-mapped IPv6 address as IPv4", "::ffff:192.0.2.9", "US"),
    ("the first IPv6 address of a /32", "2001:db8::", "DE"),
    ("the last address before a /65 in the same /64", "2001:db8::7fff:ffff:ffff:ffff", "DE"),
    ("the first address of the /65", "2001:db8::8000:0:0:0", "FR"),
    ("the last address of the /65", "2001:db8::ffff:ffff:ffff:ffff", "FR"),
    ("the first address of the next /64", "2001:db8:0:1::", "IT"),
    ("a /128 inside a /64", "2001:db8:0:1::1", "ES"),
    ("the address after the /128", "2001:db8:0:1::2", "IT"),
    ("the /32 resumes after the /64", "2001:db8:0:2::", "DE"),
    ("the last address of the /32", "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", "DE"),
    ("the next /32, same country, merged", "2001:db9::1", "DE"),
    ("just past the merged range", "2001:dba::", None),
    ("the lowest IPv6 address", "::", None),
    ("the highest IPv6 address", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", None),
]


@pytest.mark.parametrize("ip,expected", [c[1:] for c in LOOKUPS], ids=[c[0] for c in LOOKUPS])
def test_lookup_at_range_edges(ip: str, expected: str | None) -> None:
    assert TABLE.lookup(ip) == expected


@pytest.mark.parametrize("ip,expected", [c[1:] for c in LOOKUPS], ids=[c[0] for c in LOOKUPS])
def test_lookup_by_integer_gives_the_same_answer(ip: str, expected: str | None) -> None:
    version, value = parse_address(ip)
    assert TABLE.lookup(value, version) == expected


def test_adjacent_same_country_blocks_are_merged_into_one_range() -> None:
    v4 = list(TABLE.ranges(4))
    fr = [(a, b) for a, b, c in v4 if c == "FR"]
    assert fr == [(int(ipaddress.IPv4Address("203.0.113.0")), int(ipaddress.IPv4Address("203.0.113.255")))]
    assert TABLE.networks4 == 6 and TABLE.ranges4 == 6  # 6 networks -> US, CA, MX, DE, MX, FR


def test_ranges_are_disjoint_and_sorted() -> None:
    for version in (4, 6):
        ranges = list(TABLE.ranges(version))
        assert all(a <= b for a, b, _ in ranges)
        assert all(prev[1] < nxt[0] for prev, nxt in zip(ranges, ranges[1:]))


def test_the_same_network_under_two_countries_goes_to_the_last_and_is_counted() -> None:
    table = RangeTable.build([("192.0.2.0/24", "US"), ("192.0.2.0/24", "CA")])
    assert table.lookup("192.0.2.1") == "CA"
    assert table.conflicts == 1


def test_the_same_network_twice_in_one_country_is_no_conflict() -> None:
    table = RangeTable.build([("192.0.2.0/24", "US"), ("192.0.2.0/24", "us")])
    assert table.conflicts == 0 and table.ranges4 == 1 and table.countries == ("US",)


def test_network_objects_and_bare_addresses_are_accepted() -> None:
    table = RangeTable.build([(ipaddress.ip_network("192.0.2.0/24"), "US"), ("2001:db8::1", "CA")])
    assert table.lookup("192.0.2.77") == "US"
    assert table.lookup("2001:db8::1") == "CA"
    assert table.lookup("2001:db8::2") is None


def test_an_empty_table_finds_nothing() -> None:
    table = RangeTable.build([])
    assert table.lookup("192.0.2.1") is None
    assert table.lookup("2001:db8::1") is None
    assert len(table) == 0


@pytest.mark.parametrize("ip,version", [
    ("not an address", None), ("192.0.2.256", None), (-1, 4), (1 << 32, 4), (1 << 128, 6), (5, None),
], ids=["text that is no address", "an octet over 255", "a negative integer",
        "an integer past IPv4", "an integer past IPv6", "an integer without a version"])
def test_lookup_refuses_what_is_no_address(ip: str | int, version: int | None) -> None:
    with pytest.raises(ValueError):
        TABLE.lookup(ip, version)


def _ref_lookup(nets: list[tuple[str, str]], ip: int, version: int) -> str | None:
    """Longest prefix wins; among identical networks the last given wins."""
    best: tuple[int, int, str] | None = None
    for i, (text, cc) in enumerate(nets):
        net = ipaddress.ip_network(text)
        if net.version == version and int(net.network_address) <= ip <= int(net.broadcast_address):
            cand = (net.prefixlen, i, cc.upper())
            if best is None or cand[:2] > best[:2]:
                best = cand
    return best[2] if best else None


@st.composite
def _networks(draw: st.DrawFn) -> list[tuple[str, str]]:
    out = []
    for _ in range(draw(st.integers(1, 25))):
        v6 = draw(st.booleans())
        bits = 128 if v6 else 32
        # Crowd the networks into a small space so that they nest and touch.
        base = (0x20010DB8 << 96) if v6 else (0xC0000000)
        prefix = draw(st.integers(bits - 10, bits))
        offset = draw(st.integers(0, (1 << 10) - 1)) >> (bits - prefix) << (bits - prefix)
        net = ipaddress.ip_network(((base + offset), prefix))
        out.append((str(net), draw(st.sampled_from(["us", "CA", "mx", "DE"]))))
    return out


@settings(max_examples=150, deadline=None)
@given(_networks(), st.lists(st.integers(0, (1 << 11) - 1), min_size=1, max_size=30))
def test_lookup_matches_a_brute_force_longest_prefix_reference(nets: list[tuple[str, str]], probes: list[int]) -> None:
    table = RangeTable.build(nets)
    for version, base in ((4, 0xC0000000), (6, 0x20010DB8 << 96)):
        for p in probes:
            ip = base + p - 16
            assert table.lookup(ip, version) == _ref_lookup(nets, ip, version)


# -- parsing networks ---------------------------------------------------------

GOOD_NETWORKS = [
    ("an IPv4 /24", "192.0.2.0/24", (4, 0xC0000200, 0xC00002FF)),
    ("a bare IPv4 address as /32", "192.0.2.7", (4, 0xC0000207, 0xC0000207)),
    ("the whole IPv4 space", "0.0.0.0/0", (4, 0, (1 << 32) - 1)),
    ("an IPv6 /32", "2001:db8::/32", (6, 0x20010DB8 << 96, (0x20010DB8 << 96) | ((1 << 96) - 1))),
    ("surrounding blanks", "  192.0.2.0/24 \t", (4, 0xC0000200, 0xC00002FF)),
]


@pytest.mark.parametrize("text,expected", [c[1:] for c in GOOD_NETWORKS], ids=[c[0] for c in GOOD_NETWORKS])
def test_parse_network_reads(text: str, expected: tuple[int, int, int]) -> None:
    assert parse_network(text) == expected


BAD_NETWORKS = [
    ("a word", "hello", "not an IPv4 or IPv6 network"),
    ("an octet over 255", "192.0.2.256/32", "not an IPv4 or IPv6 network"),
    ("a leading zero, octal to some parsers", "192.0.02.0/24", "not an IPv4 or IPv6 network"),
    ("three octets", "192.0.2/24", "not an IPv4 or IPv6 network"),
    ("an IPv4 prefix over 32", "192.0.2.0/33", "bad prefix length"),
    ("an IPv6 prefix over 128", "2001:db8::/129", "bad prefix length"),
    ("a prefix with a sign", "192.0.2.0/+24", "bad prefix length"),
    ("an empty prefix", "192.0.2.0/", "bad prefix length"),
    ("host bits set", "192.0.2.1/24", "host bits set"),
    ("IPv6 host bits set", "2001:db8::1/32", "host bits set"),
    ("an IPv6 address with a zone index", "fe80::1%eth0/128", "not an IPv4 or IPv6 network"),
    ("two double colons", "2001::db8::/32", "not an IPv4 or IPv6 network"),
    ("an HTML line", "<html><body>Not Found</body></html>", "not an IPv4 or IPv6 network"),
]


@pytest.mark.parametrize("text,message", [c[1:] for c in BAD_NETWORKS], ids=[c[0] for c in BAD_NETWORKS])
def test_parse_network_refuses(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_network(text)


def test_host_bits_message_names_the_network_meant() -> None:
    with pytest.raises(ValueError, match=r"192\.0\.2\.0/24"):
        parse_network("192.0.2.1/24")


# -- local addresses ----------------------------------------------------------

LOCAL_CASES = [
    ("IPv4 loopback", "127.0.0.1", True),
    ("the top of 127/8", "127.255.255.255", True),
    ("RFC 1918 10/8", "10.1.2.3", True),
    ("RFC 1918 172.16/12, first", "172.16.0.0", True),
    ("RFC 1918 172.16/12, last", "172.31.255.255", True),
    ("just past 172.16/12", "172.32.0.0", False),
    ("RFC 1918 192.168/16", "192.168.1.1", True),
    ("IPv4 link-local", "169.254.10.20", True),
    ("RFC 6598 CGNAT, first", "100.64.0.0", True),
    ("RFC 6598 CGNAT, last", "100.127.255.255", True),
    ("just past CGNAT", "100.128.0.0", False),
    ("a public IPv4 address", "8.8.8.8", False),
    ("IPv6 loopback", "::1", True),
    ("RFC 4193 unique local fd00::/8", "fd12:3456::1", True),
    ("unique local fc00::/8 half", "fc00::1", True),
    ("IPv6 link-local", "fe80::1", True),
    ("IPv6 link-local with a zone index", "fe80::1%eth0", True),
    ("a public IPv6 address", "2001:db8::1", False),
    ("IPv4-mapped private address", "::ffff:10.0.0.1", True),
    ("IPv4-mapped public address", "::ffff:8.8.8.8", False),
    ("the unspecified address is not local", "::", False),
    ("text that is no address", "example.org", False),
]


@pytest.mark.parametrize("ip,expected", [c[1:] for c in LOCAL_CASES], ids=[c[0] for c in LOCAL_CASES])
def test_classify_local(ip: str, expected: bool) -> None:
    assert classify_local(ip) is expected


def test_classify_local_takes_integers_with_a_version() -> None:
    assert classify_local(0x7F000001, 4) is True
    assert classify_local(1, 6) is True
    with pytest.raises(ValueError):
        classify_local(1)


# -- the compiled cache -------------------------------------------------------


def test_serialise_round_trip_keeps_every_range_and_answer() -> None:
    data = serialise(TABLE, b"\x01key", {"warnings": ["a.zone:3: bad"], "files": 2})
    back = deserialise(data)
    assert back.key == b"\x01key"
    assert back.meta == {"warnings": ["a.zone:3: bad"], "files": 2}
    for version in (4, 6):
        assert list(back.table.ranges(version)) == list(TABLE.ranges(version))
    assert (back.table.networks4, back.table.networks6, back.table.conflicts) == (
        TABLE.networks4, TABLE.networks6, TABLE.conflicts)
    for _label, ip, expected in LOOKUPS:
        assert back.table.lookup(ip) == expected


def test_a_round_trip_of_an_empty_table() -> None:
    back = deserialise(serialise(RangeTable.build([]), b""))
    assert len(back.table) == 0 and back.table.lookup("192.0.2.1") is None


def test_deserialise_reads_from_a_memoryview_without_copying() -> None:
    buf = bytearray(serialise(TABLE, b"k"))
    back = deserialise(memoryview(buf))
    assert isinstance(back.table.v4_first, memoryview)
    assert back.table.v4_first.obj is not None
    assert back.table.lookup("198.51.100.200") == "DE"


def _damaged(kind: str) -> bytes:
    data = bytearray(serialise(TABLE, b"k"))
    if kind == "flip":
        data[-3] ^= 0xFF
    elif kind == "truncate":
        del data[-20:]
    elif kind == "magic":
        data[0:8] = b"NOTGEO!!"
    elif kind == "version":
        struct.pack_into("<I", data, 8, FORMAT_VERSION + 1)
    elif kind == "empty":
        data = bytearray()
    elif kind == "header":
        data[16:20] = b"}}}}"
    return bytes(data)


@pytest.mark.parametrize("kind", ["flip", "truncate", "magic", "version", "empty", "header"], ids=[
    "a flipped byte in the body fails the checksum",
    "a truncated file is refused",
    "a foreign file is refused",
    "a cache from another format version is refused",
    "an empty file is refused",
    "a garbled header is refused",
])
def test_deserialise_refuses_damaged_bytes(kind: str) -> None:
    with pytest.raises(CacheFormatError):
        deserialise(_damaged(kind))


# -- country codes ------------------------------------------------------------


def test_the_iso_table_has_the_249_assigned_codes() -> None:
    assert len(ISO_3166_ALPHA2) == 249
    assert all(len(c) == 2 and c.isalpha() and c.isupper() for c in ISO_3166_ALPHA2)


CODE_CASES = [
    ("an upper-case code", "US", True),
    ("a lower-case code", "mx", True),
    ("a mixed-case code", "Ca", True),
    ("Kosovo's user-assigned code, used by MaxMind", "XK", True),
    ("the RIR region code EU", "EU", True),
    ("the RIR region code AP", "ap", True),
    ("the United Kingdom's common misspelling", "UK", False),
    ("an unassigned pair of letters", "XX", False),
    ("three letters", "USA", False),
    ("one letter", "U", False),
    ("digits", "12", False),
    ("the empty string", "", False),
    ("a code with a trailing newline", "US\n", False),
    ("the pseudo-country local", "local", False),
]


@pytest.mark.parametrize("code,expected", [c[1:] for c in CODE_CASES], ids=[c[0] for c in CODE_CASES])
def test_is_country_code(code: str, expected: bool) -> None:
    assert is_country_code(code) is expected


def test_codes_are_stored_upper_case() -> None:
    assert normalise_country("gb") == "GB"
    table = RangeTable.build([("192.0.2.0/24", "gb")])
    assert table.countries == ("GB",)
    assert set(EXTRA_CODES) == {"EU", "AP", "XK"}


def test_build_refuses_an_invalid_country_code() -> None:
    with pytest.raises(ValueError, match="'XX' is not an ISO 3166-1 alpha-2"):
        RangeTable.build([("192.0.2.0/24", "XX")])
