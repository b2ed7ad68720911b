"""A fault-injecting upstream MTA for the two promises' tests.

A real aiosmtpd server on loopback that, at the n-th MAIL, RCPT, DATA or
end of DATA it sees (counted over all its connections), answers 421 and
closes, drops the connection without a word, stalls, or answers garbage.
It records the messages it accepted and knows which of its connections
were left in the middle of a transaction.
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass
from typing import Any, Iterator

import pytest
from aiosmtpd.smtp import SMTP

from tests.fixtures_smtp import LoopThread, free_port

FAULTS = ("421", "drop", "stall", "garbage")
POINTS = ("MAIL", "RCPT", "DATA", "EOD")


@dataclass
class Delivered:
    mail_from: str
    rcpts: list[str]
    content: bytes


class FaultySMTP(SMTP):
    def __init__(self, upstream: "FaultyUpstream", *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.upstream = upstream

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self.upstream.open.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.upstream.open.discard(self)
        super().connection_lost(exc)

    async def fault(self, point: str) -> bool:
        """Apply the planned fault for this occurrence of `point`; True when one was applied."""
        up = self.upstream
        up.counts[point] += 1
        kind = up.plan.get((point, up.counts[point]))
        if kind is None:
            return False
        up.applied.append((point, up.counts[point], kind))
        if kind == "421":
            await self.push("421 4.3.2 upstream going away")
            self.transport.close()
        elif kind == "drop":
            self.transport.close()
        elif kind == "stall":
            # An MTA that stops answering: smtpguard's upstream timeout must end it.
            await asyncio.sleep(3600)  # not synchronisation: the fault itself
        elif kind == "garbage":
            await self.push("this is not an SMTP reply")
        else:
            await self.push(kind)  # a plain reply such as "451 4.3.0 try later"
        return True

    async def smtp_MAIL(self, arg: str) -> None:
        if not await self.fault("MAIL"):
            await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str) -> None:
        if not await self.fault("RCPT"):
            await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        if not await self.fault("DATA"):
            await super().smtp_DATA(arg)


class FaultyUpstream:
    def __init__(self) -> None:
        self.host = "127.0.0.1"
        self.port = free_port()
        self.plan: dict[tuple[str, int], str] = {}
        self.counts: collections.Counter[str] = collections.Counter()
        self.applied: list[tuple[str, int, str]] = []
        self.messages: list[Delivered] = []
        self.open: set[FaultySMTP] = set()
        self._loop = LoopThread()
        self._server = self._loop.run(self._start())

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def fail(self, point: str, n: int, kind: str) -> None:
        self.plan[(point, n)] = kind

    def mid_transaction(self) -> int:
        """Open connections left between MAIL and the end of their transaction."""
        return sum(1 for p in list(self.open) if p.envelope is not None and p.envelope.mail_from is not None)

    async def _start(self) -> Any:
        up = self

        class Handler:
            async def handle_DATA(self, server: FaultySMTP, session: Any, envelope: Any) -> str:
                if await server.fault("EOD"):
                    return "250 2.0.0 never seen"  # the fault already answered or closed
                up.messages.append(Delivered(envelope.mail_from, list(envelope.rcpt_tos),
                                             envelope.original_content))
                return "250 2.0.0 Ok: queued"

        def factory() -> FaultySMTP:
            return FaultySMTP(up, Handler(), hostname="faulty.test", data_size_limit=None)

        return await asyncio.get_running_loop().create_server(factory, self.host, self.port)

    def stop(self) -> None:
        for p in list(self.open):
            self._loop.loop.call_soon_threadsafe(p.transport.close)
        self._loop.loop.call_soon_threadsafe(self._server.close)
        self._loop.stop()


@pytest.fixture
def faulty_upstream() -> Iterator[FaultyUpstream]:
    up = FaultyUpstream()
    yield up
    up.stop()
