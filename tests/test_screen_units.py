"""Tables for the screen's pure parts: client address forms and keys
(core/ip.py) and the framing of a PROXY header (screen.proxy_header_length)."""

from __future__ import annotations

import ipaddress
import re
import struct
from pathlib import Path

import pytest

from smtpguard.core.ip import client_ip, client_key, in_networks, unmapped
from smtpguard.screen import PROXY_V2_SIGNATURE, proxy_header_length

IP_CASES = [
    ("IPv4 as is", "192.0.2.7", "192.0.2.7", "192.0.2.7"),
    ("IPv4-mapped IPv6 is the IPv4 client", "::ffff:192.0.2.7", "192.0.2.7", "192.0.2.7"),
    ("mapped, written in hex", "::ffff:a00:1", "10.0.0.1", "10.0.0.1"),
    ("an ipaddress object", ipaddress.ip_address("::ffff:10.0.0.1"), "10.0.0.1", "10.0.0.1"),
    ("IPv6 compressed, counted per /64", "2001:DB8:0:0:1:2:3:4", "2001:db8::1:2:3:4", "2001:db8::/64"),
    ("IPv6 in brackets", "[2001:db8::1]", "2001:db8::1", "2001:db8::/64"),
    ("an AF_UNIX path is no address", b"/run/x.sock", None, None),
    ("garbage", "a00:1:zz", None, None),
    ("empty", "", None, None),
]


@pytest.mark.parametrize("label, value, ip, key", IP_CASES, ids=[c[0] for c in IP_CASES])
def test_client_address_forms(label: str, value: object, ip: str | None, key: str | None) -> None:
    assert client_ip(value) == ip
    assert client_key(value) == key


def test_networks_match_mapped_clients_as_ipv4() -> None:
    nets = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))
    assert in_networks("::ffff:10.1.2.3", nets)
    assert in_networks("2001:db8::5", nets)
    assert not in_networks("11.0.0.1", nets)
    assert not in_networks("not an ip", nets)


def test_unmapped_unwraps_only_ipv4_mapped_addresses() -> None:
    assert unmapped(ipaddress.ip_address("::ffff:192.0.2.7")) == ipaddress.ip_address("192.0.2.7")
    for text in ("192.0.2.7", "2001:db8::1", "::192.0.2.7", "64:ff9b::c000:207"):   # compatible, NAT64: not mapped
        assert unmapped(ipaddress.ip_address(text)) == ipaddress.ip_address(text)


def test_core_ip_is_the_one_place_that_unwraps_mapped_addresses() -> None:
    """issue 16: every other module calls core.ip (unmapped/parse_ip/client_ip)
    instead of reading `.ipv4_mapped` itself (a test for `is not None` alone,
    such as refusing a mapped network, is not unwrapping)."""
    package = Path(__file__).resolve().parent.parent / "smtpguard"
    by_hand = [f"{path.relative_to(package)}:{n}" for path in sorted(package.rglob("*.py"))
               if path.name != "ip.py" or path.parent.name != "core"
               for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
               if re.search(r"\.ipv4_mapped\b(?!\s+is\b)", line)]
    assert by_hand == []


V2_HEAD = PROXY_V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 12)
FRAME_CASES = [
    ("nothing yet", b"", None),
    ("v1 partial", b"PROXY TCP4 1.2.3.4", None),
    ("v1 complete, SMTP after it", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\nEHLO x\r\n", 32),
    ("v1 too long", b"PROXY " + b"1" * 120, -1),
    ("not PROXY", b"EHLO x\r\n", -1),
    ("a P that is not PROXY", b"POST / HTTP/1.0\r\n", -1),
    ("v2 signature partial", PROXY_V2_SIGNATURE[:7], None),
    ("v2 header partial", V2_HEAD + b"\x00" * 5, None),
    ("v2 complete", V2_HEAD + b"\x00" * 12 + b"EHLO", 28),
    ("v2 wrong signature", b"\r\n\r\nXXXXXXXXXXXXXXX", -1),
    ("v2 longer than any balancer sends", PROXY_V2_SIGNATURE + b"\x21\x11\xff\xff", -1),
]


@pytest.mark.parametrize("label, buf, expected", FRAME_CASES, ids=[c[0] for c in FRAME_CASES])
def test_proxy_header_framing(label: str, buf: bytes, expected: int | None) -> None:
    assert proxy_header_length(buf) == expected
