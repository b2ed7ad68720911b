"""`smtpguard zones update` against a real HTTP server on 127.0.0.1: a good
download replaces the set; every kind of failure leaves the old set as it
was and exits non-zero with one line."""

from __future__ import annotations

import argparse
import fcntl
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator, Union

import pytest

from smtpguard.adapters.zone_update import ZoneUpdateError, existing_countries, update_zones, url_for
from smtpguard.adapters.zones import GeoDB
from smtpguard.commands import zones as zones_command
from smtpguard.sources.geo import GeoSettings

GOOD = {
    "/v4/us-aggregated.zone": b"192.0.2.0/24\n198.51.100.0/25\n",
    "/v4/ca-aggregated.zone": b"198.51.100.128/25\n",
    "/v4/mx-aggregated.zone": b"203.0.113.0/24\n",
    "/v6/us-aggregated.zone": b"2001:db8::/33\n",
    "/v6/ca-aggregated.zone": b"2001:db8:8000::/34\n",
    "/v6/mx-aggregated.zone": b"2001:db8:c000::/34\n",
}

# A route is a body (200, text/plain), (status, content type, body), or one
# of the behaviours below.
Route = Union[bytes, tuple[int, str, bytes], str]
HANG_AFTER_HEADERS = "hang-after-headers"   # 200 + headers, then silence
HANG_BEFORE_HEADERS = "hang-before-headers"  # accepts the request, answers nothing
TRICKLE = "trickle"                          # a valid line every 50 ms, forever
CUT = "cut"                                  # promises 1000 bytes, sends 10, closes


class ZoneServer:
    def __init__(self) -> None:
        self.routes: dict[str, Route] = dict(GOOD)
        self.stop = threading.Event()
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server.requests.append(self.path)
                route = server.routes.get(self.path, (404, "text/html", b"<html>Not Found</html>"))
                if route == HANG_BEFORE_HEADERS:
                    server.stop.wait(10)
                    return
                if route == HANG_AFTER_HEADERS:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    self.wfile.flush()
                    server.stop.wait(10)
                    return
                if route == TRICKLE:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.end_headers()
                    for i in range(200):   # bounded: 10 s at most
                        if server.stop.wait(0.05):
                            return
                        try:
                            self.wfile.write(f"10.{i}.0.0/16\n".encode())
                            self.wfile.flush()
                        except OSError:
                            return
                    return
                if route == CUT:
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", "1000")
                    self.end_headers()
                    self.wfile.write(b"192.0.2.0/")
                    self.wfile.flush()
                    self.close_connection = True
                    return
                status, ctype, body = route if isinstance(route, tuple) else (200, "text/plain", route)
                assert isinstance(body, bytes)
                self.send_response(status)
                self.send_header("Content-Type", str(ctype))
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                       daemon=True)
        self.thread.start()

    @property
    def v4(self) -> str:
        return f"http://127.0.0.1:{self.port}/v4/{{cc}}-aggregated.zone"

    @property
    def v6(self) -> str:
        return f"http://127.0.0.1:{self.port}/v6/{{cc}}-aggregated.zone"

    def close(self) -> None:
        self.stop.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server() -> Iterator[ZoneServer]:
    srv = ZoneServer()
    try:
        yield srv
    finally:
        srv.close()


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file below root by relative path, with its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return [n for n in os.listdir(parent) if ".new-" in n or ".old-" in n]


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="smtpguard")
    zones_command.add_parser(parser.add_subparsers())
    args = parser.parse_args(["zones", "update", *argv])
    return int(args.func(args))


@pytest.fixture
def old_set(tmp_path: Path) -> Path:
    """DEST with a set from an earlier update (DE) and its compiled cache."""
    dest = tmp_path / "zones"
    (dest / "ipv4").mkdir(parents=True)
    (dest / "ipv4" / "de-aggregated.zone").write_bytes(b"100.0.0.0/8\n")
    GeoDB.open(GeoSettings(zones=(str(dest),)))
    return dest


# -- success ------------------------------------------------------------------


def test_a_good_download_replaces_the_set(server: ZoneServer, old_set: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    code = run(["--dest", str(old_set), "--countries", "us,CA,mx",
                "--base-url", server.v4, "--ipv6-base-url", server.v6, "--timeout", "5s"])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "3 countries, 6 files, 4 IPv4 + 3 IPv6 networks" in out[0]
    assert snapshot(old_set) == {
        f"ipv{v}/{cc}-aggregated.zone": GOOD[f"/v{v}/{cc}-aggregated.zone"]
        for v in (4, 6) for cc in ("ca", "mx", "us")
    }
    assert leftovers(old_set.parent) == []
    db = GeoDB.open(GeoSettings(zones=(str(old_set),)))
    assert (db.country("192.0.2.1"), db.country("2001:db8:c000::1"), db.country("100.1.1.1")) == (
        "US", "MX", "unknown")
    assert db.stats.cache == "rebuilt"


def test_the_first_download_creates_dest(server: ZoneServer, tmp_path: Path) -> None:
    dest = tmp_path / "new-zones"
    result = update_zones(str(dest), ["us"], server.v4, server.v6, timeout=5)
    assert sorted(snapshot(dest)) == ["ipv4/us-aggregated.zone", "ipv6/us-aggregated.zone"]
    assert (result.files, result.networks4, result.networks6) == (2, 2, 1)
    assert oct(dest.stat().st_mode & 0o777) == "0o755"


def test_without_countries_the_update_refreshes_the_countries_in_dest(server: ZoneServer, tmp_path: Path) -> None:
    dest = tmp_path / "zones"
    update_zones(str(dest), ["ca", "mx"], server.v4, server.v6, timeout=5)
    assert existing_countries(str(dest)) == ("CA", "MX")
    server.requests.clear()
    assert run(["--dest", str(dest), "--base-url", server.v4, "--ipv6-base-url", server.v6]) == 0
    assert sorted(server.requests) == sorted(
        f"/v{v}/{cc}-aggregated.zone" for v in (4, 6) for cc in ("ca", "mx"))


def test_no_ipv6_fetches_ipv4_lists_only(server: ZoneServer, tmp_path: Path) -> None:
    dest = tmp_path / "zones"
    assert run(["--dest", str(dest), "--countries", "us", "--base-url", server.v4, "--no-ipv6"]) == 0
    assert list(snapshot(dest)) == ["ipv4/us-aggregated.zone"]


def test_a_leftover_of_a_killed_update_is_put_back_before_anything_else(server: ZoneServer, old_set: Path) -> None:
    before = snapshot(old_set)
    moved = old_set.parent / ".zones.old-killed"
    old_set.rename(moved)                       # killed between the two renames
    (old_set.parent / ".zones.new-partial").mkdir()
    server.routes["/v4/us-aggregated.zone"] = (404, "text/html", b"<html>Not Found</html>")
    with pytest.raises(ZoneUpdateError):
        update_zones(str(old_set), ["us"], server.v4, server.v6, timeout=5)
    assert snapshot(old_set) == before
    assert leftovers(old_set.parent) == []


@pytest.mark.parametrize("template,expected", [
    ("http://h/{cc}-aggregated.zone", "http://h/us-aggregated.zone"),
    ("http://h/{CC}.zone", "http://h/US.zone"),
    ("http://h/lists/", "http://h/lists/us-aggregated.zone"),
], ids=["a lower-case placeholder", "an upper-case placeholder", "a directory URL gets ipdeny's file name"])
def test_url_templates(template: str, expected: str) -> None:
    assert url_for(template, "US") == expected


# -- failures keep the old set ------------------------------------------------

FAILURES: list[tuple[str, str, Route, str]] = [
    ("an HTTP 404 for one list", "/v6/mx-aggregated.zone", (404, "text/html", b"<html>no</html>"), "HTTP 404"),
    ("an HTTP 500", "/v4/ca-aggregated.zone", (500, "text/plain", b"oops"), "HTTP 500"),
    ("a bad line in one file", "/v4/mx-aggregated.zone", b"203.0.113.0/24\n203.0.113.999/32\n",
     "mx-aggregated.zone:2: not an IPv4 or IPv6 network"),
    ("an IPv6 network in an IPv4 list", "/v4/us-aggregated.zone", b"2001:db8::/32\n",
     "an IPv6 network in an IPv4 list"),
    ("an empty body", "/v4/us-aggregated.zone", b"", "empty list"),
    ("a body of comments only", "/v4/us-aggregated.zone", b"# nothing today\n\n", "empty list"),
    ("an HTML page labelled text/html", "/v4/us-aggregated.zone", (200, "text/html", b"<html>Login</html>"),
     "HTML page"),
    ("an HTML page labelled text/plain", "/v4/us-aggregated.zone",
     (200, "text/plain", b"<!DOCTYPE html>\n<html><body>Rate limited</body></html>"), "HTML page"),
    ("binary junk", "/v6/ca-aggregated.zone", b"\xff\xfe\x00garbage", "non-ASCII"),
    ("a response that stops after its headers", "/v4/ca-aggregated.zone", HANG_AFTER_HEADERS, "timed out"),
    ("a server that never answers", "/v6/us-aggregated.zone", HANG_BEFORE_HEADERS, "timed out"),
    ("a body that trickles past the deadline", "/v4/mx-aggregated.zone", TRICKLE, "timed out"),
    ("a connection cut mid-body", "/v4/us-aggregated.zone", CUT, "closed after 10 of 1000 bytes"),
]


@pytest.mark.parametrize("path,route,message", [f[1:] for f in FAILURES], ids=[f[0] for f in FAILURES])
def test_a_failure_keeps_the_old_set_and_exits_non_zero(
        server: ZoneServer, old_set: Path, capsys: pytest.CaptureFixture[str],
        path: str, route: Route, message: str) -> None:
    before = snapshot(old_set)
    server.routes[path] = route
    started = time.monotonic()
    code = run(["--dest", str(old_set), "--countries", "us,ca,mx",
                "--base-url", server.v4, "--ipv6-base-url", server.v6, "--timeout", "0.5s"])
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert len(err) == 1 and err[0].startswith(f"zones update failed, {old_set} left unchanged: ")
    assert message in err[0]
    assert snapshot(old_set) == before
    assert leftovers(old_set.parent) == []
    assert elapsed < 5, "the timeout must bound a stalled download"


def test_a_refused_connection_keeps_the_old_set(old_set: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as sock:   # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    before = snapshot(old_set)
    code = run(["--dest", str(old_set), "--countries", "us", "--timeout", "2s",
                "--base-url", f"http://127.0.0.1:{port}/{{cc}}.zone", "--no-ipv6"])
    assert code == 1
    assert "refused" in capsys.readouterr().err.lower()
    assert snapshot(old_set) == before


def test_a_concurrent_update_of_the_same_dest_fails_at_once(server: ZoneServer, old_set: Path) -> None:
    before = snapshot(old_set)
    fd = os.open(old_set.parent / ".zones.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(ZoneUpdateError, match="another zones update is running"):
            update_zones(str(old_set), ["us"], server.v4, server.v6, timeout=5)
    finally:
        os.close(fd)
    assert server.requests == []
    assert snapshot(old_set) == before


# -- bad input ----------------------------------------------------------------

BAD_INPUT = [
    ("an invalid country code", ["--countries", "us,xx"], "--countries: \"xx\" is not an ISO 3166-1"),
    ("an empty country list", ["--countries", ","], "--countries: no code given"),
    ("a timeout that is no duration", ["--countries", "us", "--timeout", "soon"], "--timeout: "),
    ("a zero timeout", ["--countries", "us", "--timeout", "0"], "--timeout: must be more than 0"),
    ("a base URL that is not http", ["--countries", "us", "--base-url", "ftp://x/{cc}"], "--base-url: "),
    ("no countries and an empty dest", [], "--countries: "),
]


@pytest.mark.parametrize("argv,message", [b[1:] for b in BAD_INPUT], ids=[b[0] for b in BAD_INPUT])
def test_bad_input_names_the_flag_and_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              argv: list[str], message: str) -> None:
    dest = tmp_path / "zones"
    assert run(["--dest", str(dest), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)
    assert not dest.exists()
