"""Client addresses as the rest of smtpguard sees them: one form, validated.

Decides: the canonical text of a client address, and the key a per-client
  limit counts it under.
Inputs: an address as a socket, a PROXY header or a log gives it (text or
  an `ipaddress` object).
Output: `client_ip` -> the compressed text form, an IPv4-mapped IPv6
  address (`::ffff:192.0.2.7`, RFC 4291 §2.5.5.2) written as the IPv4
  address it carries; `client_key` -> the address (IPv4) or its /64
  (IPv6), as the unit one client is counted in.
Failure modes: anything that is not an IP address gives None (a PROXY
  header's AF_UNIX path, a garbage string); the caller decides what that means.
Defaults and why: IPv6 clients are counted per /64, the smallest prefix
  an ISP hands to one customer (RFC 6177 §3): one host can take any
  address inside it, so counting single addresses would count nothing.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Union

# RFC 6177 §3: one end site gets at least a /64.
IPV6_CLIENT_PREFIX = 64

Address = Union[str, ipaddress.IPv4Address, ipaddress.IPv6Address]


def unmapped(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The IPv4 address an IPv4-mapped IPv6 address carries (RFC 4291
    §2.5.5.2: a dual-stack socket's view of an IPv4 client); any other
    address unchanged. The one place smtpguard unwraps `::ffff:`."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def parse_ip(value: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address, IPv4-mapped IPv6 unwrapped to IPv4; None when it is not one."""
    if isinstance(value, str):
        return _parse_text(value)
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return unmapped(value)
    return None


# Parsed once per client, not once per use (the screen asks up to five
# times per connection; ipaddress was the top of a refused session's profile).
@functools.lru_cache(maxsize=4096)
def _parse_text(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        addr = ipaddress.ip_address(text.partition("%")[0])  # a scope id is local only
    except ValueError:
        return None
    return unmapped(addr)


def client_ip(value: object) -> str | None:
    """The one text form of a client address (`::ffff:10.0.0.1` -> `10.0.0.1`)."""
    addr = parse_ip(value)
    return None if addr is None else addr.compressed


def client_key(value: object) -> str | None:
    """The unit a per-client limit counts: the IPv4 address, or the IPv6 /64."""
    addr = parse_ip(value)
    if addr is None:
        return None
    if addr.version == 4:
        return addr.compressed
    net = ipaddress.IPv6Network((int(addr) >> (128 - IPV6_CLIENT_PREFIX) << (128 - IPV6_CLIENT_PREFIX),
                                 IPV6_CLIENT_PREFIX))
    return net.compressed


def in_networks(value: object, networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    """Whether the client address is inside one of the networks (mapped addresses as IPv4)."""
    if not networks:
        return False
    addr = parse_ip(value)
    if addr is None:
        return False
    return any(addr.version == n.version and addr in n for n in networks)
