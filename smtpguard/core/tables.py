"""The policy's tables: stages, actions, reply codes, facts' stages and values.

Decides:
    nothing by itself; it is the one place that names what the rule
    language and the evaluator agree on (core.rules parses against these
    tables, core.policy decides with them): the SMTP stages and their order,
    the actions, the reply code of each refusal, the reason and text a rule
    gets when it names none, what an accept covers, the session's own facts
    (CORE_FACTS), the operators; and `fact_table`, which joins CORE_FACTS
    with the sources' declarations into the FactTable rules are checked
    against (each fact's kind, earliest stage and enumerated values).
Inputs:
    none: constants; `fact_table(sources)` takes the sources' SourceSpecs
    (sources/registry.py passes them in: the core never imports a source).
Output:
    read-only tables (tuples, frozensets, dicts nobody mutates).
Failure modes:
    none at run time; `fact_table` raises ValueError for contradictory
    declarations (a fact declared twice), at import of the registry.
Defaults and why:
    each value carries its reason beside it (RFC 5321, RFC 3463, RFC 7504,
    spamd(8), Postfix's smtpd_delay_reject and postscreen).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from smtpguard.core.facts import FactSpec, FactValue, Kind, SourceSpec

# SMTP order (RFC 5321 §3.3); data is the end of DATA.
STAGES: tuple[str, ...] = ("connect", "helo", "mail", "rcpt", "data")
STAGE_INDEX: dict[str, int] = {s: i for i, s in enumerate(STAGES)}

# Rules default to rcpt: every connection and envelope fact is known there
# and it is where Postfix evaluates restrictions (smtpd_delay_reject = yes).
DEFAULT_STAGE = "rcpt"

ACTIONS: tuple[str, ...] = ("reject", "tempfail", "graylist", "tarpit", "accept", "continue", "drop")
# Actions carried out at once, never held back (postscreen's `drop`: 521
# and close): by the screen at connect, by the session at a later stage.
IMMEDIATE: frozenset[str] = frozenset({"drop"})
# Actions that refuse and may be held back to RCPT.
REFUSALS: frozenset[str] = frozenset({"reject", "tempfail"})
# Stages whose refusals reject_at = "rcpt" holds back to RCPT.
DEFERRABLE_STAGES: frozenset[str] = frozenset({"connect", "helo", "mail"})
REJECT_AT: tuple[str, ...] = ("rcpt", "connect")

# action -> (code, enhanced code) of its reply when the reason code has none
# of the same class. RFC 5321 §4.2.2/§4.2.3; RFC 3463 §3.8 X.7.1 "delivery
# not authorized, message refused". Graylisting answers 451 as spamd does
# (RFC 6647 §2.1: any 4xx). The other actions write no reply of their own.
REPLY_CODES: dict[str, tuple[int, str]] = {
    "reject": (550, "5.7.1"),
    "tempfail": (451, "4.7.1"),
    "graylist": (451, "4.7.1"),
    # postscreen's drop: RFC 7504 §3 521 "does not accept mail", then close.
    "drop": (521, "5.7.1"),
}
# At the greeting only 554 (refused) and 421 (closing) are valid replies
# (RFC 5321 §3.1, §4.3.2); used when reject_at = "connect".
CONNECT_REPLY_CODES: dict[int, int] = {5: 554, 4: 421}

# action -> reason code when a rule gives none.
DEFAULT_REASONS: dict[str, str] = {
    "reject": "POLICY",
    "tempfail": "TEMP",
    "graylist": "GRAYLIST",
    "tarpit": "TARPIT",
    "accept": "ACCEPT",
    "continue": "MATCH",
    "drop": "POLICY",
}
# action -> text when neither the rule nor reply.REASONS has one.
DEFAULT_TEXTS: dict[str, str] = {
    "reject": "refused by local policy",
    "tempfail": "temporarily refused by local policy, try again later",
    "graylist": "graylisted, try again later",
    "drop": "refused by local policy",
}

# What an accept covers, by the stage that decided it.
ACCEPT_SCOPE: dict[str, str] = {
    "connect": "session",
    "helo": "session",
    "mail": "transaction",
    "rcpt": "recipient",
    "data": "message",
}
STICKY_SCOPES: frozenset[str] = frozenset({"session", "transaction"})

# Graylist states that satisfy a graylist rule; the others are answered by
# the session from the state (module docstring).
GRAYLIST_PASSED: frozenset[str] = frozenset({"passed", "allowed"})

# spamd(8) -S: stutter for the first 10 seconds.
DEFAULT_TARPIT_DELAY = 10.0
# Below RFC 5321 §4.5.3.2's shortest client timeout (DATA initiation: 2 min).
MAX_TARPIT_DELAY = 119.0

# The session's own facts, known without a source: the connection, the
# HELO name as sent, the envelope, the screen's pregreet test. A source's
# facts are declared in its module (smtpguard/sources/, SourceSpec) and
# joined with these by fact_table(). Each is known from its stage on
# (DESIGN.md: the envelope at mail and rcpt).
CORE_FACTS: tuple[FactSpec, ...] = (
    FactSpec("ip", Kind.IP, stage="connect"),
    FactSpec("port", Kind.NUMBER, stage="connect"),
    FactSpec("tls", Kind.BOOL, stage="connect"),
    # RFC 5321 §4.1.4: a mismatch alone is never grounds to reject (the helo source's facts)
    FactSpec("helo", Kind.TEXT, stage="helo", domain=True),
    FactSpec("sender", Kind.TEXT, stage="mail"),
    FactSpec("sender_domain", Kind.TEXT, stage="mail", domain=True),
    FactSpec("rcpt", Kind.TEXT, stage="rcpt"),
    FactSpec("rcpt_domain", Kind.TEXT, stage="rcpt", domain=True),
    # the screen: talked before the greeting's last line; unknown when not tested
    FactSpec("pregreet", Kind.BOOL, stage="connect"),
)


@dataclass(frozen=True, slots=True)
class FactTable:
    """Every fact a rule may name, from the core's and the sources' declarations.

    Built once by fact_table() (sources/registry.py for the shipped
    sources); core.rules checks rules against it. Read-only mappings."""

    kinds: Mapping[str, Kind]              # fact -> kind (FACTS)
    stages: Mapping[str, str]              # fact -> earliest stage it is known at (FACT_STAGE)
    values: Mapping[str, frozenset[str]]   # enumerated fact -> its values (ENUM_VALUES)
    sources: Mapping[str, frozenset[str]]  # source -> the facts it provides (SOURCE_FACTS)
    domains: frozenset[str] = frozenset()  # the domain-name facts (FactSpec.domain)

    def __contains__(self, name: object) -> bool:
        return name in self.kinds


def fact_table(sources: Iterable[SourceSpec], core: Iterable[FactSpec] = CORE_FACTS) -> FactTable:
    """Join the core's facts and the sources' declarations into one table.

    A declaration that contradicts another (a fact or source named twice,
    an unknown stage, a need of a later or unknown source, values on a
    fact that is not TEXT) raises ValueError: a programming error, found by
    the registry's import and its tests, never by an admin."""
    kinds: dict[str, Kind] = {}
    stages: dict[str, str] = {}
    values: dict[str, frozenset[str]] = {}
    provides: dict[str, frozenset[str]] = {}
    domains: set[str] = set()
    specs = list(sources)

    def add(fact: FactSpec, stage: str, owner: str) -> None:
        if fact.name in kinds or fact.name in DERIVED_FACTS:
            raise ValueError(f"{owner}: fact {fact.name!r} is declared twice")
        if stage not in STAGE_INDEX:
            raise ValueError(f"{owner}: fact {fact.name!r} has unknown stage {stage!r}")
        if (fact.values or fact.domain) and fact.kind is not Kind.TEXT:
            raise ValueError(f"{owner}: fact {fact.name!r} has values or is a domain but is not a text fact")
        kinds[fact.name] = fact.kind
        stages[fact.name] = stage
        if fact.values:
            values[fact.name] = frozenset(fact.values)
        if fact.domain:
            domains.add(fact.name)

    for fact in core:
        add(fact, fact.stage, "core")
    by_name: dict[str, SourceSpec] = {}
    for spec in specs:
        if spec.name in by_name:
            raise ValueError(f"source {spec.name!r} is declared twice")
        if spec.stage not in STAGE_INDEX:
            raise ValueError(f"source {spec.name!r}: unknown stage {spec.stage!r}")
        by_name[spec.name] = spec
        for fact in spec.facts:
            add(fact, fact.stage or spec.stage, f"source {spec.name!r}")
        provides[spec.name] = spec.fact_names()
    for spec in specs:
        if spec.revise_at and (spec.revise_at not in STAGE_INDEX
                               or STAGE_INDEX[spec.revise_at] <= STAGE_INDEX[spec.stage]):
            raise ValueError(f"source {spec.name!r}: revise_at {spec.revise_at!r} is not a later stage")
        if not set(spec.revises) <= spec.fact_names():
            raise ValueError(f"source {spec.name!r} revises facts it does not provide")
        if not set(spec.needed_for) <= spec.fact_names() or (spec.needed_for and not spec.needs):
            raise ValueError(f"source {spec.name!r}: needed_for names facts it does not provide, "
                             "or no source it needs")
        for need in spec.needs:
            other = by_name.get(need)
            if other is None or STAGE_INDEX[other.stage] > STAGE_INDEX[spec.stage]:
                raise ValueError(f"source {spec.name!r} needs {need!r}, which is not a source "
                                 "of its stage or an earlier one")
    return FactTable(kinds=kinds, stages=stages, values=values, sources=provides, domains=frozenset(domains))


def _local_part(value: FactValue) -> FactValue:
    """The local part of an address (`Postmaster` alone is its own, RFC 5321 §4.5.1)."""
    if not isinstance(value, str):
        return value
    local, at, _ = value.strip("<>").rpartition("@")
    return local if at else value.strip("<>")


# Facts computed from another: name -> (source fact, kind, function).
DERIVED_FACTS: dict[str, tuple[str, Kind, Callable[[FactValue], FactValue]]] = {
    "rcpt_local": ("rcpt", Kind.TEXT, _local_part),
    "sender_local": ("sender", Kind.TEXT, _local_part),
}

COUNTRY_SPECIAL: frozenset[str] = frozenset({"local", "unknown"})

# Operator suffix -> (operator, what it takes). Longest suffix first when
# splitting a key, so `os_match_not_in` is os_match + _not_in.
OPERATORS: dict[str, tuple[str, str]] = {
    "": ("in", "scalar"),
    "_in": ("in", "list"),
    "_not": ("not_in", "scalar"),
    "_not_in": ("not_in", "list"),
    "_gt": ("gt", "number"),
    "_ge": ("ge", "number"),
    "_lt": ("lt", "number"),
    "_le": ("le", "number"),
}

# The keys of a [[rule]] table and of [policy] (core.rules rejects others).
RULE_KEYS: tuple[str, ...] = ("name", "stage", "when", "action", "reason", "text",
                              "observe", "strict", "delay")
POLICY_KEYS: tuple[str, ...] = ("observe", "reject_at", "default_postmaster")

# [geo] unknown: what to do with an address that no zone lists, as an
# action, or in the words of GeoSettings (sources/geo.py): allow, deny.
GEO_UNKNOWN_ACTIONS: dict[str, str] = {
    "continue": "continue", "allow": "continue",
    "tempfail": "tempfail",
    "reject": "reject", "deny": "reject",
}

