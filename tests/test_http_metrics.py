"""The metrics' event hook (observe/log.py subscribe, observe/metrics.py): counted whatever
the log level, a failing subscriber never reaches a session, labels stay bounded."""

from __future__ import annotations

import io
import logging
from typing import Any, Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from smtpguard.observe import log
from smtpguard.observe.metrics import Metrics, observe_facts, observe_graylist


@pytest.fixture(autouse=True)
def logger_as_it_was() -> Iterator[None]:
    """These tests set the log level: the logger is given back as it was."""
    logger = logging.getLogger("smtpguard")
    handlers, level = list(logger.handlers), logger.level
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)


@pytest.fixture
def counting() -> Iterator[Metrics]:
    m = Metrics().install()
    yield m
    m.close()


def sample(m: Metrics, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return float(s.value)
    return 0.0


def test_events_are_counted_whatever_the_log_level(counting: Metrics) -> None:
    stream = io.StringIO()
    log.setup("text", "error", stream=stream)
    log.event("reject", session="a1", stage="rcpt", reason="RELAY", action="reject")
    log.event("close", session="a1", messages=0, refusals=1)
    assert stream.getvalue() == ""   # nothing logged at level error ...
    assert sample(counting, "smtpguard_refusals_total", reason="RELAY", stage="rcpt", kind="reject") == 1
    assert sample(counting, "smtpguard_sessions_total", outcome="refused", stage="rcpt") == 1   # ... all counted


def test_a_failing_subscriber_is_logged_and_the_caller_goes_on() -> None:
    stream = io.StringIO()
    log.setup("text", "info", stream=stream)

    def broken(name: str, fields: dict[str, Any]) -> None:
        raise ValueError("a bug in counting")

    log.subscribe(broken)
    try:
        log.event("relay.accepted", session="b2", size=10, rcpts=1)   # must not raise
    finally:
        log.unsubscribe(broken)
    text = stream.getvalue()
    assert "subscriber.error" in text and "ValueError: a bug in counting" in text
    assert "relay.accepted" in text   # the event itself was still logged


def test_after_close_nothing_is_counted() -> None:
    m = Metrics().install()
    m.close()
    log.event("relay.accepted", session="c3", size=10, rcpts=1)
    observe_graylist("new")
    observe_facts("connect", 0.01, {"rdns": "unknown"})
    assert sample(m, "smtpguard_relayed_messages_total") == 0
    assert sample(m, "smtpguard_graylist_total", outcome="new") == 0


def test_label_values_outside_their_sets_are_other(counting: Metrics) -> None:
    log.event("reject", session="d4", stage="<script>", reason="bad reason\n", action="reject")
    log.event("upstream.error", kind="Some Exception Text: 192.0.2.1")
    observe_graylist("a very strange state")
    assert sample(counting, "smtpguard_refusals_total", reason="other", stage="other", kind="reject") == 1
    assert sample(counting, "smtpguard_upstream_errors_total", kind="other") == 1
    assert sample(counting, "smtpguard_graylist_total", outcome="other") == 1


@pytest.mark.parametrize("facts, source, result", [
    ({"rdns": "confirmed"}, "rdns", "ok"),
    ({"rdns": "none"}, "rdns", "none"),
    ({"rdns": "unknown"}, "rdns", "unknown"),
    ({"dnsbl": "listed"}, "dnsbl", "ok"),
    ({"country": "unknown"}, "geo", "unknown"),
    ({"helo_resolves": False}, "helo", "none"),
], ids=["a confirmed rDNS answered", "no PTR is none", "a failed PTR lookup is unknown",
        "a listing answered", "an unknown country failed", "a HELO that does not resolve is none"])
def test_source_lookups_by_result(counting: Metrics, facts: dict[str, Any], source: str, result: str) -> None:
    observe_facts("connect", 0.02, facts)
    assert sample(counting, "smtpguard_source_lookups_total", source=source, result=result) == 1
    assert sample(counting, "smtpguard_fact_gathering_seconds_count", stage="connect") == 1
    assert sample(counting, "smtpguard_fact_gathering_seconds_sum", stage="connect") == pytest.approx(0.02)


def test_a_refusal_without_a_close_does_not_grow_without_bound(counting: Metrics) -> None:
    from smtpguard.observe import metrics

    for i in range(3):
        log.event("defer", session=f"e{i}", stage="rcpt", reason="GRAYLIST", action="tempfail")
    assert len(counting._open) == 3
    log.event("close", session="e0", messages=0)
    assert len(counting._open) == 2 and metrics.MAX_TRACKED >= 10_000



def test_each_worker_takes_the_first_free_port_of_its_range() -> None:
    import socket

    from smtpguard.observe.http import bind_first_free
    from tests.fixtures_smtp import free_port

    first = bind_first_free("127.0.0.1", 0, 1)   # port 0: the kernel's choice, no range
    port = first.getsockname()[1]
    try:
        second = bind_first_free("127.0.0.1", port, 3)   # worker 2 of 3: the next port
        assert second.getsockname()[1] in (port + 1, port + 2)
        second.close()
    finally:
        first.close()
    taken = socket.socket()
    taken.bind(("127.0.0.1", free_port()))
    taken.listen(1)
    try:
        with pytest.raises(OSError) as e:
            bind_first_free("127.0.0.1", taken.getsockname()[1], 1)
        assert f"cannot listen for HTTP on 127.0.0.1:{taken.getsockname()[1]}" in str(e.value)
    finally:
        taken.close()


def test_http_listens_on_ipv6_loopback_too() -> None:
    import socket

    from smtpguard.observe.http import bind_first_free

    try:
        sock = bind_first_free("::1", 0, 1)
    except OSError as e:
        pytest.skip(f"no IPv6 loopback here: {e}")
    assert sock.family == socket.AF_INET6 and sock.getsockname()[0] == "::1"
    sock.close()
