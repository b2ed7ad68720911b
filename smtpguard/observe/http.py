"""smtpguard's own small HTTP server: the resolution page, /metrics, /healthz, /livez.

Decides:
    which page a request gets: the resolution page at the path of
    `server.resolution_url` (default /smtp; HTML for a browser, text/plain
    for curl or `?format=text`), the Prometheus text format at /metrics,
    readiness at /healthz (200 when every SMTP listener is serving and the
    upstream MTA answered the last health check, else 503 and why), liveness
    at /livez (200 while the event loop answers).
Inputs:
    `[http]` (listen, contact, texts, removal, health_interval), the running
    Server (listeners, open sessions) and Services (config, resolver,
    upstream pool).
Output:
    an aiohttp server in the proxy's own event loop (`start`/`HttpServer`).
Failure modes:
    a bad `[http]` setting is a ConfigError at start naming the key. A
    request never raises into the loop: parameters are strangers' strings,
    validated by observe/page.py; aiohttp answers malformed HTTP with 400.
    A port that cannot be bound is an OSError at start (exit 1, one line).
Defaults and why:
    off unless `--http`/`[http] listen` is given (a port-25 front should not
    open a second port by surprise). The upstream is checked every 10 s
    (Kubernetes' default probe period, periodSeconds = 10). With
    `server.workers = N`, worker k listens on the first free port of
    PORT..PORT+N-1 (one listener per worker, consecutive ports): each
    worker's /metrics is exact for that worker, Prometheus scrapes all N
    and `sum()` adds them up; no shared files, and a restarted worker takes
    its predecessor's port again.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import socket
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping
from urllib.parse import urlsplit

from smtpguard.core.reply import REASONS
from smtpguard.errors import ConfigError
from smtpguard.observe import page as pages
from smtpguard.observe.log import event

if TYPE_CHECKING:
    from aiohttp import web

    from smtpguard.observe.metrics import Metrics

# Kubernetes' default probe period (periodSeconds = 10).
DEFAULT_HEALTH_INTERVAL = 10.0
# One check waits this long at most (Docker's HEALTHCHECK --timeout in the
# image is 5 s; an MTA that takes longer to say 250 to NOOP is not healthy).
PROBE_TIMEOUT = 5.0
# The page's path when server.resolution_url names none (the README's example URL).
DEFAULT_PAGE_PATH = "/smtp"
# A contact line and a text are read by people: a few lines at most.
MAX_CONTACT = 200
MAX_TEXT = 2000
# A DNSBL lookup for the page (DNSBL code only) waits at most this long:
# the page is shown without the list names rather than late.
PAGE_LOOKUP_BUDGET = 2.0
# Page views that look up lists at once: anyone may load the page, so
# strangers cannot make the proxy ask the lists more than this in parallel
# (beyond it the page is shown without the list names).
MAX_PAGE_LOOKUPS = 4
# Every response: nothing may run or load (the page has no script and no
# external resource; this makes a mistake harmless too).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; "
                               "form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_TEXT_PARTS = ("title", "what", "fix")


@dataclass(frozen=True, slots=True)
class HttpSettings:
    """[http]: where to listen and what the page says beyond its own texts."""

    listen: tuple[str, int] | None = None
    contact: str = ""
    texts: tuple[tuple[str, pages.Text], ...] = ()      # per-code overrides
    removal: tuple[tuple[str, str], ...] = ()           # DNS list (name or zone) -> removal URL
    health_interval: float = DEFAULT_HEALTH_INTERVAL

    @property
    def overrides(self) -> dict[str, pages.Text]:
        return dict(self.texts)

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], policy: Any = None, prefix: str = "http") -> "HttpSettings":
        from smtpguard import config as cfg

        allowed = ("listen", "contact", "texts", "removal", "health_interval")
        for key in table:
            if key not in allowed:
                raise ConfigError(f"{prefix}.{key}", f"unknown key; known keys in [{prefix}]: {', '.join(allowed)}")
        out: dict[str, Any] = {}
        if table.get("listen") not in (None, ""):
            out["listen"] = cfg.parse_hostport(f"{prefix}.listen", table["listen"])
        if "contact" in table:
            out["contact"] = _line(f"{prefix}.contact", table["contact"], MAX_CONTACT)
        if "health_interval" in table:
            out["health_interval"] = cfg._positive_duration(f"{prefix}.health_interval", table["health_interval"])
        known = known_codes(policy)
        texts = table.get("texts", {})
        if not isinstance(texts, dict):
            raise ConfigError(f"{prefix}.texts", "expected a table: [http.texts] GEO = \"...\"")
        overrides: list[tuple[str, pages.Text]] = []
        for code, value in texts.items():
            key = f"{prefix}.texts.{code}"
            if code not in known:
                raise ConfigError(key, "unknown reason code; known: " + ", ".join(sorted(known)))
            overrides.append((code, _text(key, code, value)))
        out["texts"] = tuple(overrides)
        removal = table.get("removal", {})
        if not isinstance(removal, dict):
            raise ConfigError(f"{prefix}.removal", "expected a table: [http.removal] \"zen.spamhaus.org\" = \"https://...\"")
        links: list[tuple[str, str]] = []
        for label, url in removal.items():
            key = f"{prefix}.removal.{label}"
            link = _line(key, url, MAX_CONTACT)
            if not re.fullmatch(r"https?://[^\s\"'<>]+", link):
                raise ConfigError(key, f"expected an http:// or https:// URL, got {url!r}")
            links.append((str(label).lower(), link))
        out["removal"] = tuple(links)
        return cls(**out)


def _line(key: str, value: Any, limit: int) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {value!r}")
    if _CONTROL.search(value):
        raise ConfigError(key, "control characters (line breaks, tabs) are not allowed")
    if len(value) > limit:
        raise ConfigError(key, f"at most {limit} characters, got {len(value)}")
    return value.strip()


def _text(key: str, code: str, value: Any) -> pages.Text:
    """An override: a string (what happened) or a table of title/what/fix; the rest stays ours."""
    base = pages.text_for(code)
    if isinstance(value, str):
        value = {"what": value}
    if not isinstance(value, dict):
        raise ConfigError(key, "expected a string or a table with title, what, fix")
    parts = {}
    for part, text in value.items():
        if part not in _TEXT_PARTS:
            raise ConfigError(f"{key}.{part}", "unknown key; allowed: title, what, fix")
        parts[part] = _line(f"{key}.{part}", text, MAX_TEXT)
        for name in re.findall(r"\{([^}]*)\}", parts[part]):
            if name not in pages.PLACEHOLDERS:
                raise ConfigError(f"{key}.{part}", f"unknown placeholder {{{name}}}; allowed: "
                                  + " ".join("{" + p + "}" for p in pages.PLACEHOLDERS))
    return pages.Text(parts.get("title", base.title), parts.get("what", base.what), parts.get("fix", base.fix))


def known_codes(policy: Any = None) -> set[str]:
    """Every reason code a reply of this configuration can carry (read at run time)."""
    codes = set(REASONS) | set(pages.TEXTS)
    for rule in getattr(policy, "rules", ()) or ():
        if getattr(rule, "reason", ""):
            codes.add(rule.reason)
    return codes


def rule_texts(policy: Any) -> dict[str, str]:
    """A rule's own `text` for its own reason code (the first rule that has one)."""
    out: dict[str, str] = {}
    for rule in getattr(policy, "rules", ()) or ():
        if rule.reason and rule.text and rule.reason not in out:
            out[rule.reason] = rule.text
    return out


def page_path(resolution_url: str) -> str:
    path = urlsplit(resolution_url).path if resolution_url else ""
    return path if path.startswith("/") and len(path) > 1 else DEFAULT_PAGE_PATH


def wants_text(query: Mapping[str, str], accept: str) -> bool:
    """`?format=text|html` wins; else a browser (text/html in Accept) gets HTML, curl (*/*) text."""
    fmt = query.get("format", "").lower()
    if fmt in ("text", "html"):
        return fmt == "text"
    accept = accept.lower()
    return "text/html" not in accept and "application/xhtml" not in accept


class HttpServer:
    """The HTTP side of one process: built by `start`, stopped by `stop`."""

    def __init__(self, services: Any, server: Any, metrics: "Metrics",
                 clock: Callable[[], float] = time.time) -> None:
        self.services = services
        self.server = server
        self.metrics = metrics
        self.clock = clock
        self.upstream_ok: bool | None = None     # None: not checked yet
        self.upstream_checked = 0.0
        self.bound: tuple[str, int] = ("", 0)
        self._runner: "web.AppRunner | None" = None
        self._probe: asyncio.Task[None] | None = None
        self._lookups = 0   # DNSBL lookups for pages in flight

    @property
    def settings(self) -> HttpSettings:
        return self.services.config.http  # type: ignore[no-any-return]

    # --- handlers --------------------------------------------------------------

    async def page(self, request: "web.Request") -> "web.Response":
        from aiohttp import web

        config = self.services.config
        query = {k: v for k, v in request.query.items()}
        listings = await self._listings(query) if query.get("code", "").upper() == "DNSBL" else ()
        built = pages.build(query, self.clock(), known_codes(config.policy), contact=self.settings.contact,
                            overrides=self.settings.overrides, rule_texts=rule_texts(config.policy),
                            graylist_delay=config.graylist.policy.delay, listings=listings)
        if wants_text(query, request.headers.get("Accept", "")):
            return web.Response(text=pages.render_text(built), content_type="text/plain", charset="utf-8",
                                headers=SECURITY_HEADERS)
        return web.Response(text=pages.render_html(built), content_type="text/html", charset="utf-8",
                            headers=SECURITY_HEADERS)

    async def _listings(self, query: Mapping[str, str]) -> tuple[pages.Listing, ...]:
        """The blocklists that name the address now, with the configured removal links."""
        ip = pages.valid_ip(query.get("ip", "")[:200])
        lists = [x for x in self.services.config.dnsbl.lists if x.weight > 0]
        if not ip or not lists or self._lookups >= MAX_PAGE_LOOKUPS:
            return ()
        from smtpguard.sources import dnsbl

        self._lookups += 1
        try:
            fact = await dnsbl.gather(ip, lists, self.services.resolver, PAGE_LOOKUP_BUDGET)
        except Exception:  # the page is shown without the names rather than not at all
            event("http.dnsbl_error", logging.WARNING, exc_info=True)
            return ()
        finally:
            self._lookups -= 1
        removal = dict(self.settings.removal)
        by_label = {x.label: x for x in lists}
        out: list[pages.Listing] = []
        for hit in fact.hits:
            label = hit.partition("=")[0]
            entry = by_label.get(label)
            if entry is None or any(x.name == label for x in out):
                continue
            link = removal.get(label.lower()) or removal.get(entry.zone.lower(), "")
            out.append(pages.Listing(label, link))
        return tuple(out)

    async def metrics_page(self, request: "web.Request") -> "web.Response":
        from aiohttp import web
        from prometheus_client import CONTENT_TYPE_LATEST

        body = self.metrics.render()
        return web.Response(body=body, headers={**SECURITY_HEADERS, "Content-Type": CONTENT_TYPE_LATEST})

    def problems(self) -> list[str]:
        """Why this process is not ready; empty when it is."""
        out = []
        servers = getattr(self.server, "_servers", [])
        if not servers or self.server.stopping:
            out.append("SMTP listeners are not serving")
        out += [f"SMTP listener {i} is not serving" for i, s in enumerate(servers) if not s.is_serving()]
        if self.upstream_ok is None:
            out.append("upstream MTA not checked yet")
        elif not self.upstream_ok:
            up = self.services.config.upstream
            out.append(f"upstream MTA {up.host}:{up.port} did not answer the last check")
        return out

    async def healthz(self, request: "web.Request") -> "web.Response":
        from aiohttp import web

        problems = self.problems()
        text = "ok\n" if not problems else "".join(p + "\n" for p in problems)
        return web.Response(text=text, status=200 if not problems else 503, headers=SECURITY_HEADERS)

    async def livez(self, request: "web.Request") -> "web.Response":
        from aiohttp import web

        return web.Response(text="ok\n", headers=SECURITY_HEADERS)

    # --- the upstream check --------------------------------------------------------

    async def check_upstream(self) -> bool:
        ok = bool(await self.services.probe_upstream(min(PROBE_TIMEOUT, self.settings.health_interval)))
        self.upstream_ok, self.upstream_checked = ok, self.clock()
        self.metrics.upstream_up.set(1 if ok else 0)
        return ok

    async def _probe_loop(self) -> None:
        while True:
            try:
                await self.check_upstream()
            except Exception:
                self.upstream_ok = False
                event("http.health_error", logging.ERROR, exc_info=True)
            await asyncio.sleep(self.settings.health_interval)  # a timer, not synchronisation

    # --- life ------------------------------------------------------------------------

    def app(self) -> "web.Application":
        from aiohttp import web

        @web.middleware
        async def logged(request: "web.Request", handler: Any) -> Any:
            # path and status at debug, never the query string (strangers' strings)
            try:
                response = await handler(request)
            except web.HTTPException as e:
                event("http.request", logging.DEBUG, path=request.path[:100], status=e.status)
                raise
            event("http.request", logging.DEBUG, path=request.path[:100], status=response.status)
            return response

        app = web.Application(client_max_size=1024, middlewares=[logged])
        app.router.add_get("/metrics", self.metrics_page)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/livez", self.livez)
        # The page's path follows server.resolution_url, which a reload may change.
        app.router.add_get("/{path:.*}", self.page_or_404)
        return app

    async def page_or_404(self, request: "web.Request") -> "web.Response":
        from aiohttp import web

        if request.path != page_path(self.services.config.server.resolution_url):
            raise web.HTTPNotFound(headers=SECURITY_HEADERS)
        return await self.page(request)

    async def start(self) -> tuple[str, int]:
        from aiohttp import web

        host, port = self.settings.listen or ("127.0.0.1", 0)
        workers = self.services.config.server.workers
        sock = bind_first_free(host, port, workers if port else 1)
        # A scrape or a page takes milliseconds: stopping waits 1 s at most for one.
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.SockSite(self._runner, sock)
        await site.start()
        self.bound = sock.getsockname()[:2]
        self._probe = asyncio.get_running_loop().create_task(self._probe_loop())
        event("http.listening", address=f"{self.bound[0]}:{self.bound[1]}")
        return self.bound

    async def stop(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        self.metrics.close()


def bind_first_free(host: str, port: int, count: int) -> socket.socket:
    """A listening socket on the first free port of port..port+count-1 (one per worker)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    last: OSError | None = None
    for p in range(port, port + max(1, count)):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            # SO_REUSEADDR for a quick restart; never SO_REUSEPORT: each worker its own port.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind((host, p))
            sock.listen(128)
            sock.setblocking(False)
            return sock
        except OSError as e:
            sock.close()
            last = e
            if e.errno != errno.EADDRINUSE:
                break
    assert last is not None
    raise OSError(last.errno, f"cannot listen for HTTP on {host}:{port}"
                  + (f"-{port + count - 1}" if count > 1 else "") + f": {last.strerror}")


async def start(services: Any, server: Any, clock: Callable[[], float] = time.time) -> HttpServer:
    """Count metrics from now on and serve HTTP; the caller stops it."""
    from smtpguard.observe import metrics as m

    counting = m.Metrics().install()
    counting.add_callback(m.gauge_family("sessions_current", "SMTP sessions open now (past the screen)",
                                         lambda: len(getattr(server, "sessions", ()))))
    counting.add_callback(m.gauge_family("connections_current", "Client connections open now, in the "
                                         "screen or in a session (the count the limits use)",
                                         lambda: getattr(getattr(services, "clients", None), "total", 0)))
    counting.add_callback(m.resolver_families(lambda: services.resolver.stats()))
    http = HttpServer(services, server, counting, clock)
    try:
        await http.start()
    except BaseException:
        counting.close()
        raise
    return http
