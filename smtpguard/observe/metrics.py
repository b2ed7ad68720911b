"""Prometheus metrics, counted from the decision log's events.

Decides:
    nothing; it counts. Every `log.event()` reaches `Metrics.on_event`
    whatever the log level (log.subscribe), so the session code carries no
    metric calls: a table maps event names to counters (`HANDLERS`). Three
    values no event carries are observed directly, each from the one place
    it is known: the fact-gathering time of a stage (`observe_facts`, with
    the stage's facts, for the per-source lookup results), the graylist
    outcome of a recipient (`observe_graylist`), the relay time (the
    `seconds` field of relay.accepted/relay.refused).
Inputs:
    event names and fields; at scrape time the resolver's counters and the
    number of open sessions (callbacks given by observe/http.py).
Output:
    a `prometheus_client` registry of its own, rendered by `render()` in the
    Prometheus text format. Names: `smtpguard_` prefix, `_total` counters,
    seconds and bytes; labels take only values from small fixed sets (stage,
    reason code, kind, source, outcome), never an address or a name.
Failure modes:
    an event with unexpected fields is skipped for that metric; a label value
    outside its set is counted as "other" (so a bug cannot make a label
    unbounded). Nothing raises into a session (log._notify guards it).
Defaults and why:
    histogram buckets from 1 ms to 10 s for fact gathering (the DNS stage
    budget is seconds) and to 120 s for relaying (Postfix's
    smtpd_proxy_timeout is 100 s); counting is on only while the HTTP
    endpoint is (`--http`): nobody could read it otherwise.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping

from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from smtpguard.observe import log

PREFIX = "smtpguard"
STAGES = ("screen", "connect", "helo", "mail", "rcpt", "data")
# The screen's limits (screen.py refuse_limit: a `defer` at stage "screen", the limit as rule).
LIMITS = ("max_sessions", "per_ip_sessions", "per_ip_rate")
# Label values are checked against these shapes: a reason code (ours or a
# rule's), a short lower-case word. Anything else is "other".
_CODE = re.compile(r"^[A-Z0-9][A-Z0-9-]{0,31}$")
_WORD = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
# Sessions whose outcome is being followed; bounded against a leak (a
# session that never closes): beyond it the table starts again.
MAX_TRACKED = 100_000
# Fact gathering: DNS answers in ms, a stage budget is seconds.
FACT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Relay: a small message takes ms, a 35 MB one seconds; Postfix's
# smtpd_proxy_timeout (100 s) bounds one upstream reply.
RELAY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Which facts tell whether a source's lookup answered (ok/none) or failed (unknown).
SOURCE_STATUS: dict[str, str] = {
    "rdns": "rdns", "dnsbl": "dnsbl", "helo": "helo_resolves", "geo": "country", "os": "os",
    "dkim": "dkim",
}
# Event-name prefixes of the screen (pregreet test, session limits).
SCREEN_PREFIXES = ("pregreet", "limit", "limits", "screen", "rate", "busy")


def _code(value: Any) -> str:
    text = str(value or "")
    return text if _CODE.match(text) else "other"


def _word(value: Any, allowed: Iterable[str] | None = None) -> str:
    text = str(value or "").lower()
    if allowed is not None:
        return text if text in allowed else "other"
    return text if _WORD.match(text) else "other"


class Metrics:
    """The counters of one process, in a registry of their own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # No `_created` series beside each counter: noise for a scrape of
        # one process that says its start time anyway (process-wide switch).
        disable_created_metrics()
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.sessions = Counter(f"{PREFIX}_sessions", "Sessions closed, by outcome "
                                "(delivered, refused, deferred, closed) and the stage of the last refusal",
                                ["outcome", "stage"], registry=r)
        self.refusals = Counter(f"{PREFIX}_refusals", "Refusals (reject: 5xx, defer: 4xx) by reason code and stage",
                                ["reason", "stage", "kind"], registry=r)
        self.messages = Counter(f"{PREFIX}_relayed_messages", "Messages the upstream MTA accepted", registry=r)
        self.bytes = Counter(f"{PREFIX}_relayed_bytes", "Bytes of the messages the upstream MTA accepted",
                             registry=r)
        self.recipients = Counter(f"{PREFIX}_relayed_recipients", "Recipients of the relayed messages",
                                  registry=r)
        self.upstream_refusals = Counter(f"{PREFIX}_upstream_refusals", "Replies of the upstream MTA that "
                                         "refused, forwarded to the client, by stage", ["stage"], registry=r)
        self.upstream_errors = Counter(f"{PREFIX}_upstream_errors", "Upstream failures by kind "
                                       "(connect, ehlo, starttls, tls, mail, rcpt, data, end-of-data)",
                                       ["kind"], registry=r)
        self.lookups = Counter(f"{PREFIX}_source_lookups", "Fact lookups by source and result "
                               "(ok, none, unknown = failed)", ["source", "result"], registry=r)
        self.graylist = Counter(f"{PREFIX}_graylist", "Graylist outcomes per recipient "
                                "(new, deferred = too early, passed, allowed, trapped, unknown)",
                                ["outcome"], registry=r)
        self.screen = Counter(f"{PREFIX}_screen", "Results of the screen's tests: pregreet pass/fail, "
                              "limits refused per limit",
                              ["test", "result"], registry=r)
        self.internal = Counter(f"{PREFIX}_internal_errors", "Sessions that met an internal error", registry=r)
        self.fact_seconds = Histogram(f"{PREFIX}_fact_gathering_seconds", "Time to gather a stage's facts",
                                      ["stage"], buckets=FACT_BUCKETS, registry=r)
        self.relay_seconds = Histogram(f"{PREFIX}_relay_seconds", "Time from DATA's end to the upstream's "
                                       "reply", buckets=RELAY_BUCKETS, registry=r)
        self.upstream_up = Gauge(f"{PREFIX}_upstream_up", "1 when the upstream MTA answered the last "
                                 "health check", registry=r)
        self._open: dict[str, tuple[str, str]] = {}   # session id -> (kind, stage) of its last refusal
        self.handlers: dict[str, Callable[[Mapping[str, Any]], None]] = {
            "reject": lambda f: self._refusal("reject", f),
            "defer": lambda f: self._refusal("defer", f),
            "graylist.defer": lambda f: self._refusal("defer", {**f, "reason": "GRAYLIST", "stage": "rcpt"}),
            "relay.accepted": self._relayed,
            "relay.refused": lambda f: self._upstream_refused("data", f),
            "relay.rcpt_refused": lambda f: self._upstream_refused("rcpt", f),
            "relay.mail_refused": lambda f: self._upstream_refused("mail", f),
            "upstream.error": lambda f: self.upstream_errors.labels(_word(f.get("kind"))).inc(),
            "internal_error": lambda f: self.internal.inc(),
            "close": self._closed,
        }
        self._callbacks: list[Callable[[], Iterable[Any]]] = []
        self.registry.register(_Callbacks(self._callbacks))

    # --- the event hook --------------------------------------------------------

    def on_event(self, name: str, fields: Mapping[str, Any]) -> None:
        handler = self.handlers.get(name)
        if handler is not None:
            handler(fields)
        elif name.startswith(SCREEN_PREFIXES) and "." in name and not name.endswith("error"):
            test, _, result = name.partition(".")
            self.screen.labels(_word(test), _word(result)).inc()

    def _refusal(self, kind: str, f: Mapping[str, Any]) -> None:
        stage = _word(f.get("stage"), STAGES)
        self.refusals.labels(_code(f.get("reason")), stage, kind).inc()
        if stage == "screen":
            # refused by a limit before any session began: no `close` line follows
            self.screen.labels("limits", _word(f.get("rule"), LIMITS)).inc()
            self.sessions.labels("deferred", stage).inc()
            return
        if f.get("action") == "drop":
            # postscreen's drop: 521 and the connection closed, no `close` line follows
            self.sessions.labels("refused", stage).inc()
            return
        session = f.get("session")
        if session:
            if len(self._open) >= MAX_TRACKED:
                self._open.clear()
            self._open[str(session)] = (kind, stage)

    def _relayed(self, f: Mapping[str, Any]) -> None:
        self.messages.inc()
        size, rcpts, seconds = f.get("size"), f.get("rcpts"), f.get("seconds")
        if isinstance(size, int):
            self.bytes.inc(size)
        if isinstance(rcpts, int):
            self.recipients.inc(rcpts)
        if isinstance(seconds, (int, float)):
            self.relay_seconds.observe(seconds)

    def _upstream_refused(self, stage: str, f: Mapping[str, Any]) -> None:
        self.upstream_refusals.labels(stage).inc()
        seconds = f.get("seconds")
        if stage == "data" and isinstance(seconds, (int, float)):
            self.relay_seconds.observe(seconds)

    def _closed(self, f: Mapping[str, Any]) -> None:
        last = self._open.pop(str(f.get("session") or ""), None)
        messages = f.get("messages")
        if isinstance(messages, int) and messages > 0:
            self.sessions.labels("delivered", "data").inc()
        elif last is not None:
            kind, stage = last
            self.sessions.labels("refused" if kind == "reject" else "deferred", stage).inc()
        else:
            self.sessions.labels("closed", "none").inc()

    # --- direct observations ------------------------------------------------------

    def facts(self, stage: str, seconds: float, facts: Mapping[str, Any]) -> None:
        self.fact_seconds.labels(_word(stage, STAGES)).observe(seconds)
        for source, fact in SOURCE_STATUS.items():
            if fact not in facts:
                continue
            value = facts[fact]
            result = "unknown" if value == "unknown" else ("none" if value in ("none", None, "", False)
                                                           else "ok")
            self.lookups.labels(source, result).inc()

    # --- scrape-time values ---------------------------------------------------------

    def add_callback(self, fn: Callable[[], Iterable[Any]]) -> None:
        """`fn()` yields metric families at each scrape (open sessions, resolver counters)."""
        self._callbacks.append(fn)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # --- installation -------------------------------------------------------------

    def install(self) -> "Metrics":
        """Count from now on: the log hook and the direct observations reach this instance."""
        global _current
        _current = self
        log.subscribe(self.on_event)
        return self

    def close(self) -> None:
        global _current
        log.unsubscribe(self.on_event)
        if _current is self:
            _current = None


class _Callbacks:
    """A collector that asks its callbacks at scrape time."""

    def __init__(self, callbacks: list[Callable[[], Iterable[Any]]]) -> None:
        self._callbacks = callbacks

    def collect(self) -> Iterable[Any]:
        for fn in self._callbacks:
            yield from fn()

    def describe(self) -> Iterable[Any]:
        return ()


def resolver_families(stats: Callable[[], Any]) -> Callable[[], Iterable[Any]]:
    """The resolver's own counters (adapters/dns.py ResolverStats) as metric families."""
    def collect() -> Iterable[Any]:
        s = stats()
        for name, attr, doc in (
            ("dns_lookups", "lookups", "DNS lookups asked of the resolver"),
            ("dns_queries", "queries", "DNS queries sent to the nameservers (cache misses)"),
            ("dns_cache_hits", "cache_hits", "DNS lookups answered from the cache"),
            ("dns_failures", "failures", "DNS queries that failed (timeout, SERVFAIL, refused ...)"),
            ("dns_over_budget", "over_budget", "DNS lookups refused because a session's budget was spent"),
        ):
            if hasattr(s, attr):
                yield CounterMetricFamily(f"{PREFIX}_{name}", doc, value=getattr(s, attr))
        if hasattr(s, "cache_entries"):
            yield GaugeMetricFamily(f"{PREFIX}_dns_cache_entries", "Answers in the DNS cache",
                                    value=s.cache_entries)
    return collect


def gauge_family(name: str, doc: str, value: Callable[[], float]) -> Callable[[], Iterable[Any]]:
    def collect() -> Iterable[Any]:
        yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value())
    return collect


_current: Metrics | None = None


def observe_facts(stage: str, seconds: float, facts: Mapping[str, Any]) -> None:
    """The facts of one stage, gathered in `seconds` (session.py); nothing when not counting."""
    if _current is not None:
        _current.facts(stage, seconds, facts)


def observe_graylist(outcome: Any) -> None:
    """One recipient's graylist state (services.py); nothing when not counting."""
    if _current is not None:
        _current.graylist.labels(_word(outcome, ("new", "deferred", "passed", "allowed", "trapped",
                                                 "unknown"))).inc()


def observe_pregreet(talked_early: Any) -> None:
    """The screen's pregreet test for one client (services.py, at the connect decision):
    `fail` when it talked before the greeting, `pass` when it waited."""
    if _current is not None and isinstance(talked_early, bool):
        _current.screen.labels("pregreet", "fail" if talked_early else "pass").inc()
