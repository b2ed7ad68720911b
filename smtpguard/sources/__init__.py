"""Fact sources: one module per source, each with the same two entry points.

Decides:
    nothing; it defines what every source module is given. A source module
    starts with its declaration, `SOURCE = SourceSpec(...)` (core.facts: its
    name, stage, config area, the facts it provides with their kinds and
    values), and defines `async def gather_facts(ctx: Context)`, returning
    its frozen result (with `as_facts()`) or None when it has nothing to say
    for this client (no country data loaded, no DNS list configured, no
    message). A source with a config area also defines
    `read_settings(raw)`, its table (or array of tables) from the TOML
    document validated into its settings object. sources/registry.py lists
    the modules; docs/adding-a-fact.md walks through adding one.
Inputs:
    Context, built by the stage loop (services.py) once per source and stage.
Output:
    none of its own.
Failure modes:
    none here; each source's own docstring says how its lookups fail (as
    values, never exceptions).
Defaults and why:
    none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from smtpguard.core.facts import ClientInfo
from smtpguard.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Context:
    """What one source's `gather_facts` gets: the client, what the session
    knows so far, the session's resolver and the stage's budget."""

    client: ClientInfo
    stage: str                     # the stage being gathered (the source's own)
    # The session's resolver (adapters.dns.SessionResolver): its lookups
    # spend the session's DNS budget and its log lines carry the session id.
    resolver: Any
    budget: float                  # seconds for the whole stage ([dns] stage_budget)
    settings: Any = None           # this source's settings (its config area), None without one
    # Results of the sources that ran at earlier stages of this session, by
    # source name (helo reads results["rdns"]).
    results: Mapping[str, Any] = field(default_factory=dict)
    helo: str = ""                 # the HELO/EHLO argument, from the helo stage on
    message: bytes | None = None   # the message as received, at the data stage
    config: Any = None             # the whole Config, for what sources share ([server] hostname)
    # What the process loaded at start (or on reload) for the sources that
    # need it: the country data, the OS signatures, who we are (helo_is_us).
    geodb: Any = None
    signatures: Any = None
    us: Any = None
    # The facts the policy reads, so that a source can skip a lookup no rule
    # needs (helo: the name's addresses; dkim: the From: domain); None: every
    # fact (`smtpguard check`).
    wanted: frozenset[str] | None = None


def table(raw: Any, area: str) -> Mapping[str, Any]:
    """A source's config table for its `read_settings`: {} when absent."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(area, "expected a table")
    return raw
