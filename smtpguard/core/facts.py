"""What a session knows about its client: one flat, named mapping of facts.

Every fact source returns a frozen result type with a `status` and an
`as_facts()` that flattens it to the names it declares (its SourceSpec,
below); the policy reads only
that mapping. `None` never means "the lookup failed": a failed lookup is the
value UNKNOWN, so rules can tempfail on a DNS outage instead of rejecting.

Every name a rule may use is declared once, as a FactSpec: the session's
own facts (ip, helo, sender ...) in core.tables.CORE_FACTS, each source's
in its SourceSpec at the top of its module. core.tables.fact_table joins
them into the FactTable the rule parser checks rules against (the config
loader refuses a rule that names anything else); sources/registry.py
builds the table of the shipped sources (FACTS, FACT_STAGE, ENUM_VALUES).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Mapping, Protocol, Union

# The three answers every lookup can give (DESIGN.md: a failed lookup is a
# fact value, not an exception).
OK = "ok"          # answered
NONE = "none"      # nothing there (NXDOMAIN, no PTR, no zone lists the IP)
UNKNOWN = "unknown"  # could not tell (timeout, SERVFAIL, store down, no SYN)

FactValue = Union[str, int, float, bool, tuple[str, ...], None]


class Kind(enum.Enum):
    """How a rule condition compares a fact."""

    TEXT = "text"      # equality / membership, case-insensitive
    BOOL = "bool"      # true / false (or "unknown")
    NUMBER = "number"  # numeric comparison: _gt, _ge, _lt, _le
    LIST = "list"      # membership of any element
    IP = "ip"          # the client address: CIDR membership


@dataclass(frozen=True, slots=True)
class FactSpec:
    """One fact a rule may name: its kind and, when enumerated, its values."""

    name: str
    kind: Kind
    # An enumerated TEXT fact's values, so that a misspelt value in a rule is
    # an error ("unknown" is always allowed); empty: any text.
    values: frozenset[str] = frozenset()
    # The earliest stage the fact is known at; "" for a source's facts,
    # which are known from the stage their source runs at.
    stage: str = ""
    # A domain name (TEXT): compared without a trailing dot, and a rule's
    # `.example.com` entry matches every name below example.com.
    domain: bool = False


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """A fact source's declaration: what it provides, when, from which settings.

    Each module of smtpguard/sources/ starts with one (`SOURCE = SourceSpec(...)`)
    and defines `async def gather_facts(ctx)`; sources/registry.py lists the
    modules, and the fact table, the config areas and the stage loop are
    derived from the list (docs/adding-a-fact.md)."""

    name: str                        # the source's name: services.run, metrics, the log
    stage: str                       # the stage its gather runs at (core.tables.STAGES)
    facts: tuple[FactSpec, ...]      # the facts its result's as_facts() returns
    area: str = ""                   # its config table ([geo]); "" when it has no settings
    # Sources whose results its gather reads (helo reads rdns): they run
    # whenever this one does, at their own stage, which is not a later one;
    # or, with `needed_for`, only when a rule reads one of those facts of
    # this source (helo needs rdns for helo_matches_rdns alone).
    needs: tuple[str, ...] = ()
    needed_for: tuple[str, ...] = ()
    # Runs whether or not a rule reads its facts (dkim: the MTA always gets
    # an Authentication-Results header).
    always: bool = False
    # Its gather keeps the stage budget itself and returns what it knew by
    # then (helo's syntax facts, dkim's per-signature results): the stage
    # loop does not cancel it at the deadline.
    own_deadline: bool = False
    # No gather in the stage loop: the session asks for it (graylist, per
    # recipient); its facts are still declared here.
    on_demand: bool = False
    # A later stage at which the module's `revise(ctx, result)` revises the
    # result from what the session learnt since, without lookups (rdns: the
    # HELO name, issue 14), and the facts that may change then.
    revise_at: str = ""
    revises: tuple[str, ...] = ()

    def fact_names(self) -> frozenset[str]:
        return frozenset(f.name for f in self.facts)


class Gathered(Protocol):
    """What a source's gather returns: a frozen result flattened by as_facts()."""

    def as_facts(self) -> Mapping[str, FactValue]: ...


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """The connection as the session sees it; built once, never mutated."""

    session_id: str
    ip: str                      # the real client (after a PROXY header, if any)
    port: int
    local_ip: str = ""
    local_port: int = 0
    syn: bytes | None = None     # raw IP+TCP header of the client's SYN (TCP_SAVED_SYN)
    via_proxy: bool = False      # arrived through the PROXY protocol: the SYN is not the client's
