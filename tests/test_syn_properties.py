"""core/fingerprint.py under arbitrary bytes: never an exception, unknown out.

A SYN comes from the network; whatever the kernel hands us (or a PROXY'd
peer, or a fuzzer) must give a fact, never a traceback in a session.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings, strategies as st

from smtpguard.core.fingerprint import FAMILIES, QUIRK_NAMES, UNKNOWN_OS, classify, load_signatures, parse_syn
from tests.test_syn import (
    APPLE_OPTS,
    FREEBSD_OPTS,
    OPENBSD_OPTS,
    SHIPPED,
    WINDOWS_OPTS,
    build_syn,
)

VALID_SYNS = [
    build_syn(ttl=116, window=64240, layout=WINDOWS_OPTS, ws=8),
    build_syn(ttl=52, window=64240, ws=7),
    build_syn(version=6, ttl=60, window=64800, mss=1440, flow=0x12345),
    build_syn(ttl=53, window=65535, layout=APPLE_OPTS, ws=6),
    build_syn(ttl=56, window=65535, layout=FREEBSD_OPTS, ws=6),
    build_syn(ttl=47, window=16384, layout=OPENBSD_OPTS, ws=6),
]

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LAYOUT_TOKENS = {"mss", "nop", "ws", "sok", "sack", "ts", "eol"}


def _check_fact(data: bytes) -> None:
    fact = classify(data, SHIPPED)
    assert fact.os in FAMILIES
    assert fact.os_match in ("exact", "fuzzy", "generic", "none", "unknown")
    if parse_syn(data) is None:
        assert fact == UNKNOWN_OS
    else:
        assert fact.fields is not None
        assert all(t in LAYOUT_TOKENS or t.startswith("?") for t in fact.fields.layout)
        assert set(fact.fields.quirks) <= set(QUIRK_NAMES)


@FAST
@given(st.binary(max_size=512))
def test_random_bytes_never_raise_and_give_a_known_family(data: bytes) -> None:
    _check_fact(data)


@FAST
@given(st.sampled_from(VALID_SYNS), st.data())
def test_every_truncated_syn_is_unknown(syn: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(min_value=0, max_value=len(syn) - 1))
    assert classify(syn[:cut], SHIPPED) == UNKNOWN_OS


@FAST
@given(st.sampled_from(VALID_SYNS), st.lists(st.tuples(st.integers(0, 511), st.integers(0, 255)), max_size=6))
def test_corrupted_syns_never_raise(syn: bytes, flips: list[tuple[int, int]]) -> None:
    mutated = bytearray(syn)
    for where, value in flips:
        mutated[where % len(mutated)] = value
    _check_fact(bytes(mutated))


@FAST
@given(st.sampled_from(VALID_SYNS), st.binary(min_size=0, max_size=40))
def test_arbitrary_tcp_options_never_raise(syn: bytes, options: bytes) -> None:
    ip_len = 40 if syn[0] >> 4 == 6 else 20
    options = options + b"\x00" * (-len(options) % 4)
    tcp = bytearray(syn[ip_len:ip_len + 20])
    tcp[12] = ((20 + len(options)) // 4) << 4
    ip = bytearray(syn[:ip_len])
    if ip_len == 20:
        ip[2:4] = (20 + 20 + len(options)).to_bytes(2, "big")
    else:
        ip[4:6] = (20 + len(options)).to_bytes(2, "big")
    data = bytes(ip) + bytes(tcp) + options
    fields = parse_syn(data)
    assert fields is not None               # the headers are sound: only options vary
    _check_fact(data)


@FAST
@given(st.text(max_size=400))
def test_signature_text_either_loads_or_names_a_line(text: str) -> None:
    try:
        load_signatures("[tcp:request]\n" + text)
    except ValueError as exc:
        assert str(exc).startswith("line ")


_P0F = "/etc/p0f/p0f.fp"


def _p0f_sigs() -> object:
    import os
    if not os.path.exists(_P0F):
        return None
    with open(_P0F, encoding="utf-8", errors="replace") as f:
        return load_signatures(f.read())


P0F_SIGS = _p0f_sigs()
_OPTION = st.sampled_from(["mss", "nop", "ws", "sok", "ts", "sack"])


@FAST
@given(st.sampled_from([4, 6]), st.integers(1, 255), st.integers(0, 65535), st.integers(0, 65535),
       st.integers(0, 255), st.lists(_OPTION, max_size=8),
       st.sets(st.sampled_from(["df", "id+", "id-", "ecn", "flow", "ts1-", "ts2+", "0+", "pushf+", "uptr+"])))
def test_any_well_formed_syn_gives_a_fact_with_either_signature_set(
        version: int, ttl: int, mss: int, window: int, scale: int, layout: list[str], quirks: set[str]) -> None:
    text = ",".join(layout)
    size = sum({"mss": 4, "nop": 1, "ws": 3, "sok": 2, "ts": 10, "sack": 2}[t] for t in layout)
    if size % 4:
        text = ",".join(layout + ["nop"] * (-size % 4))
    from smtpguard.core.fingerprint import synthesize
    try:
        data = synthesize(f"{version}:{ttl}:0:{mss}:{window},{scale}:{text}:{','.join(sorted(quirks))}:0")
    except ValueError:
        return      # more than 40 option bytes: not a SYN a stack can send
    _check_fact(data)
    if P0F_SIGS is not None:
        fact = classify(data, P0F_SIGS)  # type: ignore[arg-type]
        assert fact.os in FAMILIES
