"""The per-process composition root: config, upstream pool, fact sources, policy.

Built once at start (and again on SIGHUP); a session reaches every shared
part through it. It owns the order in which a stage's facts are gathered
and the deadline they share; the sources themselves decide nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from smtpguard.adapters.upstream import Upstream
from smtpguard.config import Config
from smtpguard.core.facts import FactValue

if TYPE_CHECKING:
    from smtpguard.session import ClientSession


class Services:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.upstream = Upstream(config.upstream, config.server.hostname)

    async def facts(self, stage: str, session: "ClientSession") -> dict[str, FactValue]:
        return {}

    def decide(self, stage: str, facts: dict[str, FactValue]) -> Any:
        return None

    async def graylist(self, session: "ClientSession", rcpt: str, strict: bool) -> dict[str, FactValue]:
        return {"graylist": "passed"}

    async def housekeeping(self) -> None:
        self.upstream.purge()

    async def close(self) -> None:
        await self.upstream.close()


def build_services(config: Config) -> Services:
    """Everything a session needs, validated before any socket is opened."""
    return Services(config)
