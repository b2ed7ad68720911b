"""`smtpguard health`: is the proxy on this host answering? For a container's HEALTHCHECK.

What it decides: healthy (exit 0) or unhealthy (exit 1, one line why).
Inputs: where the HTTP server runs (`--http HOST:PORT` or URL, else
SMTPGUARD_HTTP, else `[http] listen` in `--config` / SMTPGUARD_CONFIG), it
GETs /healthz there and wants a 200: the proxy's own readiness (every SMTP
listener serving, the MTA answering). Without an HTTP server (or with
`--smtp`) it connects to the SMTP listener and wants the first line of a
220 greeting: the listener is `--listen`, else SMTPGUARD_LISTEN, else
`server.listen` in the file, else the default 0.0.0.0:25. A wildcard
address is checked on loopback (127.0.0.1, ::1).
Output: one line on stdout, the exit code.
Failure modes: refused, timed out, closed, or a greeting other than 220
(a 421/554 busy banner) are unhealthy; a bad flag, variable or file is a
config error (exit 2; HEALTHCHECK counts every non-zero code as a failure).
Defaults and why: a 3 s timeout, below the image's HEALTHCHECK --timeout
of 5 s, so the check answers before Docker kills it. The greeting may be
the screen's early-talker wait, which sends `220-host` at once and the
final `220 ` seconds later: `220-` already proves the listener and the
event loop alive. The check then closes without a command, so it never
talks early and its session never reaches the policy.
"""

from __future__ import annotations

import argparse
import socket
import urllib.error
import urllib.request
from typing import Any

from smtpguard import config as cfg
from smtpguard.core.units import parse_duration
from smtpguard.errors import ConfigError

# Below the image's HEALTHCHECK --timeout=5s (see Dockerfile).
DEFAULT_TIMEOUT = 3.0
# The longest greeting line we read: RFC 5321 §4.5.3.1.5 (512 octets per reply line).
MAX_LINE = 512
# A wildcard listener is reached on loopback of its family.
LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "health", help="check that the proxy on this host answers (for a container HEALTHCHECK)",
        description="Exit 0 when smtpguard answers: its HTTP server's /healthz answers 200 when one is "
        "configured, else the SMTP listener's first greeting line is 220; exit 1 with one line why not.")
    p.add_argument("--config", metavar="FILE", help="read server.listen and http.listen from this TOML file")
    p.add_argument("--listen", action="append", metavar="HOST:PORT",
                   help="the SMTP listener to check (default: server.listen, else 0.0.0.0:25, checked on loopback)")
    p.add_argument("--http", metavar="HOST:PORT|URL",
                   help="the HTTP server (its /healthz) or a URL to GET (default: http.listen, if set)")
    p.add_argument("--smtp", action="store_true",
                   help="check the SMTP listener's greeting even when an HTTP server is configured")
    p.add_argument("--timeout", default=f"{DEFAULT_TIMEOUT:g}s", metavar="DURATION",
                   help="longest wait for an answer (default %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        timeout = parse_duration(args.timeout)
    except (ValueError, TypeError) as e:
        raise ConfigError("--timeout", str(e)) from None
    if not 0 < timeout <= 60:
        raise ConfigError("--timeout", f"expected a duration between 0 and 60s, got {args.timeout!r}")
    url = None if args.smtp else healthz_url(args)
    if url:
        ok, why = check_http(url, timeout)
    else:
        host, port = listener(args)
        ok, why = check_smtp(host, port, timeout)
    print(("healthy: " if ok else "unhealthy: ") + why)
    return 0 if ok else 1


def _file_value(args: argparse.Namespace, table: str, key: str) -> Any:
    doc = cfg.read_toml(args.config) if args.config else {}
    section = doc.get(table, {})
    return section.get(key) if isinstance(section, dict) else None


def healthz_url(args: argparse.Namespace) -> str | None:
    """/healthz of the configured HTTP server (flag/variable, else the file), or None."""
    if args.http:
        if "://" in args.http:
            return _http_url(args.http)
        host, port = cfg.parse_hostport("--http", args.http)
    else:
        raw = _file_value(args, "http", "listen")
        if raw in (None, ""):
            return None
        host, port = cfg.parse_hostport("http.listen", raw)
    host = LOOPBACK.get(host, host)
    return f"http://[{host}]:{port}/healthz" if ":" in host else f"http://{host}:{port}/healthz"


def listener(args: argparse.Namespace) -> tuple[str, int]:
    """The first listen address, from the flag/variable, else the file, else the default."""
    if args.listen:
        addresses = cfg.SERVER_KEYS["listen"]("--listen", args.listen)
    else:
        raw = _file_value(args, "server", "listen")
        addresses = (cfg.SERVER_KEYS["listen"]("server.listen", raw) if raw
                     else cfg.ServerSettings().listen)
    if not addresses:
        raise ConfigError("server.listen", "no address to check")
    host, port = addresses[0]
    return LOOPBACK.get(host, host), port


def check_smtp(host: str, port: int, timeout: float) -> tuple[bool, str]:
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            line = _read_line(sock)
    except TimeoutError:
        return False, f"{where}: no greeting within {timeout:g}s"
    except OSError as e:
        return False, f"{where}: {e.strerror or e}"
    shown = line[:80].decode("ascii", "replace").rstrip("\r\n")
    shown = "".join(c if c.isprintable() else "?" for c in shown)   # a stranger's bytes, escaped
    if line[:4] in (b"220 ", b"220-"):
        return True, f"{where} greets: {shown}"
    if not line:
        return False, f"{where}: closed without a greeting"
    return False, f"{where} greets: {shown}"


def _read_line(sock: socket.socket) -> bytes:
    """The greeting's first line, at most MAX_LINE octets (b'' if the peer closed)."""
    data = b""
    while b"\n" not in data and len(data) < MAX_LINE:
        chunk = sock.recv(MAX_LINE - len(data))
        if not chunk:
            break
        data += chunk
    return data.split(b"\n", 1)[0]


def _http_url(url: str) -> str:
    if not isinstance(url, str) or not url.startswith(("http://", "https://")) or any(c.isspace() for c in url):
        raise ConfigError("--http", f"expected HOST:PORT or an http:// or https:// URL, got {url!r}")
    return url


def check_http(url: str, timeout: float) -> tuple[bool, str]:
    # Never through a proxy from the environment: the server is on this host.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as e:
        return False, f"{url}: HTTP {e.code}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        return False, f"{url}: {reason}"
    if status == 200:
        return True, f"{url}: HTTP 200"
    return False, f"{url}: HTTP {status}"

