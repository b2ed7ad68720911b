"""core/fingerprint.py: SYN parsing, p0f v3 signature syntax and matching.

Every SYN here is built from the documented field values of a stack (its
initial TTL, window, MSS, option order, window scale, IP ID habits) by the
small builder below, then classified against the shipped smtpguard.fp and,
when installed, p0f's own /etc/p0f/p0f.fp.
"""

from __future__ import annotations

import ast
import struct
from importlib import resources
from pathlib import Path

import pytest

from smtpguard.core.facts import NONE, OK, UNKNOWN
from smtpguard.core import fingerprint as syn_module
from smtpguard.core.fingerprint import (
    FAMILIES,
    MAX_DISTANCE,
    QUIRK_NAMES,
    UNKNOWN_OS,
    classify,
    family_of,
    initial_ttl,
    load_signatures,
    parse_syn,
)
from smtpguard.sources.registry import FACTS

P0F_FP = Path("/etc/p0f/p0f.fp")
needs_p0f = pytest.mark.skipif(not P0F_FP.exists(), reason="p0f's /etc/p0f/p0f.fp is not installed")

SYN, ACK, PSH, URG, ECE, CWR, RST = 0x02, 0x10, 0x08, 0x20, 0x40, 0x80, 0x04

# Option layouts of the stacks, as (token, value) lists for the builder.
WINDOWS_OPTS = ["mss", "nop", "ws", "nop", "nop", "sok"]
WINDOWS_XP_OPTS = ["mss", "nop", "nop", "sok"]
LINUX_OPTS = ["mss", "sok", "ts", "nop", "ws"]
LINUX_NOTS_OPTS = ["mss", "nop", "nop", "sok", "nop", "ws"]
APPLE_OPTS = ["mss", "nop", "ws", "nop", "nop", "ts", "sok", "eol"]
FREEBSD_OPTS = ["mss", "nop", "ws", "sok", "ts"]
OPENBSD_OPTS = ["mss", "nop", "nop", "sok", "nop", "ws", "nop", "nop", "ts"]


def tcp_options(layout: list[str], *, mss: int, ws: int, ts1: int = 0x1234567, ts2: int = 0) -> bytes:
    out = b""
    for token in layout:
        if token == "mss":
            out += struct.pack("!BBH", 2, 4, mss)
        elif token == "nop":
            out += b"\x01"
        elif token == "ws":
            out += struct.pack("!BBB", 3, 3, ws)
        elif token == "sok":
            out += b"\x04\x02"
        elif token == "ts":
            out += struct.pack("!BBII", 8, 10, ts1, ts2)
        elif token == "eol":
            out += b"\x00"
        else:
            raise AssertionError(token)
    return out + b"\x00" * (-len(out) % 4)   # EOL padding up to a 32-bit word


def build_syn(
    *,
    version: int = 4,
    ttl: int = 64,
    window: int = 64240,
    layout: list[str] | None = None,
    mss: int = 1460,
    ws: int = 7,
    ts1: int = 0x1234567,
    ts2: int = 0,
    df: bool = True,
    ip_id: int = 0x1B2C,
    tos: int = 0,
    reserved_bit: bool = False,
    flow: int = 0,
    seq: int = 0x5EED,
    ack: int = 0,
    flags: int = SYN,
    urgent: int = 0,
    raw_options: bytes | None = None,
    ip_options: bytes = b"",
    payload: int = 0,
    protocol: int = 6,
) -> bytes:
    """IP + TCP headers of a SYN, as TCP_SAVED_SYN returns them."""
    options = raw_options if raw_options is not None else tcp_options(
        LINUX_OPTS if layout is None else layout, mss=mss, ws=ws, ts1=ts1, ts2=ts2)
    doff = (20 + len(options)) // 4
    tcp = struct.pack("!HHIIBBHHH", 40000, 25, seq, ack, doff << 4, flags, window, 0, urgent) + options
    if version == 4:
        ihl = (20 + len(ip_options)) // 4
        frag = (0x4000 if df else 0) | (0x8000 if reserved_bit else 0)
        total = ihl * 4 + len(tcp) + payload
        ip = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, total, ip_id, frag, ttl, protocol, 0,
                         bytes([192, 0, 2, 1]), bytes([198, 51, 100, 25])) + ip_options
    else:
        word = (6 << 28) | (tos << 20) | flow
        ip = struct.pack("!IHBB16s16s", word, len(tcp) + payload, protocol, ttl,
                         bytes.fromhex("20010db8000000000000000000000001"),
                         bytes.fromhex("20010db8000000000000000000000025"))
    return ip + tcp


def shipped() -> str:
    return resources.files("smtpguard").joinpath("data", "smtpguard.fp").read_text(encoding="utf-8")


SHIPPED = load_signatures(shipped(), source="smtpguard.fp")


# --------------------------------------------------------------------------
# Families against the shipped set
# --------------------------------------------------------------------------

FAMILY_CASES = [
    pytest.param(dict(ttl=128, window=64240, layout=WINDOWS_OPTS, ws=8),
                 "windows", "exact", "Windows 10/11", 0,
                 id="Windows 10 on Ethernet (64240, shift 8, TTL 128) is windows 10/11"),
    pytest.param(dict(ttl=116, window=64240, layout=WINDOWS_OPTS, ws=8),
                 "windows", "exact", "Windows 10/11", 12,
                 id="Windows 10 twelve routers away is still windows, 12 hops"),
    pytest.param(dict(ttl=108, window=64240, layout=WINDOWS_OPTS, ws=8, mss=1452),
                 "windows", "exact", "Windows 10/11", 20,
                 id="Windows 10 behind PPPoE with the MSS clamped to 1452 keeps its 64240 window"),
    pytest.param(dict(version=6, ttl=119, window=64800, layout=WINDOWS_OPTS, ws=8, mss=1440),
                 "windows", "exact", "Windows 10/11", 9,
                 id="Windows 10 over IPv6 (MSS 1440, 45 segments) is windows"),
    pytest.param(dict(ttl=128, window=64240, layout=WINDOWS_OPTS, ws=8, df=False),
                 "windows", "fuzzy", "Windows 10", 0,
                 id="Windows 10 whose DF bit a NAT cleared is a fuzzy windows: never refused by the shipped rules"),
    pytest.param(dict(ttl=121, window=8192, layout=WINDOWS_OPTS, ws=2),
                 "windows", "exact", "Windows 7", 7,
                 id="Windows 7 (8192, shift 2) is windows 7"),
    pytest.param(dict(ttl=113, window=8192, layout=WINDOWS_OPTS, ws=8),
                 "windows", "exact", "Windows 8", 15,
                 id="Windows 8 or Server 2012 (8192, shift 8) is windows"),
    pytest.param(dict(ttl=123, window=65535, layout=WINDOWS_XP_OPTS),
                 "windows", "exact", "Windows XP", 5,
                 id="Windows XP without window scaling (65535) is windows XP"),
    pytest.param(dict(ttl=128, window=17520, layout=WINDOWS_XP_OPTS),
                 "windows", "exact", "Windows XP", 0,
                 id="Windows XP with 16 KB rounded up to 12 segments (17520) is windows XP"),
    pytest.param(dict(ttl=64, window=64240, layout=WINDOWS_OPTS, ws=8),
                 "windows", "fuzzy", "Windows 10/11", 64,
                 id="Windows 10 whose TTL a tethering phone reset to 64 is a fuzzy windows"),
    pytest.param(dict(ttl=64, window=65000, layout=WINDOWS_OPTS, ws=6), "unknown", "none", "unknown", 0,
                 id="a Windows layout with TTL 64 and no Windows window is not windows"),
    pytest.param(dict(ttl=118, window=65000, layout=WINDOWS_OPTS, ws=6),
                 "windows", "generic", "Windows NT 6", 10,
                 id="a Windows layout with a tuned window falls back to generic windows"),
    pytest.param(dict(ttl=49, window=64240, layout=LINUX_OPTS, ws=7),
                 "linux", "exact", "Linux 4.19-6.x", 15,
                 id="Linux 5.x (64240, shift 7) fifteen hops away is linux 4.19+"),
    pytest.param(dict(ttl=59, window=64240, layout=LINUX_OPTS, ws=9),
                 "linux", "exact", "Linux 4.19-6.x", 5,
                 id="Linux with 16 MB buffers (shift 9) is linux"),
    pytest.param(dict(version=6, ttl=60, window=64800, layout=LINUX_OPTS, ws=7, mss=1440, flow=0x3A5F1),
                 "linux", "exact", "Linux 4.19-6.x", 4,
                 id="Linux over IPv6 with a flow label is linux"),
    pytest.param(dict(version=6, ttl=60, window=64800, layout=LINUX_OPTS, ws=7, mss=1440, flow=0),
                 "linux", "fuzzy", "Linux 4.19-6.x", 4,
                 id="Linux over IPv6 without a flow label is a fuzzy linux"),
    pytest.param(dict(ttl=52, window=29200, layout=LINUX_OPTS, ws=7),
                 "linux", "exact", "Linux 3.x-4.18", 12,
                 id="Linux 3.10 (29200) is linux 3.x-4.18"),
    pytest.param(dict(ttl=64, window=14600, layout=LINUX_OPTS, ws=7),
                 "linux", "exact", "Linux 2.6.39-3.x", 0,
                 id="Linux 3.0 (10 segments) is linux 2.6.39-3.x"),
    pytest.param(dict(ttl=57, window=5840, layout=LINUX_OPTS, ws=2),
                 "linux", "exact", "Linux 2.6.x", 7,
                 id="Linux 2.6 (4 segments) is linux 2.6"),
    pytest.param(dict(ttl=58, window=64240, layout=LINUX_NOTS_OPTS, ws=7),
                 "linux", "exact", "Linux 4.19-6.x", 6,
                 id="Linux with timestamps off is still linux"),
    pytest.param(dict(ttl=58, window=64240, layout=LINUX_OPTS, ws=7, flags=SYN | ECE | CWR),
                 "linux", "fuzzy", "Linux 4.19-6.x", 6,
                 id="Linux asking for ECN on the SYN is a fuzzy linux"),
    pytest.param(dict(ttl=24, window=64240, layout=LINUX_OPTS, ws=7),
                 "linux", "fuzzy", "Linux 4.19-6.x", 40,
                 id="Linux forty hops away is a fuzzy linux"),
    pytest.param(dict(ttl=55, window=62000, layout=LINUX_OPTS, ws=7),
                 "linux", "generic", "Linux 2.6 or newer", 9,
                 id="Linux with a hand-set window falls back to generic linux"),
    pytest.param(dict(ttl=54, window=64240, layout=LINUX_OPTS, ws=1),
                 "android", "exact", "Android", 10,
                 id="an Android phone on UMTS buffers (shift 1) is android"),
    pytest.param(dict(ttl=53, window=65535, layout=APPLE_OPTS, ws=6),
                 "macos", "exact", "macOS 11", 11,
                 id="macOS 12 (65535, shift 6, EOL padding) is macos"),
    pytest.param(dict(ttl=64, window=65535, layout=APPLE_OPTS, ws=6, flags=SYN | ECE | CWR),
                 "macos", "exact", "macOS 11", 0,
                 id="macOS asking for ECN is still an exact macos"),
    pytest.param(dict(ttl=61, window=65535, layout=APPLE_OPTS, ws=4),
                 "macos", "exact", "macOS 10.x", 3,
                 id="OS X 10.9 (shift 4) is macos 10.x"),
    pytest.param(dict(ttl=50, window=65535, layout=APPLE_OPTS, ws=2),
                 "ios", "exact", "iOS", 14,
                 id="an older iPhone (shift 2) is ios"),
    pytest.param(dict(ttl=56, window=65535, layout=FREEBSD_OPTS, ws=6, ip_id=0),
                 "freebsd", "exact", "FreeBSD 13", 8,
                 id="FreeBSD 14 (zero IP ID with DF, RFC 6864) is freebsd 13+"),
    pytest.param(dict(ttl=56, window=65535, layout=FREEBSD_OPTS, ws=6),
                 "freebsd", "exact", "FreeBSD 9-12", 8,
                 id="FreeBSD 12 (non-zero IP ID) is freebsd 9-12"),
    pytest.param(dict(ttl=47, window=16384, layout=OPENBSD_OPTS, ws=6),
                 "openbsd", "exact", "OpenBSD 6", 17,
                 id="OpenBSD 7 (16384, shift 6) is openbsd"),
    pytest.param(dict(ttl=64, window=16384, layout=OPENBSD_OPTS, ws=3),
                 "openbsd", "exact", "OpenBSD 4", 0,
                 id="OpenBSD 5 (shift 3) is openbsd"),
]


@pytest.mark.parametrize("spec, family, quality, name, hops", FAMILY_CASES)
def test_shipped_signatures_name_each_family(spec: dict[str, object], family: str, quality: str,
                                             name: str, hops: int) -> None:
    fact = classify(build_syn(**spec), SHIPPED)  # type: ignore[arg-type]
    assert (fact.os, fact.os_match) == (family, quality), fact
    assert fact.os_name.startswith(name)
    assert fact.os_distance == hops
    assert fact.status == (NONE if family == "unknown" else OK)
    assert fact.as_facts() == {"os": family, "os_name": fact.os_name, "os_distance": hops, "os_match": quality}


NO_MATCH_CASES = [
    pytest.param(dict(ttl=128, window=65495, mss=65495, layout=LINUX_OPTS, ws=7),
                 id="a Linux SYN sent with IP_TTL 128 is no known OS, never windows"),
    pytest.param(dict(ttl=128, window=64240, layout=WINDOWS_XP_OPTS, df=False),
                 id="a TTL-128 device without DF in Windows XP's option order is not windows"),
    pytest.param(dict(ttl=120, window=8192, layout=WINDOWS_OPTS, ws=2, df=False, ip_id=0),
                 id="a TTL-128 device without DF and IP ID 0 in Windows 7's layout is not windows"),
    pytest.param(dict(ttl=125, window=12345, layout=WINDOWS_OPTS, ws=8, df=False),
                 id="without DF, Windows' layout with a window no Windows announces is not windows (generic needs DF)"),
    pytest.param(dict(ttl=125, window=65535, layout=WINDOWS_XP_OPTS, df=False),
                 id="without DF, XP's unscaled 65535 (printers, IP phones) is not windows"),
    pytest.param(dict(ttl=64, window=64240, layout=LINUX_OPTS, ws=7, ip_options=b"\x01\x01\x01\x00"),
                 id="IPv4 options no stack sends make a SYN unknown"),
]


@pytest.mark.parametrize("spec", NO_MATCH_CASES)
def test_syns_no_signature_explains_are_unknown_with_match_none(spec: dict[str, object]) -> None:
    fact = classify(build_syn(**spec), SHIPPED)  # type: ignore[arg-type]
    assert (fact.os, fact.os_match, fact.status) == ("unknown", "none", NONE)
    assert fact.fields is not None
    assert fact.os_distance == fact.fields.distance


# Each "other" signature of the shipped set, by the SYN its source describes
# (observed-signature notation, core/fingerprint.py synthesize()).
OTHER_CASES = [
    ("4:58:0:1460:49640,0:mss,nop,ws,nop,nop,sok:df,id+:0", "Solaris 10", "exact",
     "Solaris 10 (Windows' option order, TTL 64, 34 segments) is other"),
    ("4:55:0:1460:32850,1:nop,ws,nop,nop,ts,nop,nop,sok,mss:df,id+:0", "Solaris 8", "exact",
     "Solaris 8 (MSS written last) is other"),
    ("4:58:0:1460:65535,1:mss,nop,ws,nop,nop,ts,nop,nop,sok:df,id+:0", "AIX", "exact", "AIX 5.3 is other"),
    ("4:61:0:1460:32768,0:mss,ws,nop:df,id+:0", "HP-UX", "exact", "HP-UX 11 is other"),
    ("4:62:0:1460:16384,0:mss,nop,ws,nop,nop,ts:ts1-:0", "QNX", "exact", "QNX 6 (zero TSval) is other"),
    ("4:60:0:1460:16384,0:mss,nop,ws,nop,nop,ts,nop,nop,?12:df,id+:0", "RISC OS", "exact",
     "RISC OS 4 (option 12) is other"),
    ("4:120:0:1460:3000,0:mss,nop,ws::0", "OpenVMS", "exact", "OpenVMS 8 (TTL 128, no DF) is other, not windows"),
    ("4:59:0:1460:32768,0:mss,nop,ws:df,id+:0", "Tru64", "exact", "Tru64 is other"),
    ("4:118:0:1452:65535,0:mss,nop,nop,sok,nop,nop,ts::0", "BlackBerry", "exact",
     "a BlackBerry (TTL 128, no DF) is other, not windows"),
    ("4:60:0:1360:32768,0:mss,nop,nop,sok:df,id+:0", "Nintendo", "exact",
     "a Nintendo console (Windows XP's order at TTL 64) is other"),
    ("4:62:0:1460:5840,0:ws,nop,sok,ts,mss:df,id+:0", "FortiGate", "exact", "a FortiGate is other"),
    ("4:248:0:1460:65535,0:mss,ws,nop::0", "Plan 9", "exact", "Plan 9 is other"),
    ("4:252:0:1460:4128,0:mss:id-:0", "Cisco", "exact", "a Cisco IOS router (TTL 255, IP ID 0) is other"),
    ("4:126:0:1460:16384,0:mss:df,id+:0", "Novell", "exact", "NetWare (TTL 128, MSS only) is other, not windows"),
    ("4:62:0:1452:17424,0:mss::0", "AXIS", "exact", "an AXIS print server is other"),
    ("4:249:0:536:2144,0:mss::0", "lwIP", "exact", "an lwIP device on stock settings is other"),
    ("4:121:0:1460:4096,0:mss::0", "Embedded", "generic",
     "any MSS-only SYN at TTL 128 without DF is a generic other, not windows"),
    ("4:30:0:1460:4096,0:mss::0", "Embedded", "generic", "an MSS-only SYN at TTL 32 is a generic other"),
    ("4:59:0:1460:60000,0:nop,ws,nop,nop,ts,nop,nop,sok,mss:df,id+:0", "Unix", "generic",
     "the MSS written last is a generic Solaris-derived other"),
    ("4:124:0:1460:60352,2:mss,nop,ws,nop,nop,ts,nop,nop,sok:df,id+:0", "Unix", "generic",
     "TS before SACK with NOP pairs at TTL 128 is a generic other, not windows"),
    ("4:60:0:1460:61440,0:mss,nop,ws::0", "Unix", "generic", "MSS,NOP,WS without DF is a generic other"),
]


@pytest.mark.parametrize("observed, name, quality", [pytest.param(*c[:3], id=c[3]) for c in OTHER_CASES])
def test_other_systems_are_other_never_windows_or_unknown(observed: str, name: str, quality: str) -> None:
    fact = classify(syn_module.synthesize(observed), SHIPPED)
    assert (fact.os, fact.os_match) == ("other", quality), fact
    assert fact.os_name.startswith(name)


@pytest.mark.parametrize("mss, segments", [(1460, 44), (1440, 45), (1400, 46), (1380, 47), (1360, 48)])
def test_64kb_rounded_down_to_whole_segments_is_exact_for_windows_and_linux(mss: int, segments: int) -> None:
    win = classify(syn_module.synthesize(f"4:110:0:{mss}:{mss * segments},8:mss,nop,ws,nop,nop,sok:df,id+:0"),
                   SHIPPED)
    lin = classify(syn_module.synthesize(f"4:50:0:{mss}:{mss * segments},7:mss,sok,ts,nop,ws:df,id+:0"), SHIPPED)
    assert (win.os, win.os_match, lin.os, lin.os_match) == ("windows", "exact", "linux", "exact")


def test_synthesize_round_trips_through_the_parser() -> None:
    for observed in ("4:117:0:1460:64240,8:mss,nop,ws,nop,nop,sok:df,id+:0",
                     "6:57:0:1440:65535,6:mss,nop,ws,nop,nop,ts,sok,eol+1:ecn,flow:0",
                     "4:252:0:1460:4128,0:mss:id-:0",
                     "4:64:0:1460:64240,7:mss,sok,ts,nop,ws:df,ts1-,ts2+:0"):
        f = parse_syn(syn_module.synthesize(observed))
        assert f is not None
        ver, ttl, _olen, mss, win, layout, quirks, _p = observed.split(":")
        assert (f.version, f.ttl, f.mss, f.window, f.wscale or 0) == (
            int(ver), int(ttl), int(mss), int(win.split(",")[0]), int(win.split(",")[1]))
        assert f.layout_text() == layout
        assert set(f.quirks) == {q for q in quirks.split(",") if q}


@pytest.mark.parametrize("observed", [
    pytest.param("4:64:0:1460:64240,7:mss,sok,ts,nop,ws:df,id+", id="seven fields"),
    pytest.param("5:64:0:1460:64240,7:mss:df:0", id="IP version 5"),
    pytest.param("4:64:0:1460:64240,7:mss,nop:df:0", id="options not on a 32-bit word"),
    pytest.param("4:64:0:1460:64240,7:mss,bogus:df:0", id="an unknown option"),
    pytest.param("4:64:0:1460:64240,7:mss:nonsense:0", id="an unknown quirk"),
])
def test_synthesize_names_what_it_cannot_build(observed: str) -> None:
    with pytest.raises(ValueError):
        syn_module.synthesize(observed)


def test_ttl_128_linux_and_ttl_64_linux_are_told_apart() -> None:
    low = classify(build_syn(ttl=64, window=65495, mss=65495, ws=10), SHIPPED)
    high = classify(build_syn(ttl=128, window=65495, mss=65495, ws=10), SHIPPED)
    assert (low.os, low.os_match) == ("linux", "exact")
    assert (high.os, high.os_match) == ("unknown", "none")


# --------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------

def test_parse_reads_every_field_of_an_ipv4_syn() -> None:
    f = parse_syn(build_syn(ttl=54, window=64240, mss=1460, ws=7, ts1=777, ts2=0, ip_id=0x4242))
    assert f is not None
    assert (f.version, f.ttl, f.initial_ttl, f.distance, f.olen) == (4, 54, 64, 10, 0)
    assert (f.df, f.ip_id, f.ecn, f.flow_label) == (True, 0x4242, False, 0)
    assert (f.window, f.mss, f.wscale, f.ts1, f.ts2) == (64240, 1460, 7, 777, 0)
    assert f.layout == ("mss", "sok", "ts", "nop", "ws")
    assert f.quirks == ("df", "id+")
    assert f.signature() == "4:54+10:0:1460:mss*44,7:mss,sok,ts,nop,ws:df,id+:0"


def test_parse_reads_an_ipv6_syn_with_hop_limit_and_flow_label() -> None:
    f = parse_syn(build_syn(version=6, ttl=57, flow=0xBEEF, window=64800, mss=1440))
    assert f is not None
    assert (f.version, f.ttl, f.initial_ttl, f.flow_label, f.df, f.olen) == (6, 57, 64, 0xBEEF, False, 0)
    assert f.quirks == ("flow",)


def test_parse_walks_ipv6_extension_headers_into_olen() -> None:
    raw = build_syn(version=6, ttl=64)
    hop_by_hop = bytes([6, 0]) + b"\x01\x04\x00\x00\x00\x00"   # next=TCP, 8 bytes, PadN
    ip = bytearray(raw[:40])
    ip[6] = 0                                                   # next header: hop-by-hop
    struct.pack_into("!H", ip, 4, struct.unpack_from("!H", raw, 4)[0] + 8)
    f = parse_syn(bytes(ip) + hop_by_hop + raw[40:])
    assert f is not None and f.olen == 8 and f.layout == ("mss", "sok", "ts", "nop", "ws")


def test_apple_eol_padding_is_part_of_the_layout() -> None:
    f = parse_syn(build_syn(layout=APPLE_OPTS, window=65535, ws=6))
    assert f is not None
    assert f.layout[-1] == "eol" and f.eol_pad == 1
    assert f.layout_text() == "mss,nop,ws,nop,nop,ts,sok,eol+1"


def test_payload_announced_by_the_ip_length_sets_pclass() -> None:
    f = parse_syn(build_syn(payload=100))   # TCP Fast Open data on the SYN
    assert f is not None and f.payload == 100 and f.pclass == "+"


@pytest.mark.parametrize("ttl, expected", [
    pytest.param(1, 32, id="TTL 1 came from at most 32"),
    pytest.param(32, 32, id="TTL 32 is an initial 32"),
    pytest.param(33, 64, id="TTL 33 came from 64"),
    pytest.param(64, 64, id="TTL 64 is an initial 64"),
    pytest.param(100, 128, id="TTL 100 came from 128"),
    pytest.param(129, 255, id="TTL 129 came from 255"),
    pytest.param(255, 255, id="TTL 255 is an initial 255"),
])
def test_initial_ttl_is_the_next_common_value(ttl: int, expected: int) -> None:
    assert initial_ttl(ttl) == expected


def _options_with(extra: bytes) -> bytes:
    return tcp_options(["mss"], mss=1460, ws=0)[:4] + extra


QUIRK_CASES = [
    pytest.param(dict(df=True, ip_id=7), {"df", "id+"}, id="DF with a non-zero IP ID is df and id+"),
    pytest.param(dict(df=True, ip_id=0), {"df"}, id="DF with a zero IP ID is df alone"),
    pytest.param(dict(df=False, ip_id=0), {"id-"}, id="no DF and a zero IP ID is id-"),
    pytest.param(dict(df=False, ip_id=9), set(), id="no DF and a non-zero IP ID has no IP quirk"),
    pytest.param(dict(reserved_bit=True), {"df", "id+", "0+"}, id="the reserved IP flag bit is 0+"),
    pytest.param(dict(tos=0x02), {"df", "id+", "ecn"}, id="ECT in the IP header is ecn"),
    pytest.param(dict(flags=SYN | ECE | CWR), {"df", "id+", "ecn"}, id="ECE and CWR on the SYN are ecn"),
    pytest.param(dict(version=6, flow=1), {"flow"}, id="a non-zero IPv6 flow label is flow"),
    pytest.param(dict(version=6, df=False, ip_id=0), set(), id="IPv6 has no DF or IP ID quirks"),
    pytest.param(dict(seq=0), {"df", "id+", "seq-"}, id="a zero sequence number is seq-"),
    pytest.param(dict(ack=5), {"df", "id+", "ack+"}, id="an ACK number without the ACK flag is ack+"),
    pytest.param(dict(flags=SYN | ACK, ack=0), {"df", "id+", "ack-"}, id="the ACK flag with a zero ACK number is ack-"),
    pytest.param(dict(urgent=1), {"df", "id+", "uptr+"}, id="an urgent pointer without URG is uptr+"),
    pytest.param(dict(flags=SYN | URG), {"df", "id+", "urgf+"}, id="the URG flag is urgf+"),
    pytest.param(dict(flags=SYN | PSH), {"df", "id+", "pushf+"}, id="the PSH flag is pushf+"),
    pytest.param(dict(ts1=0), {"df", "id+", "ts1-"}, id="a zero own timestamp is ts1-"),
    pytest.param(dict(ts2=99), {"df", "id+", "ts2+"}, id="a peer timestamp on a SYN is ts2+"),
    pytest.param(dict(raw_options=_options_with(b"\x00\x00\x07\x00")), {"df", "id+", "opt+"},
                 id="non-zero bytes after EOL are opt+"),
    pytest.param(dict(raw_options=_options_with(b"\x03\x03\x0f\x01")), {"df", "id+", "exws"},
                 id="a window scale above 14 is exws"),
    pytest.param(dict(raw_options=_options_with(b"\x08\x22\x00\x00")), {"df", "id+", "bad"},
                 id="an option longer than the header is bad"),
    pytest.param(dict(raw_options=b"\x02\x03\x05\xb4"), {"df", "id+", "bad"},
                 id="an MSS option of length 3 is bad"),
    pytest.param(dict(raw_options=_options_with(b"\x01\x01\x01\x1e")), {"df", "id+", "bad"},
                 id="an option kind without its length byte is bad"),
]


@pytest.mark.parametrize("spec, quirks", QUIRK_CASES)
def test_quirks_are_read_like_p0f(spec: dict[str, object], quirks: set[str]) -> None:
    f = parse_syn(build_syn(**spec))  # type: ignore[arg-type]
    assert f is not None
    assert set(f.quirks) == quirks
    assert list(f.quirks) == [q for q in QUIRK_NAMES if q in quirks]   # p0f's order


def test_unknown_option_kinds_are_kept_in_the_layout() -> None:
    f = parse_syn(build_syn(raw_options=_options_with(b"\x1e\x04\x00\x00")))   # kind 30 (MPTCP)
    assert f is not None and f.layout == ("mss", "?30")


def test_malformed_options_give_unknown_never_an_exception() -> None:
    fact = classify(build_syn(raw_options=_options_with(b"\x08\x22\x00\x00")), SHIPPED)
    assert (fact.os, fact.os_match) == ("unknown", "none")
    assert fact.fields is not None and "bad" in fact.fields.quirks


MALFORMED_CASES = [
    pytest.param(b"", id="no bytes"),
    pytest.param(build_syn()[:19], id="less than an IPv4 header"),
    pytest.param(build_syn()[:39], id="an IPv4 header and half a TCP header"),
    pytest.param(build_syn()[:-1], id="TCP options cut one byte short of the data offset"),
    pytest.param(build_syn(version=6)[:60], id="an IPv6 SYN cut inside its TCP header"),
    pytest.param(build_syn(protocol=17), id="a UDP datagram"),
    pytest.param(build_syn(version=6, protocol=58), id="an ICMPv6 packet"),
    pytest.param(build_syn(flags=ACK), id="a TCP segment without SYN"),
    pytest.param(build_syn(flags=SYN | RST), id="a SYN with RST"),
    pytest.param(b"\x55" + build_syn()[1:], id="IP version 5"),
    pytest.param(b"\x44" + build_syn()[1:], id="an IPv4 header length below 20"),
    pytest.param(b"\x4f" + build_syn()[1:], id="an IPv4 header length beyond the bytes"),
    pytest.param(build_syn()[:2] + b"\x00\x10" + build_syn()[4:], id="an IPv4 total length shorter than the headers"),
    pytest.param(build_syn()[:32] + b"\x40" + build_syn()[33:], id="a TCP data offset of 16 bytes"),
    pytest.param(build_syn()[:32] + b"\xf0" + build_syn()[33:], id="a TCP data offset beyond the bytes"),
]


@pytest.mark.parametrize("data", MALFORMED_CASES)
def test_malformed_headers_are_unknown(data: bytes) -> None:
    assert parse_syn(data) is None
    assert classify(data, SHIPPED) == UNKNOWN_OS


def test_no_syn_at_all_is_unknown() -> None:
    assert classify(None, SHIPPED) is UNKNOWN_OS
    assert UNKNOWN_OS.status == UNKNOWN
    assert UNKNOWN_OS.as_facts() == {"os": "unknown", "os_name": "unknown",
                                     "os_distance": "unknown", "os_match": "unknown"}


def test_fact_names_are_all_in_the_fact_table() -> None:
    fact = classify(build_syn(), SHIPPED)
    assert set(fact.as_facts()) <= set(FACTS)


# --------------------------------------------------------------------------
# Signature syntax
# --------------------------------------------------------------------------

def _one(sig: str, label: str = "s:unix:Test:1") -> syn_module.Signature:
    sigs = load_signatures(f"[tcp:request]\nlabel = {label}\nsig = {sig}\n")
    assert len(sigs) == 1
    return sigs.signatures[0]


def test_signature_fields_are_read() -> None:
    s = _one("4:54+10:0:1460:mss*44,7:mss,sok,ts,nop,ws:df,id+:0")
    assert (s.version, s.ittl, s.random_ttl, s.olen, s.mss) == (4, 64, False, 0, 1460)
    assert (s.win_kind, s.win_value, s.wscale) == ("mss", 44, 7)
    assert s.layout == ("mss", "sok", "ts", "nop", "ws") and s.eol_pad == 0
    assert s.pclass == "0" and s.label.family == "other"


@pytest.mark.parametrize("sig, check", [
    pytest.param("*:64-:0:*:*,*:mss::*", lambda s: s.random_ttl and s.ittl == 64 and s.win_kind == "any"
                 and s.wscale is None and s.version is None and s.pclass is None and s.mss is None,
                 id="64- is a random TTL up to 64 and stars are wildcards"),
    pytest.param("6:128:0:*:mtu*2,0:mss,nop,ws::0", lambda s: s.version == 6 and s.win_kind == "mtu" and s.win_value == 2,
                 id="mtu*2 is a window of two MTUs"),
    pytest.param("*:64:0:*:%8192,0:mss::+", lambda s: s.win_kind == "mod" and s.win_value == 8192 and s.pclass == "+",
                 id="%8192 is a window divisible by 8192"),
    pytest.param("*:64:0:*:65535,1:mss,nop,ws,nop,nop,ts,sok,eol+1:df,id+:0",
                 lambda s: s.layout[-1] == "eol" and s.eol_pad == 1, id="eol+1 is EOL plus one padding byte"),
    pytest.param("*:64:0:*:1024,0:mss,?30,sack::0", lambda s: s.layout == ("mss", "?30", "sack"),
                 id="?30 is an unknown option kind 30"),
    pytest.param("*:64+?:0:*:1024,0:::0", lambda s: s.ittl == 64 and s.layout == (),
                 id="64+? is TTL 64 with an unknown distance and an empty layout"),
])
def test_signature_notations(sig: str, check: object) -> None:
    assert callable(check) and check(_one(sig))


@pytest.mark.parametrize("text, message", [
    pytest.param("[tcp:request]\nlabel = s:unix:X:1\nsig = *:64:0:*:*,*:mss:df\n", "line 3: sig must have 8 fields",
                 id="a sig with seven fields"),
    pytest.param("[tcp:request]\nlabel = s:unix:X:1\nsig = 5:64:0:*:*,*:mss::0\n", "line 3: ver must be",
                 id="IP version 5"),
    pytest.param("[tcp:request]\nlabel = s:unix:X:1\nsig = *:300:0:*:*,*:mss::0\n", "line 3: ittl must be 1..255",
                 id="an initial TTL of 300"),
    pytest.param("[tcp:request]\nlabel = s:unix:X:1\nsig = *:64:0:*:mss*x,*:mss::0\n", "line 3: wsize mss*N",
                 id="mss*x as a window"),
    pytest.param("[tcp:request]\nlabel = s:unix:X:1\nsig = *:64:0:*:1024:mss::0\n", "line 3:",
                 id="a window without a scale"),
    pytest.param("[tcp:request]\nlabel = s:unix:X:1\nsig = *:64:0:*:*,*:mss,foo::0\n", "unknown option 'foo'",
                 id="an unknown option name"),
    pytest.param("[tcp:request]\nlabel = s:unix:X:1\nsig = *:64:0:*:*,*:eol+1,mss::0\n", "eol+N must be the last",
                 id="options after EOL"),
    pytest.param("[tcp:request]\nlabel = s:unix:X:1\nsig = *:64:0:*:*,*:mss:df,odd:0\n", "unknown quirk 'odd'",
                 id="an unknown quirk"),
    pytest.param("[tcp:request]\nlabel = s:unix:X:1\nsig = *:64:0:*:*,*:mss::1\n", "pclass must be",
                 id="payload class 1"),
    pytest.param("[tcp:request]\nsig = *:64:0:*:*,*:mss::0\n", "line 2: 'sig' before any 'label'",
                 id="a sig before any label"),
    pytest.param("[tcp:request]\nlabel = x:unix:X:1\n", "line 2: label must be",
                 id="a label of type x"),
    pytest.param("classes = win,unix\n[tcp:request]\nlabel = s:dos:X:1\n", "line 3: label class 'dos'",
                 id="a label class missing from the classes line"),
    pytest.param("[tcp:request]\nbogus = 1\n", "line 2: unknown directive 'bogus'",
                 id="an unknown directive"),
    pytest.param("[tcp:request]\njust words\n", "line 2: expected", id="a line that is no directive"),
])
def test_bad_signature_text_names_the_line(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("+", r"\+").replace("*", r"\*").replace("?", r"\?")):
        load_signatures(text)


def test_other_sections_are_skipped_and_sys_lines_are_kept() -> None:
    text = (
        "classes = win,unix,other\n[mtu]\nlabel = Ethernet\nsig = 1500\n"
        "[tcp:request]\nlabel = s:!:NMap:SYN scan\nsys = @unix,@win\nsig = *:64-:0:1460:1024,0:mss::0\n"
        "[tcp:response]\nlabel = s:unix:Linux:3.x\nsig = *:64:0:*:mss*10,0:mss:df:0\n"
        "[http:request]\nua_os = Linux,Windows\nsig = *:Host,User-Agent:Accept:\n"
    )
    sigs = load_signatures(text)
    assert len(sigs) == 1
    label = sigs.signatures[0].label
    assert (label.cls, label.name, label.family, label.sys) == ("!", "NMap", "other", ("@unix", "@win"))


@pytest.mark.parametrize("name, flavor, family", [
    pytest.param("Windows", "7 or 8", "windows", id="Windows is windows"),
    pytest.param("Linux", "3.11 and newer", "linux", id="Linux is linux"),
    pytest.param("Linux", "(Android)", "android", id="Linux flavoured Android is android"),
    pytest.param("Mac OS X", "10.x", "macos", id="Mac OS X is macos"),
    pytest.param("MacOS X", "10.9 or newer (sometimes iPhone or iPad)", "macos", id="MacOS X is macos even if it mentions the iPhone"),
    pytest.param("iOS", "iPhone or iPad", "ios", id="iOS is ios"),
    pytest.param("FreeBSD", "9.x", "freebsd", id="FreeBSD is freebsd"),
    pytest.param("OpenBSD", "5.x", "openbsd", id="OpenBSD is openbsd"),
    pytest.param("Solaris", "10", "other", id="Solaris is other"),
])
def test_label_names_map_to_families_by_table(name: str, flavor: str, family: str) -> None:
    assert family_of(name, flavor) == family


def test_window_notations_match_like_p0f() -> None:
    sigs = load_signatures(
        "[tcp:request]\n"
        "label = s:unix:ModFamily:1\nsig = *:64:0:*:%1000,0:mss::0\n"
        "label = s:unix:MtuFamily:1\nsig = *:64:0:*:mtu*2,0:mss::0\n"
    )
    plain = dict(layout=["mss"], df=False, ip_id=77)
    assert classify(build_syn(window=3000, **plain), sigs).os_name == "ModFamily 1"  # type: ignore[arg-type]
    assert classify(build_syn(window=3001, **plain), sigs).os_match == "none"  # type: ignore[arg-type]
    assert classify(build_syn(window=3000, mss=1460, **plain), sigs).os_match == "exact"  # type: ignore[arg-type]
    mtu = classify(build_syn(window=2 * (1412 + 40), mss=1412, **plain), sigs)  # type: ignore[arg-type]
    assert mtu.os_name == "MtuFamily 1"
    assert classify(build_syn(window=3001, mss=1412, **plain), sigs).os_match == "none"  # type: ignore[arg-type]


def test_exact_beats_fuzzy_beats_generic_and_file_order_breaks_ties() -> None:
    sigs = load_signatures(
        "[tcp:request]\n"
        "label = g:unix:Generic:1\nsig = *:64:0:*:*,*:mss:df,id+:0\n"
        "label = s:unix:First:1\nsig = *:64:0:*:1024,0:mss:df,id+:0\n"
        "label = s:unix:Second:1\nsig = *:64:0:*:1024,0:mss:df,id+:0\n"
        "label = s:unix:OnlyDf:1\nsig = *:64:0:*:2048,0:mss:df,id+:0\n"
    )
    assert classify(build_syn(window=1024, layout=["mss"]), sigs).os_name == "First 1"
    fuzzy = classify(build_syn(window=2048, layout=["mss"], df=False), sigs)
    assert (fuzzy.os_name, fuzzy.os_match) == ("OnlyDf 1", "fuzzy")
    generic = classify(build_syn(window=4096, layout=["mss"]), sigs)
    assert (generic.os_name, generic.os_match) == ("Generic 1", "generic")


def test_random_ttl_signatures_match_any_lower_ttl_without_fuzz() -> None:
    sigs = load_signatures("[tcp:request]\nlabel = s:!:NMap:SYN scan\nsig = *:64-:0:1460:1024,0:mss::0\n")
    fact = classify(build_syn(ttl=41, window=1024, layout=["mss"], df=False, ip_id=3), sigs)
    assert (fact.os, fact.os_match, fact.os_name) == ("other", "exact", "NMap SYN scan")


def test_every_shipped_label_maps_to_a_known_family_and_covers_the_brief() -> None:
    families = {s.label.family for s in SHIPPED.signatures}
    assert families <= set(FAMILIES)
    assert {"windows", "linux", "android", "macos", "ios", "freebsd", "openbsd"} <= families
    names = {s.label.display for s in SHIPPED.signatures if s.label.family == "windows"}
    assert any("XP" in n for n in names) and any("7" in n for n in names)
    assert any("10/11" in n for n in names) and any("Server" in n for n in names)


def test_core_syn_imports_only_the_allowed_stdlib() -> None:
    allowed = {"__future__", "dataclasses", "enum", "typing", "re", "ipaddress", "bisect", "struct",
               "math", "collections", "functools", "itertools", "hashlib", "json", "array", "string"}
    tree = ast.parse(Path(syn_module.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        for name in names:
            assert name.split(".")[0] in allowed or name.startswith("smtpguard.core"), name


# --------------------------------------------------------------------------
# Against p0f's own database
# --------------------------------------------------------------------------

P0F_CASES = [
    pytest.param(dict(ttl=121, window=8192, layout=WINDOWS_OPTS, ws=2), "windows", "exact", "Windows 7 or 8",
                 id="p0f names Windows 7 (8192, shift 2) windows 7 or 8"),
    pytest.param(dict(ttl=128, window=65535, layout=WINDOWS_XP_OPTS), "windows", "exact", "Windows XP",
                 id="p0f names Windows XP (65535, no scaling) windows XP"),
    pytest.param(dict(ttl=116, window=64240, layout=WINDOWS_OPTS, ws=8), "windows", "generic", "Windows NT kernel",
                 id="p0f knows Windows 10 only as a generic NT kernel"),
    pytest.param(dict(ttl=55, window=14600, layout=LINUX_OPTS, ws=7), "linux", "exact", "Linux 3.1-3.10",
                 id="p0f names Linux 3.0 (10 segments) linux 3.1-3.10"),
    pytest.param(dict(ttl=55, window=64240, layout=LINUX_OPTS, ws=7), "linux", "generic", "Linux 2.2.x-3.x",
                 id="p0f knows Linux 4.19+ only generically"),
    pytest.param(dict(version=6, ttl=55, window=64800, mss=1440, layout=LINUX_OPTS, ws=7, flow=0x1234),
                 "linux", "generic", "Linux", id="p0f matches Linux over IPv6 with a flow label generically"),
    pytest.param(dict(ttl=60, window=64240, layout=LINUX_OPTS, ws=1), "android", "exact", "Linux (Android)",
                 id="p0f's Linux (Android) label is the android family"),
    pytest.param(dict(ttl=60, window=65535, layout=APPLE_OPTS, ws=4), "macos", "exact", "MacOS X 10.9",
                 id="p0f names OS X 10.9 (shift 4) macos"),
    pytest.param(dict(ttl=60, window=65535, layout=APPLE_OPTS, ws=2), "ios", "exact", "iOS",
                 id="p0f names shift 2 Apple SYNs ios"),
    pytest.param(dict(ttl=60, window=65535, layout=FREEBSD_OPTS, ws=6), "freebsd", "exact", "FreeBSD 9",
                 id="p0f names FreeBSD 9+ freebsd"),
    pytest.param(dict(ttl=60, window=16384, layout=OPENBSD_OPTS, ws=3), "openbsd", "exact", "OpenBSD 4",
                 id="p0f names OpenBSD 4-5 openbsd"),
    pytest.param(dict(ttl=128, window=65495, mss=65495, layout=LINUX_OPTS, ws=7), "unknown", "none", "unknown",
                 id="p0f has nothing for a Linux SYN sent with TTL 128 either"),
]


@needs_p0f
@pytest.mark.parametrize("spec, family, quality, name", P0F_CASES)
def test_p0f_database_classifies_the_same_syns(spec: dict[str, object], family: str, quality: str,
                                               name: str) -> None:
    sigs = load_signatures(P0F_FP.read_text(encoding="utf-8", errors="replace"), source=str(P0F_FP))
    fact = classify(build_syn(**spec), sigs)  # type: ignore[arg-type]
    assert (fact.os, fact.os_match) == (family, quality), fact
    assert fact.os_name.startswith(name)


@needs_p0f
def test_p0f_database_loads_whole_and_maps_every_label() -> None:
    sigs = load_signatures(P0F_FP.read_text(encoding="utf-8", errors="replace"))
    assert len(sigs) >= 80
    assert {s.label.family for s in sigs.signatures} <= set(FAMILIES)
    assert MAX_DISTANCE == 35


# --------------------------------------------------------------------------
# Every shipped signature, one SYN each
# --------------------------------------------------------------------------

def _observed(sig: syn_module.Signature) -> str:
    """A concrete SYN that `sig` describes (5 hops away, Ethernet MSS)."""
    version = sig.version or 4
    ttl = sig.ittl if sig.random_ttl else sig.ittl - 5
    mss = sig.mss if sig.mss is not None else (1460 if version == 4 else 1440)
    if sig.mss is None and sig.win_kind == syn_module.WIN_MSS:
        mss = min(mss, 65535 // sig.win_value)     # 64 KB rounded down: mss*45 is an IPv6 or tunnel MSS
    wscale = 7 if sig.wscale is None else sig.wscale
    window = {syn_module.WIN_FIXED: sig.win_value, syn_module.WIN_MSS: sig.win_value * mss,
              syn_module.WIN_MTU: sig.win_value * (mss + 40), syn_module.WIN_MOD: sig.win_value * 3,
              syn_module.WIN_ANY: 12345}[sig.win_kind]
    layout = ",".join(f"eol+{sig.eol_pad}" if t == "eol" else t for t in sig.layout)
    quirks = [q for q in QUIRK_NAMES if sig.quirk_bits & syn_module.QUIRKS[q]
              and not (version == 4 and q == "flow") and not (version == 6 and q in ("df", "id+", "id-"))]
    return f"{version}:{ttl}:0:{mss}:{window},{wscale}:{layout}:{','.join(quirks)}:{sig.pclass or '0'}"


@pytest.mark.parametrize("sig", [pytest.param(s, id=f"line {s.line}: {s.label.text} {s.text}")
                                 for s in SHIPPED.signatures])
def test_every_shipped_signature_matches_its_own_syn_and_family(sig: syn_module.Signature) -> None:
    fact = classify(syn_module.synthesize(_observed(sig)), SHIPPED)
    assert fact.os == sig.label.family, (fact.os_name, fact.signature)
    if not sig.label.generic:
        assert fact.os_match == "exact", fact
