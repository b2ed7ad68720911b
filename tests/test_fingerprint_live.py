"""sources/fingerprint.py on real loopback sockets: TCP_SAVE_SYN, gather(), the
optional p0f v3 API (adapters/p0f.py) against a small fake daemon, the settings table, and
`fingerprint --listen` end to end.

What a TTL-128 Linux loopback SYN gives is decided in core/fingerprint.py: a TTL above
a signature's initial TTL never matches and there is no TTL-only fallback,
so it is `os = "unknown"`, `os_match = "none"`, while the default TTL-64 SYN
is linux. The two are told apart, and the TTL-128 one is never "windows".
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from smtpguard.core.facts import NONE, OK, UNKNOWN, ClientInfo
from smtpguard.core.fingerprint import UNKNOWN_OS, classify, parse_syn
from smtpguard.errors import ConfigError
from smtpguard.adapters.p0f import P0F_QUERY, P0F_QUERY_MAGIC, P0F_RESPONSE, P0F_RESPONSE_MAGIC, p0f_query, query_p0f
from smtpguard.sources import fingerprint as fingerprint_source
from smtpguard.sources.fingerprint import (
    FingerprintSettings,
    default_signatures,
    enable_save_syn,
    gather,
    load_signature_file,
    read_saved_syn,
    signature_set,
)

REPO = Path(__file__).resolve().parent.parent
WAIT = 5.0   # bound on every socket wait in this file


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


HAS_IPV6 = _ipv6_loopback()
LOOPBACKS = [
    pytest.param((socket.AF_INET, "127.0.0.1"), id="over IPv4 loopback"),
    pytest.param((socket.AF_INET6, "::1"), id="over IPv6 loopback",
                 marks=pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback")),
]


@pytest.fixture
def listener(request: pytest.FixtureRequest) -> Iterator[socket.socket]:
    family, host = request.param
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(WAIT)
    if not enable_save_syn(sock):
        sock.close()
        pytest.skip("TCP_SAVE_SYN is not available on this kernel")
    sock.bind((host, 0))
    sock.listen(8)
    yield sock
    sock.close()


def _syn_from(listener: socket.socket, ttl: int | None = None) -> bytes | None:
    """Connect a client (optionally with IP_TTL / hop limit `ttl`) and return its saved SYN."""
    family = listener.family
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(WAIT)
        if ttl is not None:
            if family == socket.AF_INET:
                client.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
            else:
                client.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, ttl)
        client.connect(listener.getsockname()[:2])
        conn, _ = listener.accept()
        with conn:
            first = read_saved_syn(conn)
            again = read_saved_syn(conn)
            assert again is None, "the kernel hands the SYN out once"
            return first


both_loopbacks = pytest.mark.parametrize("listener", LOOPBACKS, indirect=True)


@both_loopbacks
def test_saved_syn_is_the_clients_ip_and_tcp_headers(listener: socket.socket) -> None:
    data = _syn_from(listener)
    assert data is not None
    fields = parse_syn(data)
    assert fields is not None
    assert fields.version == (4 if listener.family == socket.AF_INET else 6)
    assert fields.ttl == 64 and fields.distance == 0
    assert "mss" in fields.layout and fields.mss is not None and fields.mss > 60000


@both_loopbacks
def test_ttl_128_client_and_default_client_are_told_apart(listener: socket.socket) -> None:
    sigs = default_signatures()
    default = classify(_syn_from(listener), sigs)
    high = classify(_syn_from(listener, ttl=128), sigs)
    assert (default.os, default.os_match, default.status) == ("linux", "exact", OK)
    assert (high.os, high.os_match, high.status) == ("unknown", "none", NONE)
    assert high.fields is not None and high.fields.ttl == 128
    assert default.os != high.os


@pytest.mark.skipif(not Path("/etc/p0f/p0f.fp").exists(), reason="p0f.fp not installed")
@both_loopbacks
def test_p0f_database_also_tells_them_apart(listener: socket.socket) -> None:
    sigs = load_signature_file("/etc/p0f/p0f.fp")
    default = classify(_syn_from(listener), sigs)
    high = classify(_syn_from(listener, ttl=128), sigs)
    assert default.os == "linux" and default.os_match in ("exact", "fuzzy", "generic")
    assert (high.os, high.os_match) == ("unknown", "none")


def test_enable_save_syn_is_false_where_it_cannot_apply() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        assert enable_save_syn(udp) is False
    assert read_saved_syn(None) is None


def test_a_listener_without_save_syn_gives_no_syn() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as plain:
        plain.settimeout(WAIT)
        plain.bind(("127.0.0.1", 0))
        plain.listen(1)
        assert _syn_from(plain) is None


# --------------------------------------------------------------------------
# gather()
# --------------------------------------------------------------------------

@both_loopbacks
def test_gather_uses_the_syn_and_never_guesses_behind_a_proxy(listener: socket.socket) -> None:
    data = _syn_from(listener)
    settings = FingerprintSettings()
    sigs = default_signatures()
    direct = asyncio.run(gather(ClientInfo("s1", "127.0.0.1", 40000, syn=data), settings, sigs))
    proxied = asyncio.run(gather(ClientInfo("s2", "192.0.2.9", 40000, syn=data, via_proxy=True), settings, sigs))
    missing = asyncio.run(gather(ClientInfo("s3", "127.0.0.1", 40000), settings, sigs))
    assert direct.os == "linux" and direct.as_facts()["os_distance"] == 0
    assert proxied == UNKNOWN_OS and missing == UNKNOWN_OS
    assert missing.as_facts()["os"] == "unknown" and missing.status == UNKNOWN


# --------------------------------------------------------------------------
# p0f v3 API against a fake daemon on a unix socket
# --------------------------------------------------------------------------

def p0f_response(status: int = 0x10, name: str = "Windows", flavor: str = "7 or 8", distance: int = 11,
                 quality: int = 0, magic: int = P0F_RESPONSE_MAGIC) -> bytes:
    return P0F_RESPONSE.pack(magic, status, 1, 2, 3, 0, 0, 0, 0, distance, 0, quality,
                             name.encode(), flavor.encode(), b"", b"", b"Ethernet", b"")


class FakeP0f:
    """Answers each 21-byte query with a canned response (or stays silent)."""

    def __init__(self, response: bytes | None) -> None:
        self.response = response
        self.queries: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            self.queries.append(await reader.readexactly(P0F_QUERY.size))
            if self.response is None:
                await reader.read()            # silent until the client gives up
            else:
                writer.write(self.response)
                await writer.drain()
        finally:
            writer.close()


async def _ask(tmp_path: Path, response: bytes | None, ip: str, timeout: float = 1.0) -> tuple[Any, FakeP0f]:
    fake = FakeP0f(response)
    path = str(tmp_path / "p0f.sock")
    server = await asyncio.start_unix_server(fake.handle, path=path)
    async with server:
        fact = await query_p0f(path, ip, timeout)
    return fact, fake


P0F_CASES = [
    pytest.param(p0f_response(), "192.0.2.7", ("windows", "Windows 7 or 8", 11, "exact", OK),
                 id="a p0f answer for a Windows host is windows, exact"),
    pytest.param(p0f_response(name="Linux", flavor="3.x", quality=1, distance=4), "2001:db8::7",
                 ("linux", "Linux 3.x", 4, "fuzzy", OK), id="an IPv6 Linux host matched fuzzily is a fuzzy linux"),
    pytest.param(p0f_response(name="Mac OS X", flavor="", quality=2, distance=-1), "192.0.2.7",
                 ("macos", "Mac OS X", "unknown", "generic", OK),
                 id="a generic Mac OS X match without distance is macos with an unknown distance"),
    pytest.param(p0f_response(name="", flavor=""), "192.0.2.7", ("unknown", "unknown", 11, "none", NONE),
                 id="a host p0f saw but could not match is unknown, none"),
    pytest.param(p0f_response(status=0x20), "192.0.2.7", ("unknown", "unknown", "unknown", "unknown", UNKNOWN),
                 id="a host p0f never saw is unknown"),
    pytest.param(p0f_response(magic=0xDEADBEEF), "192.0.2.7", ("unknown", "unknown", "unknown", "unknown", UNKNOWN),
                 id="a response with a bad magic is unknown"),
    pytest.param(p0f_response()[:100], "192.0.2.7", ("unknown", "unknown", "unknown", "unknown", UNKNOWN),
                 id="a short response is unknown"),
]


@pytest.mark.parametrize("response, ip, expected", P0F_CASES)
def test_p0f_api_answers_become_facts(tmp_path: Path, response: bytes, ip: str,
                                      expected: tuple[object, ...]) -> None:
    fact, fake = asyncio.run(_ask(tmp_path, response, ip))
    facts = fact.as_facts()
    assert (facts["os"], facts["os_name"], facts["os_distance"], facts["os_match"], fact.status) == expected
    assert fake.queries == [p0f_query(ip)]


def test_p0f_query_layout_is_native_magic_type_and_left_aligned_address() -> None:
    magic, kind, addr = P0F_QUERY.unpack(p0f_query("192.0.2.7"))
    assert (magic, kind, addr) == (P0F_QUERY_MAGIC, 4, bytes([192, 0, 2, 7]) + b"\0" * 12)
    assert P0F_QUERY.unpack(p0f_query("::ffff:192.0.2.7")) == (P0F_QUERY_MAGIC, 4, addr)
    assert P0F_QUERY.unpack(p0f_query("2001:db8::1"))[1] == 6
    assert P0F_QUERY.size == 21 and P0F_RESPONSE.size == 232
    assert p0f_query("192.0.2.7")[:4] == struct.pack("=I", 0x50304601)


def test_a_silent_p0f_times_out_to_unknown(tmp_path: Path) -> None:
    started = time.monotonic()
    fact, _ = asyncio.run(_ask(tmp_path, None, "192.0.2.7", timeout=0.2))
    assert fact == UNKNOWN_OS
    assert time.monotonic() - started < 2.0


def test_an_absent_p0f_socket_is_unknown(tmp_path: Path) -> None:
    fact = asyncio.run(query_p0f(str(tmp_path / "nobody-home.sock"), "192.0.2.7", 0.5))
    assert fact == UNKNOWN_OS


def test_gather_asks_p0f_only_when_there_is_no_syn(tmp_path: Path) -> None:
    async def scenario() -> tuple[Any, Any, Any, FakeP0f]:
        fake = FakeP0f(p0f_response())
        path = str(tmp_path / "p0f.sock")
        server = await asyncio.start_unix_server(fake.handle, path=path)
        settings = FingerprintSettings(p0f_socket=path, p0f_timeout=1.0)
        sigs = default_signatures()
        async with server:
            no_syn = await gather(ClientInfo("a", "192.0.2.7", 1), settings, sigs)
            proxied = await gather(ClientInfo("b", "192.0.2.7", 1, via_proxy=True), settings, sigs)
            garbage_syn = await gather(ClientInfo("c", "192.0.2.7", 1, syn=b"\x45"), settings, sigs)
        return no_syn, proxied, garbage_syn, fake

    no_syn, proxied, garbage_syn, fake = asyncio.run(scenario())
    assert (no_syn.os, no_syn.source) == ("windows", "p0f")
    assert proxied == UNKNOWN_OS and garbage_syn == UNKNOWN_OS
    assert len(fake.queries) == 1


# --------------------------------------------------------------------------
# Settings and signature files
# --------------------------------------------------------------------------

def test_settings_defaults_are_the_shipped_set_and_no_daemon() -> None:
    settings = FingerprintSettings.from_mapping({})
    assert settings == FingerprintSettings(signatures="", p0f_socket="", p0f_timeout=0.5)
    assert signature_set(settings) is default_signatures()
    assert len(default_signatures()) > 40


def test_settings_read_every_key() -> None:
    settings = fingerprint_source.from_mapping({"signatures": "/etc/p0f/p0f.fp", "p0f_socket": "/run/p0f.sock",
                                  "p0f_timeout": 0.25})
    assert settings == FingerprintSettings("/etc/p0f/p0f.fp", "/run/p0f.sock", 0.25)
    assert fingerprint_source.from_mapping({"p0f_timeout": "2s"}).p0f_timeout == 2.0


@pytest.mark.parametrize("table, key, words", [
    pytest.param({"signature": "x"}, "fingerprint.signature", "unknown key", id="a misspelt key is named"),
    pytest.param({"signatures": 5}, "fingerprint.signatures", "string", id="a number as the signatures path"),
    pytest.param({"p0f_socket": ["a"]}, "fingerprint.p0f_socket", "string", id="a list as the p0f socket"),
    pytest.param({"p0f_timeout": "soon"}, "fingerprint.p0f_timeout", "duration", id="a timeout that is no duration"),
    pytest.param({"p0f_timeout": 0}, "fingerprint.p0f_timeout", "more than 0", id="a zero timeout"),
    pytest.param({"p0f_timeout": "1m"}, "fingerprint.p0f_timeout", "at most 10s", id="a one-minute timeout"),
])
def test_bad_settings_name_the_key(table: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        FingerprintSettings.from_mapping(table)
    assert info.value.key == key
    assert words in info.value.message


def test_bad_signature_files_are_config_errors_naming_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as missing:
        signature_set(FingerprintSettings(signatures=str(tmp_path / "absent.fp")))
    assert missing.value.key == "fingerprint.signatures" and "cannot read" in missing.value.message
    broken = tmp_path / "broken.fp"
    broken.write_text("[tcp:request]\nlabel = s:unix:X:1\nsig = *:64:0\n")
    with pytest.raises(ConfigError) as bad:
        signature_set(FingerprintSettings(signatures=str(broken)))
    assert "line 3" in bad.value.message
    empty = tmp_path / "empty.fp"
    empty.write_text("; nothing\n")
    with pytest.raises(ConfigError, match="no \\[tcp:request\\] signatures"):
        load_signature_file(empty)


# --------------------------------------------------------------------------
# `fingerprint --listen` end to end
# --------------------------------------------------------------------------

def _read_line(stream: Any, deadline: float) -> str:
    """One line from a subprocess pipe, waiting at most until `deadline`."""
    sel = selectors.DefaultSelector()
    sel.register(stream, selectors.EVENT_READ)
    buf = b""
    try:
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                raise AssertionError(f"no line before the deadline (got {buf!r})")
            chunk = os.read(stream.fileno(), 1)
            if not chunk:
                break
            buf += chunk
    finally:
        sel.close()
    return buf.decode()


@pytest.mark.parametrize("family, host, shown", [
    pytest.param(socket.AF_INET, "127.0.0.1", "127.0.0.1", id="the command fingerprints IPv4 clients"),
    pytest.param(socket.AF_INET6, "::1", "[::1]", id="the command fingerprints IPv6 clients",
                 marks=pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback")),
])
def test_fingerprint_listen_prints_one_json_line_per_client(family: int, host: str, shown: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "smtpguard.commands.fingerprint", "--listen", f"{shown}:0", "--count", "2"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 15
        announce = _read_line(proc.stderr, deadline)
        assert announce.startswith(f"listening on {shown}:"), announce
        port = int(announce.rsplit(":", 1)[1])
        lines = []
        for ttl in (None, 128):
            with socket.socket(family, socket.SOCK_STREAM) as client:
                client.settimeout(WAIT)
                if ttl is not None:
                    level, opt = ((socket.IPPROTO_IP, socket.IP_TTL) if family == socket.AF_INET
                                  else (socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS))
                    client.setsockopt(level, opt, ttl)
                client.connect((host, port))
                lines.append(json.loads(_read_line(proc.stdout, deadline)))
        assert proc.wait(timeout=max(0.1, deadline - time.monotonic())) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()   # type: ignore[union-attr]
        proc.stderr.close()   # type: ignore[union-attr]
    default, high = lines
    assert (default["os"], default["os_match"], default["client"]) == ("linux", "exact", host)
    assert default["fields"]["ttl"] == 64 and default["fields"]["signature"].startswith(("4:64+0", "6:64+0"))
    assert (high["os"], high["os_match"]) == ("unknown", "none")
    assert high["fields"]["ttl"] == 128
