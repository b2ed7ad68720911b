"""Loading country data: zone files (with a compiled cache) and .mmdb files.

Decides:
    nothing about policy: it turns the configured country data into a GeoDB
    whose `country(ip)` answers an ISO code, "local" or "unknown".
Inputs:
    settings with `zones` (directories or files; every `*.zone` file below a
    directory at any depth, hidden files and directories skipped), `mmdb`
    (a MaxMind-format country database), `strict` and `cache`. A zone file's
    country is its name up to the first `.` or `-` (`us.zone`,
    `us-aggregated.zone`); each line holds an IPv4 or IPv6 network, `#`
    starts a comment, blank lines are ignored.
Output:
    `GeoDB.open(settings) -> GeoDB` (sync: called at start and on reload,
    never inside a session); `GeoDB.country(ip) -> str`; `GeoDB.stats`
    (networks, ranges, countries, seconds, warnings, cache hit or rebuilt).
Failure modes:
    a malformed line, or a file named after no country, is a warning naming
    file:line (the file is skipped for a bad name) and the rest still loads;
    with `strict` it is a ConfigError naming `geo.zones`. A missing zones
    path, an unreadable .mmdb or a missing `maxminddb` package is a
    ConfigError naming the key. A damaged or stale compiled cache is rebuilt;
    a cache that cannot be written is a warning, never a failure.
Defaults and why:
    * Compiled cache: `<first zones directory>/.smtpguard-geo.cache`, or
      `$XDG_CACHE_HOME/smtpguard/` (`~/.cache/smtpguard/`) when that
      directory is not writable, or the `cache` setting. Its key is a SHA-256
      over each file's path, size, mtime and content hash (reading and
      hashing the text costs a small part of a rebuild, and catches a file
      rewritten within one mtime tick). Written atomically (temp file, fsync,
      rename, fsync of the directory), so worker processes and
      `smtpguard check` share it: the worst a race costs is a second rebuild.
      It is mapped read-only and used in place, so workers share its pages.
    * Zones win over mmdb when both are configured: the zone files are the
      admin's own, explicit data (an override file can correct a database);
      the mmdb answers only for addresses no zone lists.
    * At most MAX_WARNINGS_PER_FILE malformed lines are reported one by one
      per file; the rest are counted (an HTML page saved as a zone would
      otherwise flood the log).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import mmap
import os
import re
import socket
import stat
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol, Sequence

from smtpguard.core.geo import (
    LOCAL,
    UNKNOWN,
    CacheFormatError,
    RangeTable,
    classify_local,
    deserialise,
    is_country_code,
    parse_address,
    parse_network,
    serialise,
)
from smtpguard.errors import ConfigError

log = logging.getLogger("smtpguard.geo")


class GeoLookupError(Exception):
    """The .mmdb could not be read for one lookup (damaged after start)."""

ZONE_SUFFIX = ".zone"
CACHE_NAME = ".smtpguard-geo.cache"
# Bump when the loader reads files differently (what is a comment, how the
# country is named): caches built by older loaders are then rebuilt.
LOADER_VERSION = 1
# Per-file cap on itemised warnings (see the module docstring).
MAX_WARNINGS_PER_FILE = 10
# Issue 19 item 11: networks no country can hold are malformed lines. IPv4
# shorter than /4 (a sixteenth of the space: even the US's adjacent legacy
# /8s, 16.0.0.0-23.255.255.255, aggregate to a /5 at most) and IPv6 shorter
# than /12 (the block IANA allocates to a whole RIR, e.g. 2600::/12 to
# ARIN). So 0.0.0.0/0 and ::/0 never put the whole Internet in a country.
MIN_PREFIX = {4: 4, 6: 12}
# A zone file is a few hundred KB (all of ipdeny's IPv4 and IPv6 zones
# together are under 10 MB): anything over 64 MiB is not one, and is not
# read into memory.
MAX_ZONE_FILE_BYTES = 64 << 20

_COUNTRY_FROM_NAME = re.compile(r"[^.-]*")


class GeoSourceSettings(Protocol):
    """What GeoDB.open reads from the `[geo]` settings."""

    @property
    def zones(self) -> tuple[str, ...]: ...

    @property
    def mmdb(self) -> str: ...

    @property
    def strict(self) -> bool: ...

    @property
    def cache(self) -> str: ...


@dataclass(frozen=True, slots=True)
class LoadStats:
    """What loading cost and found; printed by `smtpguard zones info`."""

    files: int = 0
    networks4: int = 0          # lines read (networks listed)
    networks6: int = 0
    ranges4: int = 0            # after nesting and merging
    ranges6: int = 0
    countries: int = 0
    conflicts: int = 0          # the same network under two countries
    seconds: float = 0.0
    cache: str = "off"          # hit | rebuilt | off (no zones)
    cache_path: str = ""
    warnings: tuple[str, ...] = ()
    mmdb: str = ""
    mmdb_type: str = ""
    mmdb_built: int = 0         # the database's build epoch

    def lines(self) -> list[str]:
        """Human-readable summary, one fact a line."""
        out = [
            f"zone files:  {self.files}",
            f"networks:    {self.networks4 + self.networks6}"
            f" ({self.networks4} IPv4, {self.networks6} IPv6)",
            f"ranges:      {self.ranges4 + self.ranges6}"
            f" ({self.ranges4} IPv4, {self.ranges6} IPv6, after nesting and merging)",
            f"countries:   {self.countries}",
            f"load time:   {self.seconds:.3f} s",
            f"cache:       {self.cache}" + (f" ({self.cache_path})" if self.cache_path else ""),
        ]
        if self.conflicts:
            out.append(f"conflicts:   {self.conflicts} networks listed under two countries"
                       " (the file loaded last wins)")
        if self.mmdb:
            built = time.strftime("%Y-%m-%d", time.gmtime(self.mmdb_built)) if self.mmdb_built else "?"
            out.append(f"mmdb:        {self.mmdb} ({self.mmdb_type}, built {built})")
        out.append(f"warnings:    {len(self.warnings)}")
        out.extend(f"  {w}" for w in self.warnings)
        return out


@dataclass(frozen=True, slots=True)
class ZoneFile:
    path: str          # absolute, as found
    country: str       # the code from the name, upper-case ("" if not one)
    size: int
    mtime_ns: int


# ---------------------------------------------------------------------------
# Finding and reading zone files


def find_zone_files(roots: Sequence[str], key: str = "geo.zones") -> list[ZoneFile]:
    """Every `*.zone` file below `roots` (files may be named directly), sorted
    by path, each once. ConfigError(key) for a root that does not exist."""
    found: dict[str, ZoneFile] = {}
    for root in roots:
        if os.path.isfile(root):
            candidates: Iterable[str] = [root]
        elif os.path.isdir(root):
            candidates = _walk(root)
        else:
            raise ConfigError(key, f"{root}: no such directory or file")
        for path in candidates:
            real = os.path.realpath(path)
            if real in found:
                continue
            try:
                st = os.stat(real)
            except OSError as exc:
                raise ConfigError(key, f"{path}: {exc.strerror}") from None
            # A symlink to /dev/zero or a FIFO would be read forever or
            # block (issue 19 item 11): zone files are regular files.
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(key, f"{path}: not a regular file ({_file_kind(st.st_mode)})")
            if st.st_size > MAX_ZONE_FILE_BYTES:
                raise ConfigError(key, f"{path}: {st.st_size} bytes; a zone file is at most "
                                       f"{MAX_ZONE_FILE_BYTES >> 20} MiB")
            name = os.path.basename(path)
            cc = _COUNTRY_FROM_NAME.match(name)
            code = cc.group(0) if cc else ""
            found[real] = ZoneFile(os.path.abspath(path), code.upper() if is_country_code(code) else "",
                                   st.st_size, st.st_mtime_ns)
    return sorted(found.values(), key=lambda z: z.path)


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a directory")):
        if test(mode):
            return kind
    return "not a file"


def _walk(root: str) -> Iterable[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        # Hidden directories hold editors' and tools' leftovers (and the
        # downloader's temporary sets); symlinked directories are not followed
        # (os.walk's default) so a link loop cannot hang the loader.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith(ZONE_SUFFIX) and not name.startswith("."):
                yield os.path.join(dirpath, name)


def parse_zone_text(text: str, where: str, family: int | None = None,
                    limit: int = MAX_WARNINGS_PER_FILE) -> tuple[list[tuple[int, int, int]], list[str]]:
    """(version, first, last) of every network in a zone file's text, and the
    warnings (`where:line: why`). `family` 4 or 6 refuses the other family."""
    nets: list[tuple[int, int, int]] = []
    warnings: list[str] = []
    bad = 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            net = parse_network(line, _pton_plain)
            if family is not None and net[0] != family:
                raise ValueError(f"an IPv{net[0]} network in an IPv{family} list: {line[:80]!r}")
            bits = 32 if net[0] == 4 else 128
            if net[2] - net[1] >= 1 << (bits - MIN_PREFIX[net[0]]):
                raise ValueError(f"{line[:80]!r} is larger than any country holds (at most an "
                                 f"IPv{net[0]} /{MIN_PREFIX[net[0]]})")
        except ValueError as exc:
            bad += 1
            if bad <= limit:
                warnings.append(f"{where}:{number}: {exc}")
            continue
        nets.append(net)
    if bad > limit:
        warnings.append(f"{where}: {bad - limit} more malformed lines not shown")
    return nets, warnings


def _read(files: Sequence[ZoneFile]) -> tuple[list[bytes], bytes]:
    """Each file's bytes and the cache key over all of them."""
    key = hashlib.sha256(f"smtpguard-geo loader {LOADER_VERSION}\n".encode())
    contents: list[bytes] = []
    for zf in files:
        try:
            # O_NONBLOCK: a file swapped for a FIFO since it was found must
            # not hang the loader; the read is bounded as the size check is.
            fd = os.open(zf.path, os.O_RDONLY | os.O_NONBLOCK)
            with os.fdopen(fd, "rb") as fh:
                if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
                    raise ConfigError("geo.zones", f"{zf.path}: not a regular file")
                data = fh.read(MAX_ZONE_FILE_BYTES + 1)
        except OSError as exc:
            raise ConfigError("geo.zones", f"{zf.path}: {exc.strerror}") from None
        if len(data) > MAX_ZONE_FILE_BYTES:
            raise ConfigError("geo.zones", f"{zf.path}: over {MAX_ZONE_FILE_BYTES >> 20} MiB")
        contents.append(data)
        key.update(f"{zf.path}\0{zf.size}\0{zf.mtime_ns}\0".encode())
        key.update(hashlib.sha256(data).digest())
    return contents, key.digest()


# ---------------------------------------------------------------------------
# Atomic files


def write_atomic(path: str, data: bytes, mode: int = 0o644) -> None:
    """Write `path` so that readers see the old file or the new one, whole."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), mode)
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(directory)


def fsync_dir(directory: str) -> None:
    """Make a rename in `directory` durable (POSIX: fsync the directory)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_cache_path(roots: Sequence[str]) -> str:
    """Beside the first zones directory if writable, else the user's cache dir."""
    first = os.path.abspath(roots[0])
    directory = first if os.path.isdir(first) else os.path.dirname(first)
    if os.access(directory, os.W_OK | os.X_OK):
        return os.path.join(directory, CACHE_NAME)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    tag = hashlib.sha256("\0".join(os.path.abspath(r) for r in roots).encode()).hexdigest()[:16]
    return os.path.join(base, "smtpguard", f"geo-{tag}.cache")


def _map_cache(path: str) -> memoryview | None:
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if size == 0:
                return None
            # The map outlives the file object; readers of a replaced cache
            # keep the old inode, so a concurrent rebuild cannot tear it.
            return memoryview(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("geo.cache.unreadable path=%s error=%s", path, exc)
        return None


# ---------------------------------------------------------------------------
# mmdb


# Where the country code sits in the records of the common databases, tried
# in order: GeoLite2/GeoIP2-Country and DB-IP Lite use country.iso_code;
# registered_country covers networks with no located country (satellite,
# anycast); some third-party files use a flat country_code or country.
MMDB_COUNTRY_PATHS: tuple[tuple[str, ...], ...] = (
    ("country", "iso_code"),
    ("registered_country", "iso_code"),
    ("country_code",),
    ("country",),
)


def mmdb_country(record: Any) -> str | None:
    """The country code in one .mmdb record, or None."""
    for path in MMDB_COUNTRY_PATHS:
        value = record
        for part in path:
            if not isinstance(value, dict):
                value = None
                break
            value = value.get(part)
        if isinstance(value, str) and is_country_code(value):
            return value.upper()
    return None


def _open_mmdb(path: str) -> Any:
    try:
        import maxminddb
    except ImportError:
        raise ConfigError("geo.mmdb", "reading .mmdb files needs the maxminddb package"
                          " (pip install 'smtpguard[mmdb]'), or use geo.zones") from None
    try:
        if os.path.exists(path) and not stat.S_ISREG(os.stat(path).st_mode):
            raise ConfigError("geo.mmdb", f"{path}: not a regular file ({_file_kind(os.stat(path).st_mode)})")
        reader = maxminddb.open_database(path, maxminddb.MODE_AUTO)
    except FileNotFoundError:
        raise ConfigError("geo.mmdb", f"{path}: no such file") from None
    except (OSError, ValueError, maxminddb.InvalidDatabaseError) as exc:
        raise ConfigError("geo.mmdb", f"{path}: not a readable MaxMind database ({exc})") from None
    # The metadata at the end can be intact over a damaged search tree (issue
    # 19 item 8): look up one address of each family the database holds.
    try:
        for probe in ("192.0.2.1", "2001:db8::1") if reader.metadata().ip_version == 6 else ("192.0.2.1",):
            reader.get(probe)
    except (maxminddb.InvalidDatabaseError, ValueError, OSError, UnicodeError) as exc:
        reader.close()
        raise ConfigError("geo.mmdb", f"{path}: damaged MaxMind database ({exc})") from None
    return reader


# ---------------------------------------------------------------------------
# The database


def _fast_address(ip: str) -> tuple[int, int]:
    """(version, int) of an address; inet_pton is ~10x quicker than ipaddress."""
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")
    except OSError:
        pass
    try:
        value = int.from_bytes(socket.inet_pton(socket.AF_INET6, ip), "big")
    except OSError:
        return parse_address(ip)  # scoped (fe80::1%eth0) and the like; ValueError if none
    if value >> 32 == 0xFFFF:
        return 4, value & 0xFFFFFFFF
    return 6, value


def _pton_plain(text: str) -> tuple[int, int]:
    """(version, int) of an address as written, for parse_network: inet_pton
    is strict (no leading zeros, four IPv4 parts, no scope)."""
    try:
        return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except OSError:
        pass
    try:
        return 6, int.from_bytes(socket.inet_pton(socket.AF_INET6, text), "big")
    except OSError:
        raise ValueError(text) from None


def _v4_text(value: int) -> str:
    return socket.inet_ntop(socket.AF_INET, value.to_bytes(4, "big"))


@dataclass(frozen=True, slots=True)
class GeoDB:
    """The loaded country data; immutable, so a reload builds a new one."""

    table: RangeTable
    stats: LoadStats
    reader: Any = None                  # maxminddb.Reader, or None
    _keep: Any = field(default=None, repr=False)  # the cache's mmap, kept alive

    @classmethod
    def open(cls, settings: GeoSourceSettings,
             clock: Callable[[], float] = time.perf_counter) -> GeoDB:
        """Load zones (through the compiled cache) and the .mmdb, if any."""
        started = clock()
        table = RangeTable.from_bounds(())
        stats = LoadStats()
        keep: Any = None
        if settings.zones:
            table, stats, keep = _load_zones(settings)
        reader = None
        if settings.mmdb:
            reader = _open_mmdb(settings.mmdb)
            meta = reader.metadata()
            stats = _replace(stats, mmdb=settings.mmdb, mmdb_type=str(meta.database_type),
                             mmdb_built=int(meta.build_epoch))
        stats = _replace(stats, seconds=clock() - started)
        log.info("geo.load files=%d networks=%d ranges=%d countries=%d cache=%s warnings=%d"
                 " mmdb=%s seconds=%.3f", stats.files, stats.networks4 + stats.networks6,
                 stats.ranges4 + stats.ranges6, stats.countries, stats.cache,
                 len(stats.warnings), stats.mmdb or "-", stats.seconds)
        return cls(table=table, stats=stats, reader=reader, _keep=keep)

    def country(self, ip: str) -> str:
        """ISO code, "local" (local and listed nowhere) or "unknown".
        GeoLookupError when the .mmdb cannot be read (damaged since it was
        opened): the caller says `unknown` and logs it."""
        try:
            version, value = _fast_address(ip)
        except ValueError:
            return UNKNOWN
        found = self.table.lookup(value, version)
        if found is None and self.reader is not None:
            try:
                record = self.reader.get(_v4_text(value) if version == 4 else ip)
            except ValueError:   # an IPv6 address against an IPv4-only database
                record = None
            except Exception as exc:  # damaged after the start-up probe (sources/geo.py logs it)
                raise GeoLookupError(f"{self.stats.mmdb}: {type(exc).__name__}: {exc}"[:300]) from exc
            found = mmdb_country(record) if record is not None else None
        if found is not None:
            return found
        return LOCAL if classify_local(value, version) else UNKNOWN

    @property
    def countries(self) -> frozenset[str]:
        """The countries the zone files list (to warn about an allow-list
        naming a country with no data; an .mmdb's set is not enumerated)."""
        return frozenset(self.table.countries)

    def close(self) -> None:
        """Release the .mmdb file (the zone table needs nothing)."""
        if self.reader is not None:
            self.reader.close()


def _replace(stats: LoadStats, **changes: Any) -> LoadStats:
    return dataclasses.replace(stats, **changes)


def _load_zones(settings: GeoSourceSettings) -> tuple[RangeTable, LoadStats, Any]:
    files = find_zone_files(settings.zones)
    contents, key = _read(files)
    cache_path = settings.cache or default_cache_path(settings.zones)

    view = _map_cache(cache_path)
    if view is not None:
        try:
            compiled = deserialise(view)
        except CacheFormatError as exc:
            log.warning("geo.cache.rebuild path=%s reason=%s", cache_path, exc)
        else:
            if compiled.key == key:
                warnings = tuple(str(w) for w in _as_list(compiled.meta.get("warnings")))
                _check_strict(settings, warnings)
                table = compiled.table
                stats = LoadStats(
                    files=len(files), networks4=table.networks4, networks6=table.networks6,
                    ranges4=table.ranges4, ranges6=table.ranges6,
                    countries=len(table.countries), conflicts=table.conflicts,
                    cache="hit", cache_path=cache_path, warnings=warnings,
                )
                for w in warnings:
                    log.warning("geo.zone.malformed %s", w)
                return table, stats, view.obj

    # Rebuild from the very bytes the key was computed over.
    warnings_list: list[str] = []
    bounds: list[tuple[int, int, int, str]] = []
    for zf, data in zip(files, contents):
        if not zf.country:
            warnings_list.append(f"{zf.path}: the name does not start with a country code"
                                 " (like us.zone or us-aggregated.zone); file skipped")
            continue
        # utf-8-sig: a byte-order mark some Windows editors write is not a line.
        nets, warns = parse_zone_text(data.decode("utf-8-sig", "replace"), zf.path)
        warnings_list.extend(warns)
        cc = zf.country
        bounds.extend((v, a, b, cc) for v, a, b in nets)
    warnings = tuple(warnings_list)
    for w in warnings:
        log.warning("geo.zone.malformed %s", w)
    _check_strict(settings, warnings)
    table = RangeTable.from_bounds(bounds)
    del bounds
    cache_state = "rebuilt"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        write_atomic(cache_path, serialise(table, key, {"warnings": list(warnings)}))
    except OSError as exc:
        cache_state = "rebuilt, not saved"
        log.warning("geo.cache.unwritable path=%s error=%s", cache_path, exc)
    stats = LoadStats(
        files=len(files), networks4=table.networks4, networks6=table.networks6,
        ranges4=table.ranges4, ranges6=table.ranges6, countries=len(table.countries),
        conflicts=table.conflicts, cache=cache_state, cache_path=cache_path, warnings=warnings,
    )
    return table, stats, None


def _as_list(value: object) -> list[object]:
    return list(value) if isinstance(value, list) else []


def _check_strict(settings: GeoSourceSettings, warnings: Sequence[str]) -> None:
    if settings.strict and warnings:
        more = f" (and {len(warnings) - 1} more)" if len(warnings) > 1 else ""
        raise ConfigError("geo.zones", f"{warnings[0]}{more}; geo.strict refuses malformed zone data")
