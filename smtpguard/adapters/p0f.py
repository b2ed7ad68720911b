"""The p0f v3 daemon's unix API socket: one query per client, one answer.

Decides: nothing; asks a running p0f v3 daemon what it saw of one address
  and turns its answer into an OsFact (core/fingerprint.py).
Inputs: the API socket path (`fingerprint.p0f_socket`), the client address
  (an IPv4-mapped IPv6 address is asked as IPv4, as p0f records it) and a
  timeout.
Output: an OsFact with source "p0f": OK with the family, name, hop distance
  and match quality; NONE when p0f saw the host but matched no signature;
  UNKNOWN_OS otherwise.
Failure modes: a daemon that is absent, refuses, closes early, is slower
  than the timeout, answers with a bad magic, a short response or a status
  other than "ok" gives UNKNOWN_OS (logged as `osfp.p0f_failed` for socket
  errors and timeouts). Nothing raises into the session.
Defaults and why: no defaults here; sources/fingerprint.py holds the settings
  (p0f_timeout 0.5 s: p0f answers from memory in microseconds).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct

from smtpguard.core.facts import NONE, OK
from smtpguard.core.ip import unmapped
from smtpguard.core.fingerprint import MATCH_BY_P0F_QUALITY, NO_MATCH, UNKNOWN_OS, OsFact, family_of

# The fingerprint source's logger: the event names and the logger stay what
# they were before this client moved out of sources/osfp.py, now sources/fingerprint.py.
log = logging.getLogger("smtpguard.osfp")

# p0f v3 API (p0f README §4, api.h): native-endian, packed structs.
P0F_QUERY_MAGIC = 0x50304601
P0F_RESPONSE_MAGIC = 0x50304602
P0F_STATUS_OK = 0x10             # the other statuses (bad query 0x00, no match 0x20) are not usable
P0F_ADDR_IPV4, P0F_ADDR_IPV6 = 4, 6
P0F_QUERY = struct.Struct("=IB16s")                        # 21 bytes
P0F_RESPONSE = struct.Struct("=IIIIIIIIIhBB32s32s32s32s32s32s")  # 232 bytes


def p0f_query(ip: str) -> bytes:
    """The 21-byte p0f v3 API query for one address (ValueError if not an IP)."""
    addr = unmapped(ipaddress.ip_address(ip))
    kind = P0F_ADDR_IPV4 if addr.version == 4 else P0F_ADDR_IPV6
    return P0F_QUERY.pack(P0F_QUERY_MAGIC, kind, addr.packed.ljust(16, b"\0"))


def _cstring(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace").strip()


def p0f_fact(response: bytes) -> OsFact:
    """A p0f v3 API response (232 bytes) -> OsFact; UNKNOWN_OS unless usable."""
    if len(response) != P0F_RESPONSE.size:
        return UNKNOWN_OS
    (magic, status, _first, _last, _conns, _uptime, _wrap, _nat, _chg, distance, _bad_sw,
     quality, os_name, os_flavor, _http, _http_flavor, _link, _lang) = P0F_RESPONSE.unpack(response)
    if magic != P0F_RESPONSE_MAGIC or status != P0F_STATUS_OK:
        return UNKNOWN_OS
    name, flavor = _cstring(os_name), _cstring(os_flavor)
    hops = distance if distance >= 0 else None
    if not name:   # p0f saw the host but matched no signature
        return OsFact(status=NONE, os="unknown", os_name="unknown", os_distance=hops,
                      os_match=NO_MATCH, source="p0f")
    return OsFact(status=OK, os=family_of(name, flavor), os_name=f"{name} {flavor}".strip(),
                  os_distance=hops, os_match=MATCH_BY_P0F_QUALITY.get(quality, "generic"), source="p0f")


async def query_p0f(socket_path: str, ip: str, timeout: float, session_id: str = "") -> OsFact:
    """Ask a p0f v3 daemon about `ip`; UNKNOWN_OS on any failure or timeout."""
    try:
        query = p0f_query(ip)
    except ValueError:
        return UNKNOWN_OS
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(socket_path)
            writer.write(query)
            await writer.drain()
            response = await reader.readexactly(P0F_RESPONSE.size)
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        log.warning("osfp.p0f_failed session=%s socket=%s error=%s",
                    session_id or "-", socket_path, type(exc).__name__)
        return UNKNOWN_OS
    finally:
        if writer is not None:
            writer.close()
    return p0f_fact(response)
