"""Downloading country zone files and replacing the set atomically.

Decides:
    whether a freshly downloaded set of zone files is whole and valid, and
    only then puts it in place of the old set.
Inputs:
    the destination directory, the countries, two URL templates (IPv4 and
    IPv6, `{cc}` standing for the lower-case country code, as ipdeny names
    its files) and a timeout.
Output:
    `update_zones(...) -> UpdateResult` (files, networks, bytes, seconds).
    DEST then holds `ipv4/<cc>-aggregated.zone` and `ipv6/<cc>-aggregated.zone`.
Failure modes:
    any HTTP error, a timeout, an empty body, an HTML page, a body over
    MAX_BYTES or a single line that is not a network of the right family
    fails the whole update with ZoneUpdateError (one line: the URL and why);
    the old set is then left exactly as it was, and the partial download is
    removed. A second update of the same DEST while one runs fails at once
    (a lock file beside DEST).
Defaults and why:
    * ipdeny.com's aggregated lists: free, per country, IPv4 and IPv6, one
      CIDR a line, refreshed daily; the format the loader reads natively.
    * timeout 30 s: the longest the whole update may take, every file, the
      connections, the TLS handshakes and the headers included (issue 19
      item 11: a server trickling its headers byte by byte kept a 3 s
      update waiting 90 s). A watchdog shuts the socket at the deadline,
      whatever http.client is waiting for. ipdeny's largest list is well
      under 1 MB and a dozen countries take a few seconds.
    * MAX_BYTES 32 MiB per file: far above any real country list, low enough
      that a misbehaving server cannot fill the disk.
    * DEST belongs to the downloader: the whole directory is replaced, so an
      admin's own zone files belong in another directory (geo.zones takes a
      list). Files are fetched one after another, to be gentle with a free
      service.
    * The swap is two renames (old set away, new set in) and a directory
      fsync; between them DEST is missing for microseconds. A loader that
      hits that instant fails its (re)load and keeps its old table.
"""

from __future__ import annotations

import contextlib
import fcntl
import http.client
import os
import shutil
import socket
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from smtpguard import __version__
from smtpguard.adapters.zones import ZONE_SUFFIX, fsync_dir, parse_zone_text
from smtpguard.core.geo import is_country_code

DEFAULT_IPV4_URL = "https://www.ipdeny.com/ipblocks/data/aggregated/{cc}-aggregated.zone"
DEFAULT_IPV6_URL = "https://www.ipdeny.com/ipv6/ipaddresses/aggregated/{cc}-aggregated.zone"
DEFAULT_TIMEOUT = 30.0          # seconds; see the module docstring
MAX_BYTES = 32 * 1024 * 1024    # per file; see the module docstring
_CHUNK = 64 * 1024

# (family, sub-directory) of the set, in download order.
FAMILIES: tuple[tuple[int, str], ...] = ((4, "ipv4"), (6, "ipv6"))


class ZoneUpdateError(Exception):
    """The update failed; str() is one line saying why. DEST is untouched."""


@dataclass(frozen=True, slots=True)
class UpdateResult:
    dest: str
    countries: tuple[str, ...]
    files: int
    networks4: int
    networks6: int
    bytes: int
    seconds: float

    def line(self) -> str:
        return (f"zones updated: {self.dest}: {len(self.countries)} countries, {self.files} files,"
                f" {self.networks4} IPv4 + {self.networks6} IPv6 networks,"
                f" {self.bytes / 1024:.0f} KiB in {self.seconds:.1f} s")


def url_for(template: str, cc: str) -> str:
    """The URL of one country's list: `{cc}` (lower case) or `{CC}` replaced;
    a template without either is a directory URL and gets ipdeny's name."""
    if "{cc}" in template or "{CC}" in template:
        return template.replace("{cc}", cc.lower()).replace("{CC}", cc.upper())
    return template.rstrip("/") + f"/{cc.lower()}-aggregated.zone"


class _Watchdog:
    """Shuts every socket a fetch opened when its deadline passes, so that no
    wait inside http.client (connect, TLS handshake, a header line arriving
    a byte at a time) outlives the deadline."""

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, seconds), self._fire)
        self._timer.daemon = True

    def track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._socks.append(sock)
            if self.expired:
                self._shut(sock)
        return sock

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def _fire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._socks:
                self._shut(sock)

    def __enter__(self) -> "_Watchdog":
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def opener(self) -> urllib.request.OpenerDirector:
        """urllib with connections whose sockets this watchdog tracks."""
        watchdog = self

        def tracked(*args: object, **kwargs: object) -> socket.socket:
            return watchdog.track(socket.create_connection(*args, **kwargs))  # type: ignore[arg-type]

        class Http(http.client.HTTPConnection):
            def __init__(self, *args: object, **kwargs: object) -> None:
                super().__init__(*args, **kwargs)  # type: ignore[arg-type,call-overload]
                self._create_connection = tracked

        class Https(http.client.HTTPSConnection):
            def __init__(self, *args: object, **kwargs: object) -> None:
                super().__init__(*args, **kwargs)  # type: ignore[arg-type,call-overload]
                self._create_connection = tracked

        class HttpHandler(urllib.request.HTTPHandler):
            def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
                return self.do_open(Http, req)

        class HttpsHandler(urllib.request.HTTPSHandler):
            def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
                return self.do_open(Https, req, context=self._context)  # type: ignore[attr-defined]

        return urllib.request.build_opener(HttpHandler, HttpsHandler)


def fetch(url: str, timeout: float, max_bytes: int = MAX_BYTES,
          clock: Callable[[], float] = time.monotonic, deadline: float | None = None) -> bytes:
    """The body of `url`; ZoneUpdateError on an HTTP error, a timeout (every
    wait and the whole fetch bounded by `timeout`, and by `deadline` on
    `clock` when given), an HTML page or a body over `max_bytes`."""
    own = clock() + timeout
    deadline = own if deadline is None else min(own, deadline)
    remaining = deadline - clock()
    if remaining <= 0:
        raise ZoneUpdateError(f"{url}: timed out after {timeout:g} s")
    with _Watchdog(remaining) as watchdog:
        try:
            body = _fetch(url, timeout, max_bytes, clock, deadline, watchdog)
        except ZoneUpdateError:
            if watchdog.expired:
                raise ZoneUpdateError(f"{url}: timed out after {timeout:g} s") from None
            raise
        if watchdog.expired:   # a shut socket reads as the end of the body: not a whole file
            raise ZoneUpdateError(f"{url}: timed out after {timeout:g} s")
        return body


def _fetch(url: str, timeout: float, max_bytes: int, clock: Callable[[], float], deadline: float,
           watchdog: _Watchdog) -> bytes:
    request = urllib.request.Request(url, headers={
        "User-Agent": f"smtpguard/{__version__} (zones update)",
        "Accept": "text/plain",
    })
    try:
        with watchdog.opener().open(request, timeout=max(0.001, deadline - clock())) as resp:
            if resp.headers.get_content_type() == "text/html":
                raise ZoneUpdateError(f"{url}: the server sent an HTML page, not a zone file")
            chunks: list[bytes] = []
            total = 0
            while True:
                if clock() > deadline:
                    raise ZoneUpdateError(f"{url}: timed out after {timeout:g} s")
                # read1: return after one receive, so the deadline is checked
                # while a server trickles (read() would wait for a full chunk).
                chunk = resp.read1(_CHUNK)
                if not chunk:
                    break
                total += len(chunk)
                if total > max_bytes:
                    raise ZoneUpdateError(f"{url}: larger than {max_bytes} bytes; not a country list")
                chunks.append(chunk)
            expected = resp.headers.get("Content-Length")
            if expected is not None and expected.isdigit() and int(expected) != total:
                raise ZoneUpdateError(f"{url}: the connection closed after {total} of {expected} bytes")
    except urllib.error.HTTPError as exc:
        raise ZoneUpdateError(f"{url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, TimeoutError):
            raise ZoneUpdateError(f"{url}: timed out after {timeout:g} s") from None
        raise ZoneUpdateError(f"{url}: {reason}") from None
    except TimeoutError:
        raise ZoneUpdateError(f"{url}: timed out after {timeout:g} s") from None
    except (OSError, http.client.HTTPException) as exc:   # reset mid-body, a shut socket
        raise ZoneUpdateError(f"{url}: {exc or type(exc).__name__}") from None
    return b"".join(chunks)


def validate_zone(body: bytes, url: str, family: int) -> int:
    """The number of networks in a downloaded list; ZoneUpdateError unless
    every line is a network of `family` and there is at least one."""
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:
        raise ZoneUpdateError(f"{url}: not a zone file (non-ASCII bytes)") from None
    head = text.lstrip()[:200].lower()
    if head.startswith("<") or "<html" in head:
        raise ZoneUpdateError(f"{url}: the server sent an HTML page, not a zone file")
    nets, warnings = parse_zone_text(text, url, family, limit=1)
    if warnings:
        raise ZoneUpdateError(warnings[0])
    if not nets:
        raise ZoneUpdateError(f"{url}: empty list (no networks)")
    return len(nets)


def existing_countries(dest: str) -> tuple[str, ...]:
    """The countries a set in `dest` already has (from its file names)."""
    found: set[str] = set()
    if os.path.isdir(dest):
        for _dirpath, _dirs, files in os.walk(dest):
            for name in files:
                if name.endswith(ZONE_SUFFIX) and not name.startswith("."):
                    cc = name.split(".", 1)[0].split("-", 1)[0]
                    if is_country_code(cc):
                        found.add(cc.upper())
    return tuple(sorted(found))


@contextlib.contextmanager
def _locked(dest: str) -> Iterator[None]:
    parent, base = os.path.split(dest)
    path = os.path.join(parent, f".{base}.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ZoneUpdateError(f"{dest}: another zones update is running") from None
        yield
    finally:
        os.close(fd)


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def update_zones(
    dest: str,
    countries: Sequence[str],
    ipv4_url: str = DEFAULT_IPV4_URL,
    ipv6_url: str | None = DEFAULT_IPV6_URL,
    timeout: float = DEFAULT_TIMEOUT,
    clock: Callable[[], float] = time.monotonic,
) -> UpdateResult:
    """Download every list, validate it, then swap the new set in for DEST.

    `ipv6_url=None` fetches IPv4 lists only. ZoneUpdateError on any failure,
    with DEST as it was.
    """
    started = clock()
    dest = os.path.abspath(dest)
    parent, base = os.path.split(dest)
    codes = tuple(sorted({c.upper() for c in countries}))
    if not codes:
        raise ZoneUpdateError("no countries to download")
    for code in codes:
        if not is_country_code(code):
            raise ZoneUpdateError(f'"{code}" is not an ISO 3166-1 alpha-2 country code')
    if not os.path.isdir(parent):
        raise ZoneUpdateError(f"{parent}: no such directory")
    if os.path.exists(dest) and not os.path.isdir(dest):
        raise ZoneUpdateError(f"{dest}: exists and is not a directory")

    try:
        return _update(dest, parent, base, codes, ipv4_url, ipv6_url, timeout, clock, started)
    except OSError as exc:   # disk full, permissions: still one line, DEST as it was
        raise ZoneUpdateError(f"{dest}: {exc.strerror or exc}") from None


def _update(dest: str, parent: str, base: str, codes: tuple[str, ...], ipv4_url: str,
            ipv6_url: str | None, timeout: float, clock: Callable[[], float],
            started: float) -> UpdateResult:
    with _locked(dest):
        _sweep_leftovers(dest, parent, base)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{base}.new-")
        try:
            counts = {4: 0, 6: 0}
            files = size = 0
            for family, sub in FAMILIES:
                template = ipv4_url if family == 4 else ipv6_url
                if template is None:
                    continue
                os.mkdir(os.path.join(tmp, sub))
                for code in codes:
                    url = url_for(template, code)
                    body = fetch(url, timeout, clock=clock, deadline=started + timeout)
                    counts[family] += validate_zone(body, url, family)
                    _write_file(os.path.join(tmp, sub, f"{code.lower()}-aggregated{ZONE_SUFFIX}"), body)
                    files += 1
                    size += len(body)
                fsync_dir(os.path.join(tmp, sub))
            os.chmod(tmp, 0o755)   # mkdtemp makes 0700; the server may run as another user
            fsync_dir(tmp)
            _swap(tmp, dest, parent, base)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return UpdateResult(dest=dest, countries=codes, files=files, networks4=counts[4],
                        networks6=counts[6], bytes=size, seconds=clock() - started)


def _swap(new: str, dest: str, parent: str, base: str) -> None:
    """Old set away, new set in, old set removed; on a failed second rename
    the old set is put back."""
    if not os.path.exists(dest):
        os.rename(new, dest)
        fsync_dir(parent)
        return
    old = tempfile.mkdtemp(dir=parent, prefix=f".{base}.old-")
    os.rmdir(old)   # only the unique name is wanted: rename needs it free
    os.rename(dest, old)
    try:
        os.rename(new, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


def _sweep_leftovers(dest: str, parent: str, base: str) -> None:
    """Clean up after an update that was killed (we hold the lock): a set
    moved away but not replaced goes back to DEST; partial sets go."""
    olds = sorted((os.path.join(parent, n) for n in os.listdir(parent)
                   if n.startswith(f".{base}.old-")), key=os.path.getmtime)
    if olds and not os.path.exists(dest):
        os.rename(olds.pop(), dest)
        fsync_dir(parent)
    for path in olds:
        shutil.rmtree(path, ignore_errors=True)
    for name in os.listdir(parent):
        if name.startswith(f".{base}.new-"):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
