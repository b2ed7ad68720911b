"""Housekeeping: what runs on timers, never inside a client's session."""

from __future__ import annotations

import asyncio
from typing import Any

from smtpguard import config as cfg
from smtpguard.services import Services, _redacted, build_services
from tests.fixtures_smtp import Guard, Recorder, wait_for


def test_expired_state_is_purged_hourly_by_housekeeping() -> None:
    now = [1_000_000.0]
    config = cfg.build({"state": {"url": "memory://"}, "rule": [{"name": "g", "action": "graylist"}]},
                       {"upstream": "127.0.0.1:1", "domain": ["example.test"], "hostname": "mx.example.test"})
    services: Services = build_services(config)
    services.clock = lambda: now[0]
    store = services.store
    assert store is not None

    async def go() -> tuple[int, int]:
        await store.set("grey:t:x", "v", expires_at=now[0] + 10, now=now[0])
        await services.housekeeping()            # first run: nothing expired yet
        now[0] += 60
        await services.housekeeping()            # within the hour: no purge
        left_within_hour = _count(store)
        now[0] += Services.PURGE_EVERY
        await services.housekeeping()            # an hour on: purged
        return left_within_hour, await store.purge(now=now[0])

    left, purged_after = asyncio.run(go())
    assert left == 1 and purged_after == 0


def _count(store: Any) -> int:
    """Rows still stored, expired or not (MemoryStore keeps them until purged)."""
    return len(store._data)  # noqa: SLF001 - the memory store's own table


def test_idle_upstream_connections_are_closed_after_idle_time(recorder: Recorder, guard_factory: Any) -> None:
    g: Guard = guard_factory({"upstream": {"idle_time": "0.2s"}}, upstream=recorder.address)
    import smtplib
    with smtplib.SMTP(g.host, g.port, timeout=10) as s:
        s.sendmail("a@sender.test", ["b@example.test"], b"Subject: x\r\n\r\nbody\r\n")
    assert len(g.services.upstream._idle) == 1
    wait_for(lambda: (g._loop.run(g.services.housekeeping()), not g.services.upstream._idle)[1], interval=0.05)


def test_store_urls_are_logged_without_passwords() -> None:
    assert _redacted("redis://:s3cret@10.0.0.5:6379/0") == "redis://***@10.0.0.5:6379/0"
    assert _redacted("sqlite:///var/lib/smtpguard/state.db") == "sqlite:///var/lib/smtpguard/state.db"
