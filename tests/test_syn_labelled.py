"""The labelled SYN sets (tests/data/syn_labelled.tsv), one test per row.

`tune` rows are what the shipped smtpguard.fp was written against; `eval`
rows were written before the signatures changed and are never tuned on
(bench/detection_eval.py prints the figures on them). Every row must give
the `os` its label says; the known misses are strict xfails, each with the
reason, so a change that fixes one is noticed as well as one that breaks a
row. Whatever else happens, no row that is not Windows may come out Windows:
the shipped policy refuses on it.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest

from smtpguard.core.syn import classify, synthesize
from smtpguard.sources.osfp import default_signatures

DATA = Path(__file__).parent / "data" / "syn_labelled.tsv"
SETS = ("tune", "eval")
FAMILIES = ("windows", "linux", "android", "macos", "ios", "freebsd", "openbsd", "other")

# (set, what) -> why the matcher cannot get it right.
KNOWN_MISSES: dict[tuple[str, str], str] = {
    ("eval", "Windows 10 behind a router that clears DF"):
        "deliberate: Windows signatures need DF, so that no TTL-128 device without DF is called Windows",
    ("eval", "Linux 6.18 with SO_RCVBUF 64 KB (scale 1)"):
        "an application's small receive buffer gives Android's scale of 1; the SYN is identical",
    ("eval", "Android 13 (kernel 5.15) on Wi-Fi"):
        "Android on a 4.19+ kernel sends mainline Linux's SYN",
    ("eval", "iPhone, iOS 17"): "iOS 14+ and macOS 11+ send the same SYN",
    ("eval", "Solaris 9 (Windows XP's option order, TTL 64)"): "no signature for this Solaris; unknown, not windows",
    ("eval", "AIX 4.3.3-5.2 (no DF)"): "no signature for old AIX without DF; unknown",
    ("eval", "IRIX 6.5 (initial TTL 60)"): "no signature for IRIX; unknown, not windows",
    ("eval", "NetBSD 3.0"): "no signature for NetBSD; unknown",
    ("eval", "Symbian 60xx phone"): "no signature for Symbian; unknown",
    # second round (P0F2X), evaluated once after the signatures were written
    ("eval", "Windows Server 2003 with initial TTL 64"): "no Windows signature at TTL 64 with scale 2",
    ("eval", "Windows XP behind WinRoute (no DF)"): "deliberate: Windows signatures need DF",
    ("eval", "Windows CE 3 (TTL 32, MSS only)"): "an MSS-only SYN is a generic other",
    ("eval", "iPhone OS 3.1.3 without window scaling"): "no signature for iPhone OS 3 without scaling",
    ("eval", "FreeBSD 7.0, MSS and SACK only"): "no signature for this FreeBSD 7 variant",
    ("eval", "FreeBSD 5.3-5.4"): "no signature for FreeBSD 5 (OpenBSD's option order)",
    ("eval", "OpenBSD 3.7"): "no OpenBSD signature with window 32768",
    ("eval", "Android 1.5 (Linux 2.6.27), MSS after TS"): "no signature for Android 1.5's option order",
    ("eval", "Maemo 5 (Nokia N900, Linux 2.6.28)"): "no signature for Maemo's option order",
    ("eval", "Juniper JUNOS 9.3"): "JUNOS writes Apple's option order: generic macos",
    ("eval", "PlayStation 3"): "no signature for the PS3",
    ("eval", "OS/400 V4R4"): "no signature for OS/400",
    ("eval", "QNX 6 (no DF, zero timestamp)"): "no signature for QNX",
    ("eval", "SCO UnixWare 7.1"): "no signature for UnixWare",
    ("eval", "Novell NetWare 6 (TTL 128)"): "no signature for NetWare 6",
    ("eval", "CacheFlow CacheOS 4.1 (no DF)"): "no signature for CacheOS",
    ("eval", "Inktomi crawler (TTL 255, MSS last)"): "no signature for the MSS-last layout at TTL 255",
    ("eval", "BeOS 5 (TTL 255)"): "no MSS,NOP,WS signature at TTL 255",
    ("eval", "RISC OS 4 (option 12)"): "no signature for RISC OS",
}


class Row(NamedTuple):
    set: str
    os: str
    syn: str
    what: str
    source: str

    def data(self) -> bytes:
        return bytes.fromhex(self.syn[4:]) if self.syn.startswith("hex:") else synthesize(self.syn)


def load() -> list[Row]:
    rows = []
    for line in DATA.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            rows.append(Row(*line.split("\t")))
    return rows


ROWS = load()
SIGS = default_signatures()


def _param(row: Row) -> object:
    reason = KNOWN_MISSES.get((row.set, row.what))
    marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
    return pytest.param(row, id=f"{row.set}: {row.what} is {row.os}", marks=marks)


def test_every_row_is_well_formed_with_its_provenance() -> None:
    assert len({(r.set, r.what) for r in ROWS}) == len(ROWS), "duplicate rows"
    for r in ROWS:
        assert r.set in SETS and r.os in FAMILIES, r
        assert r.source.split(":")[0] in ("CAP", "P0F3", "P0F2", "P0F2X", "PUB"), r
        assert len(r.data()) >= 40
    assert set(KNOWN_MISSES) <= {(r.set, r.what) for r in ROWS}


def test_both_sets_cover_every_family() -> None:
    for name in SETS:
        assert {r.os for r in ROWS if r.set == name} == set(FAMILIES), name
        assert sum(r.set == name for r in ROWS) >= 50


@pytest.mark.parametrize("row", [_param(r) for r in ROWS])
def test_labelled_syn(row: Row) -> None:
    fact = classify(row.data(), SIGS)
    assert fact.os == row.os, f"{fact.os} {fact.os_match} {fact.os_name!r} via {fact.signature!r}"


def test_nothing_that_is_not_windows_comes_out_windows() -> None:
    wrong = [r.what for r in ROWS if r.os != "windows" and classify(r.data(), SIGS).os == "windows"]
    assert wrong == []
