"""Loading country data: zone trees, malformed lines, the compiled cache,
.mmdb databases, the `country` fact, `[geo]` settings and `zones info`."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from pathlib import Path

import pytest

from smtpguard.adapters.zones import CACHE_NAME, GeoDB, default_cache_path, mmdb_country
from smtpguard.commands import zones as zones_command
from smtpguard.core.facts import NONE, OK, UNKNOWN
from smtpguard.errors import ConfigError
from smtpguard.sources.geo import GeoFact, GeoSettings, gather


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A zone tree with nested directories and both file-name forms."""
    root = tmp_path / "zones"
    write(root / "ipv4" / "us-aggregated.zone", "# United States\n192.0.2.0/24\n\n198.51.100.0/25\n")
    write(root / "ipv6" / "us-aggregated.zone", "2001:db8::/33\n")
    write(root / "deep" / "er" / "ca.zone", "198.51.100.128/25   # inline comment\n2001:db8:8000::/33\n")
    write(root / "mx.zone", "203.0.113.0/24\n10.9.0.0/16\n")        # lists a private range too
    write(root / ".hidden" / "de.zone", "100.0.0.0/8\n")             # skipped: hidden directory
    write(root / "README.txt", "not a zone file\n")                   # skipped: wrong suffix
    return root


def settings(*zones: Path, **kw: object) -> GeoSettings:
    return GeoSettings(zones=tuple(str(z) for z in zones), **kw)  # type: ignore[arg-type]


COUNTRY_CASES = [
    ("an IPv4 address from a nested directory", "192.0.2.10", "US"),
    ("an address from a deeper directory", "198.51.100.200", "CA"),
    ("an address from a top-level file", "203.0.113.1", "MX"),
    ("an IPv6 address in the first half", "2001:db8::1", "US"),
    ("an IPv6 address in the second half", "2001:db8:8000::1", "CA"),
    ("an IPv4-mapped IPv6 client", "::ffff:192.0.2.10", "US"),
    ("a private address a zone lists keeps that zone's country", "10.9.1.1", "MX"),
    ("a private address no zone lists is local", "10.1.1.1", "local"),
    ("IPv6 loopback is local", "::1", "local"),
    ("CGNAT space is local", "100.64.1.1", "local"),
    ("a hidden directory's zone is not loaded", "100.1.1.1", "unknown"),
    ("a public address listed nowhere is unknown", "8.8.8.8", "unknown"),
    ("text that is no address is unknown", "not-an-ip", "unknown"),
]


@pytest.mark.parametrize("ip,expected", [c[1:] for c in COUNTRY_CASES], ids=[c[0] for c in COUNTRY_CASES])
def test_country_from_a_zone_tree(tree: Path, ip: str, expected: str) -> None:
    db = GeoDB.open(settings(tree))
    assert db.country(ip) == expected


def test_load_statistics(tree: Path) -> None:
    stats = GeoDB.open(settings(tree)).stats
    assert stats.files == 4
    assert (stats.networks4, stats.networks6) == (5, 2)
    assert stats.countries == 3
    assert stats.warnings == ()
    assert stats.cache == "rebuilt"
    assert stats.cache_path == str(tree / CACHE_NAME)
    assert stats.seconds >= 0


def test_several_zone_directories_and_a_single_file(tree: Path, tmp_path: Path) -> None:
    extra = write(tmp_path / "own" / "de-partner.zone", "192.0.2.128/26\n")
    db = GeoDB.open(settings(tree, extra))
    assert db.country("192.0.2.130") == "DE"   # the more specific network wins
    assert db.country("192.0.2.10") == "US"


def test_the_same_network_in_two_files_goes_to_the_later_path(tmp_path: Path) -> None:
    write(tmp_path / "z" / "a" / "us.zone", "192.0.2.0/24\n")
    write(tmp_path / "z" / "b" / "ca.zone", "192.0.2.0/24\n")
    db = GeoDB.open(settings(tmp_path / "z"))
    assert db.country("192.0.2.1") == "CA"
    assert db.stats.conflicts == 1


def test_a_malformed_line_is_a_warning_with_file_and_line(tree: Path) -> None:
    bad = write(tree / "ipv4" / "us-aggregated.zone", "192.0.2.0/24\n# fine\n192.0.2.300/32\n198.51.100.0/25\n")
    db = GeoDB.open(settings(tree))
    assert db.stats.warnings == (f"{bad}:3: not an IPv4 or IPv6 network: '192.0.2.300/32'",)
    assert db.country("198.51.100.1") == "US"   # the rest of the file still loads


def test_a_byte_order_mark_and_crlf_line_ends_are_tolerated(tmp_path: Path) -> None:
    (tmp_path / "z").mkdir()
    (tmp_path / "z" / "it.zone").write_bytes(b"\xef\xbb\xbf192.0.2.0/24\r\n198.51.100.0/24\r\n")
    db = GeoDB.open(settings(tmp_path / "z"))
    assert db.stats.warnings == ()
    assert (db.country("192.0.2.1"), db.country("198.51.100.1")) == ("IT", "IT")
    assert db.countries == frozenset({"IT"})


def test_a_file_named_after_no_country_is_skipped_with_a_warning(tree: Path) -> None:
    write(tree / "blocklist.zone", "192.0.2.0/24\n")
    db = GeoDB.open(settings(tree))
    assert len(db.stats.warnings) == 1
    assert "blocklist.zone: the name does not start with a country code" in db.stats.warnings[0]
    assert db.country("192.0.2.1") == "US"


def test_a_flood_of_bad_lines_is_reported_ten_times_and_counted(tree: Path) -> None:
    write(tree / "fr.zone", "<html>\n" * 25)
    warnings = GeoDB.open(settings(tree)).stats.warnings
    assert len(warnings) == 11
    assert warnings[-1].endswith("15 more malformed lines not shown")


def test_strict_makes_a_malformed_line_fatal_naming_geo_zones(tree: Path) -> None:
    bad = write(tree / "mx.zone", "203.0.113.0/24\n203.0.113.5/24\n")
    with pytest.raises(ConfigError) as err:
        GeoDB.open(settings(tree, strict=True))
    assert err.value.key == "geo.zones"
    assert f"{bad}:2: host bits set" in err.value.message


def test_strict_also_fails_when_the_warnings_come_from_the_cache(tree: Path) -> None:
    write(tree / "mx.zone", "nonsense\n")
    assert GeoDB.open(settings(tree)).stats.cache == "rebuilt"
    with pytest.raises(ConfigError, match=r"mx\.zone:1"):
        GeoDB.open(settings(tree, strict=True))


def test_a_missing_zones_directory_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        GeoDB.open(settings(tmp_path / "nowhere"))
    assert err.value.key == "geo.zones" and "no such directory" in err.value.message


# -- the compiled cache -------------------------------------------------------


def test_the_cache_is_reused_when_nothing_changed(tree: Path) -> None:
    first = GeoDB.open(settings(tree))
    second = GeoDB.open(settings(tree))
    assert (first.stats.cache, second.stats.cache) == ("rebuilt", "hit")
    assert second.stats.networks4 == first.stats.networks4
    assert [second.country(ip) for _, ip, _ in COUNTRY_CASES] == [e for _, _, e in COUNTRY_CASES]


def test_warnings_survive_a_cache_hit(tree: Path) -> None:
    write(tree / "mx.zone", "203.0.113.0/24\nbad line\n")
    first = GeoDB.open(settings(tree))
    second = GeoDB.open(settings(tree))
    assert second.stats.cache == "hit"
    assert second.stats.warnings == first.stats.warnings != ()


def _mutate(kind: str, tree: Path) -> None:
    us = tree / "ipv4" / "us-aggregated.zone"
    st = us.stat()
    if kind == "mtime":
        os.utime(us, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    elif kind == "content":
        # Same size, same mtime: only the content hash can tell.
        us.write_text(us.read_text().replace("192.0.2.0/24", "192.0.3.0/24"))
        os.utime(us, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert us.stat().st_size == st.st_size
    elif kind == "added":
        write(tree / "new" / "de.zone", "192.0.3.0/24\n")
    elif kind == "removed":
        (tree / "mx.zone").unlink()
    elif kind == "renamed":
        (tree / "mx.zone").rename(tree / "de.zone")


@pytest.mark.parametrize("kind", ["mtime", "content", "added", "removed", "renamed"], ids=[
    "a file's mtime changed",
    "a file's content changed with size and mtime kept",
    "a file was added",
    "a file was removed",
    "a file was renamed to another country",
])
def test_the_cache_is_rebuilt_when(kind: str, tree: Path) -> None:
    GeoDB.open(settings(tree))
    _mutate(kind, tree)
    db = GeoDB.open(settings(tree))
    assert db.stats.cache == "rebuilt"
    assert GeoDB.open(settings(tree)).stats.cache == "hit"
    if kind in ("content", "added"):
        assert db.country("192.0.3.1") == ("US" if kind == "content" else "DE")
    if kind == "removed":
        assert db.country("203.0.113.1") == "unknown"
    if kind == "renamed":
        assert db.country("203.0.113.1") == "DE"


def test_a_damaged_cache_is_rebuilt(tree: Path) -> None:
    GeoDB.open(settings(tree))
    cache = tree / CACHE_NAME
    data = bytearray(cache.read_bytes())
    data[-1] ^= 0xFF
    cache.write_bytes(bytes(data))
    db = GeoDB.open(settings(tree))
    assert db.stats.cache == "rebuilt"
    assert db.country("192.0.2.1") == "US"
    assert GeoDB.open(settings(tree)).stats.cache == "hit"


def test_an_empty_cache_file_is_rebuilt(tree: Path) -> None:
    (tree / CACHE_NAME).write_bytes(b"")
    assert GeoDB.open(settings(tree)).stats.cache == "rebuilt"


def test_a_configured_cache_path_is_used(tree: Path, tmp_path: Path) -> None:
    cache = tmp_path / "var" / "geo.cache"
    db = GeoDB.open(settings(tree, cache=str(cache)))
    assert db.stats.cache_path == str(cache) and cache.exists()
    assert not (tree / CACHE_NAME).exists()
    assert GeoDB.open(settings(tree, cache=str(cache))).stats.cache == "hit"


def test_an_unwritable_cache_is_a_warning_not_a_failure(tree: Path, tmp_path: Path) -> None:
    blocker = write(tmp_path / "a-file", "x")
    db = GeoDB.open(settings(tree, cache=str(blocker / "geo.cache")))
    assert db.stats.cache == "rebuilt, not saved"
    assert db.country("192.0.2.1") == "US"


def test_the_default_cache_falls_back_to_the_user_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    # A zone path whose directory does not exist cannot hold the cache; the
    # same branch serves a read-only directory (untestable as root).
    path = default_cache_path([str(tmp_path / "missing" / "us.zone")])
    assert path.startswith(str(tmp_path / "xdg" / "smtpguard" / "geo-")) and path.endswith(".cache")
    assert default_cache_path([str(tmp_path)]) == str(tmp_path / CACHE_NAME)


def _open_in_child(zones: str, queue: "multiprocessing.Queue[object]") -> None:
    try:
        db = GeoDB.open(GeoSettings(zones=(zones,)))
        queue.put((db.stats.cache, db.country("192.0.2.1"), db.country("2001:db8:8000::1")))
    except BaseException as exc:  # report, do not hang the parent
        queue.put(repr(exc))


def test_several_processes_building_at_once_share_one_valid_cache(tree: Path) -> None:
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    queue: multiprocessing.Queue[object] = ctx.Queue()
    procs = [ctx.Process(target=_open_in_child, args=(str(tree), queue)) for _ in range(4)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=30) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert all(isinstance(r, tuple) and r[1:] == ("US", "CA") for r in results), results
    assert GeoDB.open(settings(tree)).stats.cache == "hit"
    assert not [n for n in os.listdir(tree) if n.startswith(".tmp-")]


# -- mmdb ---------------------------------------------------------------------


@pytest.fixture
def mmdb_file(tmp_path: Path) -> Path:
    """A tiny GeoLite2-Country-shaped database, written by mmdb-writer."""
    writer_mod = pytest.importorskip("mmdb_writer")
    netaddr = pytest.importorskip("netaddr")
    pytest.importorskip("maxminddb")
    writer = writer_mod.MMDBWriter(ip_version=6, ipv4_compatible=True, database_type="GeoLite2-Country")
    writer.insert_network(netaddr.IPSet(["192.0.2.0/24"]), {"country": {"iso_code": "JP"}})
    writer.insert_network(netaddr.IPSet(["198.51.100.0/24"]), {"registered_country": {"iso_code": "SE"}})
    writer.insert_network(netaddr.IPSet(["203.0.113.0/24"]), {"continent": {"code": "EU"}})
    writer.insert_network(netaddr.IPSet(["2001:db8::/32"]), {"country": {"iso_code": "NL"}})
    path = tmp_path / "country.mmdb"
    writer.to_db_file(str(path))
    return path


MMDB_CASES = [
    ("a country from country.iso_code", "192.0.2.200", "JP"),
    ("a country from registered_country when country is absent", "198.51.100.1", "SE"),
    ("a record without a country is unknown", "203.0.113.1", "unknown"),
    ("an IPv6 address", "2001:db8::1", "NL"),
    ("an IPv4-mapped client", "::ffff:192.0.2.200", "JP"),
    ("local space the database lacks is local", "192.168.0.1", "local"),
    ("an address in neither source is unknown", "8.8.8.8", "unknown"),
]


@pytest.mark.parametrize("ip,expected", [c[1:] for c in MMDB_CASES], ids=[c[0] for c in MMDB_CASES])
def test_country_from_an_mmdb(mmdb_file: Path, ip: str, expected: str) -> None:
    db = GeoDB.open(GeoSettings(mmdb=str(mmdb_file)))
    assert db.country(ip) == expected
    db.close()


def test_zones_win_over_the_mmdb_and_the_mmdb_fills_the_gaps(mmdb_file: Path, tmp_path: Path) -> None:
    write(tmp_path / "z" / "us.zone", "192.0.2.0/25\n")
    db = GeoDB.open(GeoSettings(zones=(str(tmp_path / "z"),), mmdb=str(mmdb_file)))
    assert db.country("192.0.2.1") == "US"
    assert db.country("192.0.2.200") == "JP"
    assert db.stats.mmdb == str(mmdb_file) and db.stats.mmdb_type == "GeoLite2-Country"
    db.close()


def test_an_ipv4_only_mmdb_answers_unknown_for_ipv6(tmp_path: Path) -> None:
    writer_mod = pytest.importorskip("mmdb_writer")
    netaddr = pytest.importorskip("netaddr")
    pytest.importorskip("maxminddb")
    writer = writer_mod.MMDBWriter(ip_version=4, database_type="DBIP-Country-Lite")
    writer.insert_network(netaddr.IPSet(["192.0.2.0/24"]), {"country": {"iso_code": "JP"}})
    writer.to_db_file(str(tmp_path / "v4.mmdb"))
    db = GeoDB.open(GeoSettings(mmdb=str(tmp_path / "v4.mmdb")))
    assert db.country("192.0.2.1") == "JP"
    assert db.country("2001:db8::1") == "unknown"


@pytest.mark.parametrize("content", [None, b"not a database"], ids=[
    "a missing .mmdb file", "a file that is no MaxMind database"])
def test_a_bad_mmdb_is_a_config_error_naming_geo_mmdb(tmp_path: Path, content: bytes | None) -> None:
    pytest.importorskip("maxminddb")
    path = tmp_path / "x.mmdb"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        GeoDB.open(GeoSettings(mmdb=str(path)))
    assert err.value.key == "geo.mmdb" and str(path) in err.value.message


def test_a_missing_maxminddb_package_is_a_clear_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "maxminddb", None)   # makes `import maxminddb` fail
    with pytest.raises(ConfigError) as err:
        GeoDB.open(GeoSettings(mmdb=str(tmp_path / "x.mmdb")))
    assert err.value.key == "geo.mmdb" and "maxminddb package" in err.value.message


@pytest.mark.parametrize("record,expected", [
    ({"country": {"iso_code": "DE"}, "registered_country": {"iso_code": "FR"}}, "DE"),
    ({"registered_country": {"iso_code": "fr"}}, "FR"),
    ({"country_code": "IT"}, "IT"),
    ({"country": "ES"}, "ES"),
    ({"country": {"iso_code": "ZZ"}}, None),
    ({"city": {"names": {"en": "Paris"}}}, None),
    ("not a mapping", None),
], ids=["GeoLite2 country wins over registered_country", "registered_country alone, lower case",
        "a flat country_code", "a flat country string", "an invalid code is ignored",
        "a record with no country", "a record that is no mapping"])
def test_mmdb_country_extraction(record: object, expected: str | None) -> None:
    assert mmdb_country(record) == expected


# -- the fact -----------------------------------------------------------------

FACT_CASES = [
    ("a listed address is OK with its code", "192.0.2.1", GeoFact("US", OK)),
    ("a local address is OK with local", "127.0.0.1", GeoFact("local", OK)),
    ("an address listed nowhere is NONE", "8.8.8.8", GeoFact("unknown", NONE)),
    ("an unreadable address is UNKNOWN", "bogus", GeoFact("unknown", UNKNOWN)),
]


@pytest.mark.parametrize("ip,expected", [c[1:] for c in FACT_CASES], ids=[c[0] for c in FACT_CASES])
def test_gather(tree: Path, ip: str, expected: GeoFact) -> None:
    fact = gather(ip, GeoDB.open(settings(tree)))
    assert fact == expected
    assert fact.as_facts() == {"country": expected.country}


def test_gather_without_country_data_is_unknown() -> None:
    assert gather("192.0.2.1", None) == GeoFact("unknown", UNKNOWN)


# -- settings -----------------------------------------------------------------


def test_settings_defaults() -> None:
    s = GeoSettings.from_mapping({}, "geo")
    assert s == GeoSettings()
    assert (s.unknown, s.strict, s.enabled) == ("deny", False, False)


def test_settings_read_and_normalise() -> None:
    s = GeoSettings.from_mapping({"zones": "/z", "allow": ["us", "Ca", "US", "local"], "unknown": "Allow",
                                  "strict": True, "cache": "/c", "mmdb": "/m.mmdb"}, "geo")
    assert s.zones == ("/z",) and s.allow == ("US", "CA", "local") and s.unknown == "allow"
    assert (s.strict, s.cache, s.mmdb, s.enabled) == (True, "/c", "/m.mmdb", True)
    assert GeoSettings.from_mapping({"zones": ["/a", "/b"], "deny": ["ru"]}, "geo").deny == ("RU",)


BAD_SETTINGS = [
    ("an invalid allow code", {"zones": "/z", "allow": ["US", "XX"]}, "geo.allow",
     '"XX" is not an ISO 3166-1 alpha-2 country code'),
    ("a three-letter deny code", {"zones": "/z", "deny": ["USA"]}, "geo.deny",
     '"USA" is not an ISO 3166-1 alpha-2 country code'),
    ("allow and deny together", {"zones": "/z", "allow": ["US"], "deny": ["RU"]}, "geo.allow", "not both"),
    ("a bad unknown action", {"unknown": "maybe"}, "geo.unknown", 'use "deny" or "allow"'),
    ("strict as a string", {"strict": "yes"}, "geo.strict", "not true or false"),
    ("zones as a number", {"zones": 5}, "geo.zones", "not a directory"),
    ("an allow list without country data", {"allow": ["US"]}, "geo.allow", "needs country data"),
    ("an unknown key", {"countries": ["US"]}, "geo.countries", "unknown setting"),
]


@pytest.mark.parametrize("table,key,message", [c[1:] for c in BAD_SETTINGS], ids=[c[0] for c in BAD_SETTINGS])
def test_settings_refuse(table: dict[str, object], key: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        GeoSettings.from_mapping(table, "geo")
    assert err.value.key == key
    assert message in err.value.message


# -- `smtpguard zones info` ---------------------------------------------------


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="smtpguard")
    zones_command.add_parser(parser.add_subparsers())
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_zones_info_prints_statistics_and_lookups(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["zones", "info", "--zones", str(tree), "--lookup", "192.0.2.1", "--lookup", "10.0.0.1"]) == 0
    out = capsys.readouterr().out
    assert "networks:    7 (5 IPv4, 2 IPv6)" in out
    assert "countries:   3" in out
    assert "cache:       rebuilt" in out
    assert "192.0.2.1: US" in out and "10.0.0.1: local" in out
    assert _run(["zones", "info", "--zones", str(tree)]) == 0
    assert "cache:       hit" in capsys.readouterr().out


def test_zones_info_strict_names_the_flag_and_the_line(tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(tree / "mx.zone", "nonsense\n")
    assert _run(["zones", "info", "--zones", str(tree), "--strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("--zones: ") and "mx.zone:1:" in err[0]


def test_zones_info_without_data_names_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert _run(["zones", "info"]) == 2
    assert capsys.readouterr().err.startswith("--zones: ")
