"""The per-process composition root: config, upstream pool, fact sources, policy.

Built once at start (and again on SIGHUP); a session reaches every shared
part through it. It runs the stage loop: at each stage, the sources the
registry (sources/registry.py, `config.registry`) declares for that stage
run concurrently under the one deadline they share (`[dns] stage_budget`),
so the cost of a stage is its slowest lookup, not the sum; a source that
has not finished by then gives `unknown` for each of its facts. A source
runs only when a rule reads one of its facts (as postscreen runs only the
tests that are enabled), when a running source reads its result (helo reads
rdns), when it is always needed (dkim, for the Authentication-Results
header), or when the relay itself needs it (the confirmed rDNS name for
XCLIENT and the trace, the rDNS domain for graylist identities).

The sources' results of a session are kept in the session's one dict by
source name (`session.source_results`): later sources read it as
`ctx.results`, the session for what it needs itself (the DNS lists' text in
a DNSBL reply, the DKIM results for the Authentication-Results header).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from smtpguard.adapters.dns import Resolver, SessionResolver, within
from smtpguard.adapters.store import Store, open_store
from smtpguard.adapters.upstream import Upstream
from smtpguard.config import Config, load
from smtpguard.core import policy as pol
from smtpguard.core.facts import UNKNOWN, FactValue
from smtpguard.core.helo import OurIdentity, identity
from smtpguard.errors import ConfigError, StoreError
from smtpguard.observe.log import event
from smtpguard.observe.metrics import observe_facts, observe_graylist, observe_pregreet
from smtpguard.sources import Context, fingerprint, graylist, rdns
from smtpguard.sources.registry import Source

if TYPE_CHECKING:
    from smtpguard.adapters.zones import GeoDB
    from smtpguard.core.fingerprint import SignatureSet
    from smtpguard.session import ClientSession

# A source the stage loop cut at the deadline (its facts become `unknown`).
_UNFINISHED = object()
# Sources that keep the stage budget themselves (SourceSpec.own_deadline)
# are not cut by the loop; this bound only guards against a bug in one.
_OWN_DEADLINE = 3600.0
# A host has a handful of addresses; the bound only guards against surprises.
MAX_LOCAL_ADDRESSES = 256
# The screen's rate limit counts new sessions in fixed one-minute windows
# (Postfix's anvil counts per anvil_rate_time_unit, 60 s); a window's
# counter outlives it by one more minute, then the store expires it.
RATE_WINDOW = 60.0


class ClientCounts:
    """Sessions held now, per client (IPv4 address or IPv6 /64) and in all:
    the screen's per_ip_sessions and max_sessions (one process's own)."""

    __slots__ = ("total", "by_key")

    def __init__(self) -> None:
        self.total = 0
        self.by_key: dict[str, int] = {}

    def acquire(self, key: str) -> int:
        """Count one more session of `key`; its count now."""
        self.total += 1
        n = self.by_key.get(key, 0) + 1
        self.by_key[key] = n
        return n

    def release(self, key: str) -> None:
        self.total -= 1
        n = self.by_key.get(key, 0) - 1
        if n > 0:
            self.by_key[key] = n
        else:
            self.by_key.pop(key, None)


@dataclass(frozen=True, slots=True)
class Preview:
    """How `smtpguard check` runs a session on the live services: the same
    facts, policy and stage methods, but the graylist store is neither read
    nor written (a recipient a graylist rule covers is a new triplet, deferred
    as its first attempt would be; no trap is sprung), and the DNS-list text
    reaches the reply only when a rule reads the lists (`lists_read`), as in a
    live session, although check gathers every fact to show it."""

    lists_read: bool


class Services:
    def __init__(self, config: Config, geodb: "GeoDB | None" = None, signatures: "SignatureSet | None" = None,
                 store: Store | None = None, clock: Callable[[], float] = time.time,
                 flags: dict[str, Any] | None = None) -> None:
        self.config = config
        self.clock = clock
        self.upstream = Upstream(config.upstream, config.server.hostname)
        self.resolver = Resolver.from_settings(config.dns)
        self.geodb = geodb
        self.signatures = signatures
        self.store = store
        self._flags = dict(flags or {})  # the command line, applied again on every reload
        self.clients = ClientCounts()    # the screen's session counts (this process)
        # Called after a reload is swapped in (server.py re-reads the certificate).
        self.reload_hooks: list[Callable[[], None]] = []
        self.own_workers = False         # one of `server.workers`: shares its listeners (workers.py)
        self._last_purge = 0.0
        self.preview: Preview | None = None   # set by `smtpguard check` only
        self._configure(config)

    def _configure(self, config: Config) -> None:
        self.config = config
        self.policy = config.policy
        self.registry = config.registry
        # The relay itself uses the confirmed rDNS name (XCLIENT or XFORWARD
        # NAME, the Received header) and the graylist keys on the rDNS domain.
        up = config.upstream
        relay = frozenset({"rdns"}) if up.xclient or up.xforward or uses_graylist(config) else frozenset()
        self.wanted: frozenset[str] | None = self.policy.facts()   # None: every fact (check)
        self.run: dict[str, bool] = self.registry.wanted(self.wanted, relay)
        listen_ips = [h for h, _ in config.server.listen if h not in ("0.0.0.0", "::", "")]
        self.us: OurIdentity = identity([config.server.hostname], config.server.domains, listen_ips)
        self._us_by_local: dict[str, OurIdentity] = {}

    async def start(self) -> None:
        """Checks that need the event loop, before any socket is opened."""
        await check_store(self)

    # --- facts ---------------------------------------------------------------

    async def facts(self, stage: str, session: "ClientSession") -> dict[str, FactValue]:
        """The stage's facts; the time they took and their results go to /metrics (issue 12)."""
        started = time.monotonic()
        got = await self._stage_facts(stage, session)
        if self.preview is not None and not self.preview.lists_read:
            session.source_results.pop("dnsbl", None)   # no list text in the reply
        observe_facts(stage, time.monotonic() - started, got)
        return got

    async def _stage_facts(self, stage: str, session: "ClientSession") -> dict[str, FactValue]:
        """The stage loop: revise earlier results (rdns with the HELO name),
        then run the stage's wanted sources concurrently within the budget."""
        results = session.source_results
        out: dict[str, FactValue] = {}
        revising = [s for s in self.registry.revised_at(stage) if s.spec.name in results]
        sources = [s for s in self.registry.at(stage) if s.spec.always or self.run.get(s.spec.name)]
        if not revising and not sources:
            return out
        # What every source of this stage is given; each gets its own settings (_ctx).
        ctx: dict[str, Any] = {
            "client": session.client, "stage": stage, "resolver": self._dns(session),
            "budget": self.config.dns.stage_budget, "results": results, "helo": session.helo or "",
            "message": session.content if stage == "data" else None, "config": self.config,
            "geodb": self.geodb, "signatures": self.signatures, "wanted": self.wanted,
            "us": self._us_at(session.client.local_ip) if stage != "connect" else self.us}
        for source in revising:   # issue 14: rdns_generic from the helo stage on weighs the HELO name
            assert source.revise is not None
            fact = results[source.spec.name] = source.revise(self._ctx(ctx, source), results[source.spec.name])
            out.update({k: v for k, v in fact.as_facts().items() if k in source.spec.revises})
        if not sources:
            return out
        # Each source under its deadline: the stage budget, or (a source that
        # keeps the budget itself, SourceSpec.own_deadline) a bound that only
        # guards against a bug in it.
        pending: dict[str, Awaitable[Any]] = {s.spec.name: s.gather(self._ctx(ctx, s)) for s in sources if s.gather}
        deadlines = {s.spec.name: _OWN_DEADLINE if s.spec.own_deadline else self.config.dns.stage_budget
                     for s in sources if s.gather}
        got = await within(deadlines, pending, lambda _k: _UNFINISHED)
        for name, fact in got.items():
            if fact is _UNFINISHED:
                out.update(self.registry.unknown_facts(name))
                continue
            if fact is None:   # nothing to say for this client (no country data, no list, no message)
                continue
            results[name] = fact
            out.update(fact.as_facts())
        return out

    def _ctx(self, shared: dict[str, Any], source: Source) -> Context:
        """One source's context: the stage's, with this source's settings."""
        return Context(settings=self.config.area(source.spec.area) if source.spec.area else None, **shared)

    def _dns(self, session: "ClientSession") -> SessionResolver:
        """The resolver as this session sees it: its lookups spend the
        session's budget ([dns] session_lookups, made at its first lookup)
        and its DNS error lines carry its id (issue 19 items 1 and 2)."""
        if session.dns_budget is None:
            session.dns_budget = self.resolver.budget()
        return self.resolver.for_session(session.dns_budget, session.client.session_id)

    def _us_at(self, local_ip: str) -> OurIdentity:
        """Who we are, including the address the client connected to (a
        wildcard listener has one per interface): built once per address."""
        us = self._us_by_local.get(local_ip)
        if us is None:
            us = identity(self.us.names, self.config.server.domains,
                          [str(n) for n in self.us.networks] + ([local_ip] if local_ip else []))
            if len(self._us_by_local) < MAX_LOCAL_ADDRESSES:
                self._us_by_local[local_ip] = us
        return us

    # --- policy ----------------------------------------------------------------

    def decide(self, stage: str, facts: dict[str, FactValue], pending: pol.Verdict | None = None) -> pol.Verdict:
        if stage == "connect" and "pregreet" in facts:
            observe_pregreet(facts["pregreet"])   # issue 12: the screen's pregreet results in /metrics
        return pol.decide(self.policy, stage, facts, pending)

    async def graylist(self, session: "ClientSession", rcpt: str, strict: bool) -> dict[str, FactValue]:
        """The graylist state of one recipient; a store outage is the value `unknown`."""
        if self.preview is not None:
            return {"graylist": "new", "graylist_wait": math.ceil(self.config.graylist.policy.delay)}
        if self.store is None:
            return {"graylist": UNKNOWN, "graylist_error": "no state store"}
        fact = await graylist.check(self.store, self.config.graylist, ip=session.client.ip,
                                    rdns_confirmed_domain=self._confirmed_domain(session),
                                    sender=session.sender or "", rcpt=rcpt, strict=strict, now=self.clock())
        out = fact.as_facts()
        observe_graylist(out.get("graylist"))   # issue 12: graylist outcomes in /metrics
        out["graylist_wait"] = fact.wait
        out["graylist_on_error"] = self.config.graylist.on_error
        if fact.error:
            out["graylist_error"] = fact.error
        return out

    async def trap(self, session: "ClientSession", rcpt: str) -> dict[str, FactValue]:
        """Spamtraps for a recipient no graylist rule covered: `trapped`, or nothing."""
        if self.preview is not None or self.store is None or not self.config.graylist.traps:
            return {}
        fact = await graylist.trap(self.store, self.config.graylist, ip=session.client.ip,
                                   rdns_confirmed_domain=self._confirmed_domain(session), rcpt=rcpt,
                                   now=self.clock())
        if fact is None:
            return {}
        if fact.error:
            # a trap lookup that fails does not refuse anyone: log it, go on
            event("trap.store_error", logging.ERROR, session=session.client.session_id,
                  ip=session.client.ip, error=fact.error)
            return {}
        return {"graylist": fact.graylist}

    @staticmethod
    def _confirmed_domain(session: "ClientSession") -> str | None:
        """The graylist's domain identity: the registrable domain of a
        forward-confirmed rDNS name by the whole Public Suffix List; none
        (so the /24 or /64) for a generic name, which a provider hands to
        every customer (issue 19 item 5)."""
        facts = session.facts
        if facts.get("rdns") != "confirmed" or facts.get("rdns_generic") is not False:
            return None
        name = facts.get("rdns_name")
        return rdns.identity_domain(str(name)) or None if name else None

    # --- the screen's shared state (pregreet pass cache, rate counters) ------------

    async def pregreet_passed(self, ip: str) -> bool:
        """Whether `ip` passed the pregreet test within pass_ttl (any node sharing the store)."""
        if self.store is None:
            return False
        try:
            return await self.store.get(f"pregreet:{ip}", now=self.clock()) is not None
        except StoreError as e:
            # the client waits once more: never a refusal for a store outage
            event("pregreet.store_error", logging.WARNING, ip=ip, error=str(e))
            return False

    async def pregreet_pass(self, ip: str) -> None:
        """Remember that `ip` waited for the greeting, for [pregreet] pass_ttl."""
        if self.store is None:
            return
        now = self.clock()
        try:
            await self.store.set(f"pregreet:{ip}", "pass", expires_at=now + self.config.pregreet.pass_ttl, now=now)
        except StoreError as e:
            event("pregreet.store_error", logging.WARNING, ip=ip, error=str(e))

    async def session_rate(self, key: str) -> int | None:
        """New sessions of client `key` in this minute, this one included, counted
        in the store so that nodes sharing it count together; None when it cannot tell."""
        if self.store is None:
            return None
        now = self.clock()
        window = int(now // RATE_WINDOW)
        try:
            return await self.store.incr(f"rate:{key}:{window}", expires_at=(window + 2) * RATE_WINDOW, now=now)
        except StoreError as e:
            event("rate.store_error", logging.WARNING, key=key, error=str(e))
            return None

    async def probe_upstream(self, timeout: float) -> bool:
        """Health (observe/http.py, /healthz): the MTA answers NOOP within
        `timeout`, on the probe's own connection, never a client's (a failure
        to connect is logged as upstream.error)."""
        from smtpguard.errors import UpstreamError

        try:
            async with asyncio.timeout(timeout):
                return await self.upstream.health_check()
        except (UpstreamError, TimeoutError):
            return False

    # --- housekeeping ----------------------------------------------------------

    # Expired rows are purged hourly: postgrey's and spamd's maintenance interval.
    PURGE_EVERY = 3600.0

    async def housekeeping(self) -> None:
        self.upstream.purge()
        now = self.clock()
        if self.store is not None and now - self._last_purge >= self.PURGE_EVERY:
            self._last_purge = now
            try:
                purged = await self.store.purge(now=now)
            except StoreError as e:
                event("store.purge_failed", logging.WARNING, error=str(e))
            else:
                if purged:
                    event("store.purged", rows=purged)

    async def reload(self) -> None:
        """SIGHUP: every setting that can change without re-binding, or the
        running ones and a log line why not (issue 11 item 4).

        The new config, country data and signatures are built in a thread and
        swapped in at once: sessions keep being served while the whole world's
        zones load (bench/bench_reload.py measures the longest loop stall).
        Then the resolver ([dns]), the upstream pool, the store, the log
        settings and the STARTTLS certificate (re-read even at an unchanged
        path: a certificate renewed in place) follow; what needs a restart
        is named in `reload.needs_restart`."""
        if not self.config.path:
            event("reload.skipped", reason="no --config file to reload")
            return
        try:
            config, geodb, signatures = await asyncio.to_thread(self._prepare, self.config.path)
            new_store = None
            url = store_url(config)
            if url and (self.store is None or url != store_url(self.config) or config.state != self.config.state):
                ensure_state_directory(url)
                new_store = open_store(url, timeout=config.state.timeout)
        except ConfigError as e:
            event("reload.failed", logging.ERROR, error=str(e))
            return
        except Exception as e:  # a reload must never take the running proxy down
            event("reload.failed", logging.ERROR, error=f"{type(e).__name__}: {e}")
            return
        old = self.config
        changed: list[str] = []
        if config.upstream != old.upstream or config.server.hostname != old.server.hostname:
            old_upstream, self.upstream = self.upstream, Upstream(config.upstream, config.server.hostname)
            await old_upstream.close()
            changed.append("upstream")
        if config.dns != old.dns:
            self.resolver = Resolver.from_settings(config.dns)   # new servers, timeouts and an empty cache
            changed.append("dns")
        if new_store is not None:
            old_store, self.store = self.store, new_store
            if old_store is not None:
                await old_store.close()
            changed.append("state")
        if config.log != old.log:
            from smtpguard.observe import log

            log.setup(config.log.format, config.log.level)
            changed.append("log")
        self.geodb, self.signatures = geodb, signatures
        self._configure(config)
        for hook in list(self.reload_hooks):   # server.py: the STARTTLS certificate, read again
            try:
                hook()
            except Exception as e:  # the files passed config's check; a race with a renewal keeps the old one
                event("reload.tls_failed", logging.ERROR, error=f"{type(e).__name__}: {e}",
                      note="the previous certificate stays in use")
            else:
                if config.server.tls_cert:
                    changed.append("tls")
        stale = needs_restart(old, config)
        if stale:
            event("reload.needs_restart", logging.WARNING, keys=",".join(stale),
                  note="these settings change only with a restart; the running values stay")
        event("reload.done", rules=len(config.policy.rules), reloaded=",".join(changed) or "policy",
              not_reloaded=",".join(stale),
              countries=getattr(getattr(geodb, "stats", None), "countries", 0))

    def _prepare(self, path: str) -> "tuple[Config, GeoDB | None, SignatureSet]":
        """The expensive part of a reload, run in a thread: nothing shared is touched.

        A zone rebuild is CPU-bound Python that holds the interpreter lock
        for long stretches (sorting a million ranges): a child process
        compiles the zone cache, and this thread only opens the compiled
        cache (a hit). Should the child fail, the thread builds the zones
        itself, reporting the same errors."""
        config = load(path, self._flags, self.config.registry)
        if config.geo.zones:
            compile_zones_in_child(path, self._flags)
        return config, open_geo(config), fingerprint.signature_set(config.fingerprint)

    async def close(self) -> None:
        await self.upstream.close()
        if self.store is not None:
            await self.store.close()


# Settings bound at start: a reload cannot apply them (README, "What a SIGHUP reloads").
RESTART_ONLY = (("server", "listen"), ("server", "workers"), ("http", "listen"))


def needs_restart(old: Config, new: Config) -> list[str]:
    """The restart-only settings that differ between the running and the new config."""
    return [f"{table}.{key}" for table, key in RESTART_ONLY
            if getattr(getattr(old, table), key) != getattr(getattr(new, table), key)]


def uses_graylist(config: Config) -> bool:
    return any(r.action == "graylist" for r in config.policy.rules) or bool(config.graylist.traps)


def store_url(config: Config) -> str | None:
    """The state store to open: the graylist needs [state]; the screen's pregreet
    pass cache and rate counters use it when it was configured (so that nodes
    sharing Redis share them), else a store of the process's own."""
    if uses_graylist(config):
        return config.state.url
    if config.pregreet.wait > 0 or config.limits.per_ip_rate > 0:
        return config.state.url if config.state_given else "memory://"
    return None


# A child compiling the whole world's zones takes a few seconds; past this,
# the reload builds them in its thread instead.
ZONE_COMPILE_TIMEOUT = 120.0
# The compiling child runs at a lower priority (nice(1)'s default increment).
ZONE_COMPILE_NICE = 10


def compile_zones_in_child(path: str, flags: dict[str, Any]) -> bool:
    """Write the compiled zone cache from another process (a reload's zones,
    off the event loop's interpreter lock). True when the child succeeded."""
    import json
    import subprocess
    import sys

    from smtpguard.config import FLAG_KEYS

    given = {k: flags[k] for k in FLAG_KEYS if flags.get(k) not in (None, [])}
    try:
        r = subprocess.run([sys.executable, "-c", "from smtpguard.services import _compile_zones_main as m; m()"],
                           input=json.dumps({"path": path, "flags": given}), capture_output=True, text=True,
                           timeout=ZONE_COMPILE_TIMEOUT)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def _compile_zones_main() -> None:
    """The child of compile_zones_in_child: load the config, open the zones (which writes the cache)."""
    import json
    import sys

    import os

    # Background work: the serving process keeps its CPU share while this compiles.
    os.nice(ZONE_COMPILE_NICE)
    job = json.loads(sys.stdin.read())
    open_geo(load(job["path"], job["flags"]))


def open_geo(config: Config) -> "GeoDB | None":
    if not config.geo.enabled:
        return None
    from smtpguard.adapters.zones import GeoDB
    return GeoDB.open(config.geo)


def state_directory(url: str) -> str | None:
    """The directory of a sqlite state file; None for the other stores."""
    import os
    from urllib.parse import unquote

    if not url.startswith("sqlite://"):
        return None
    path = unquote(url[len("sqlite://"):].partition("?")[0])
    if path.startswith("//"):
        path = "/" + path.lstrip("/")   # sqlite:////abs/path: one leading slash is the same path
    return os.path.dirname(os.path.abspath(path)) if path else None


def ensure_state_directory(url: str) -> None:
    """Issue 11 item 7: a sqlite file's missing directory is created with
    mode 0750 (the graylist is the admin's business, not every user's), or a
    config error says how to create it. Only the last level is created (as
    `mkdir`, not `mkdir -p`): a missing parent is more likely a typo."""
    import os

    directory = state_directory(url)
    if directory is None or os.path.isdir(directory):
        return
    try:
        os.mkdir(directory, mode=0o750)
    except OSError as e:
        raise ConfigError("state.url", f"the directory {directory} does not exist and cannot be created "
                          f"({e.strerror}): create it with `install -d -m 0750 -o USER {directory}`, "
                          "USER being the one smtpguard runs as") from None
    event("state.directory_created", path=directory, mode="0750")


def startup_warnings(config: Config) -> list[tuple[str, str]]:
    """Settings that work but are probably wrong: (event, note) pairs."""
    out = []
    if "." not in config.server.hostname:
        out.append(("config.hostname_not_fqdn",
                    f"the banner and EHLO name {config.server.hostname!r} is not a fully qualified domain name "
                    "(RFC 5321 4.1.1.1; receivers check it): set --hostname or [server] hostname"))
    return out


def build_services(config: Config, flags: dict[str, Any] | None = None, *, with_store: bool = True) -> Services:
    """Everything a session needs, validated before any socket is opened.

    `with_store=False` for `check`, which must not change the graylist."""
    geodb = open_geo(config)
    signatures = fingerprint.signature_set(config.fingerprint)
    store = None
    url = store_url(config) if with_store else None
    if url:
        ensure_state_directory(url)
        store = open_store(url, timeout=config.state.timeout)
    return Services(config, geodb, signatures, store, flags=flags)


async def check_store(services: Services) -> None:
    """At start: an sqlite file that cannot be opened or written (read-only
    file or directory) is a config error (exit 2); an unreachable or
    read-only Redis is logged loudly and left to `graylist.on_error`, since
    the other MX hosts' Redis may come back while we run. The check writes
    as well as reads (issue 19 item 8)."""
    if services.store is None:
        return
    try:
        await services.store.ping()
        await services.store.check_writes(now=services.clock())
    except StoreError as e:
        if services.config.state.url.startswith("sqlite"):
            raise ConfigError("state.url", f"cannot open the state store: {e}") from None
        event("store.unreachable", logging.ERROR, url=_redacted(services.config.state.url), error=str(e),
              on_error=services.config.graylist.on_error)


def _redacted(url: str) -> str:
    """A store URL without its password, for the log."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{'***@' if at else ''}{host}"


