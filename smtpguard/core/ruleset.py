"""Compiled rules: a condition, a rule, a policy, and whether they match facts.

Decides:
    whether one `when` condition holds on a session's facts, whether a rule
    matches (all its conditions hold), and which rules run at each stage
    (`Policy.by_stage`, the built-in postmaster allowlist first at rcpt).
Inputs:
    the objects core.rules builds from TOML (`Condition`, `Rule`, `Policy`)
    and the flat fact mapping of core.facts.
Output:
    booleans; `Policy.facts(stage)`, the facts a stage's rules read.
Failure modes:
    none for odd fact values: a missing fact is UNKNOWN; a malformed client
    address matches neither a network nor its negation (core.policy's
    docstring: unknown and absent facts).
Defaults and why:
    `Policy.default_postmaster = True` and `reject_at = "rcpt"`: see
    core.policy. POSTMASTER_RULE is RFC 5321 §4.5.1 and RFC 2142 §2.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass, field
from typing import Callable, Mapping, Union

from smtpguard.core.facts import UNKNOWN, FactValue, Kind
from smtpguard.core.ip import unmapped
from smtpguard.core.tables import DERIVED_FACTS, STAGES

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def _fact_value(facts: Mapping[str, FactValue], name: str) -> FactValue:
    derived = DERIVED_FACTS.get(name)
    if derived is None:
        return facts.get(name, UNKNOWN)
    value = facts.get(derived[0], UNKNOWN)
    return value if _is_unknown(value) else derived[2](value)


def _is_unknown(value: FactValue) -> bool:
    return isinstance(value, str) and value == UNKNOWN


def _client_address(value: FactValue) -> tuple[int, int] | None:
    """(version, integer) of the client address; None when it is not one."""
    return _parse_address(value) if isinstance(value, str) else None


# Parsed once per client, not once per condition (a 200-rule CIDR policy
# spent most of its time in ipaddress.ip_address).
@functools.lru_cache(maxsize=4096)
def _parse_address(value: str) -> tuple[int, int] | None:
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        return None
    addr = unmapped(addr)
    return addr.version, int(addr)


_COMPARE: dict[str, Callable[[float, float], bool]] = {
    "gt": lambda a, b: a > b,
    "ge": lambda a, b: a >= b,
    "lt": lambda a, b: a < b,
    "le": lambda a, b: a <= b,
}


@dataclass(frozen=True, slots=True)
class Condition:
    """One `when` entry, its values normalised for the fact's kind."""

    key: str                     # as written: "country_not_in"
    fact: str
    op: str                      # in | not_in | gt | ge | lt | le
    kind: Kind
    texts: frozenset[str] = frozenset()      # TEXT, LIST: lower case
    suffixes: tuple[str, ...] = ()            # domain facts: ".example.com"
    numbers: tuple[float, ...] = ()
    bools: tuple[bool, ...] = ()
    networks: tuple[IPNetwork, ...] = ()
    unknown: bool = False                     # "unknown" is among the values
    domain: bool = False                      # a domain fact: no trailing dot, `suffixes` apply

    # IP networks as (version, first, last) integers, derived from `networks`.
    ranges: tuple[tuple[int, int, int], ...] = field(default=(), compare=False, repr=False)

    def holds(self, facts: Mapping[str, FactValue]) -> bool:
        value = _fact_value(facts, self.fact)
        if isinstance(value, str) and value == UNKNOWN:
            # Negation and comparison never hold on UNKNOWN: an outage must
            # not reject. Only an explicit "unknown" matches it.
            return self.op == "in" and self.unknown
        if self.op == "in":
            return value is not None and _MEMBER[self.kind](self, value)
        if self.op == "not_in":
            if value is None:
                return True
            if self.kind is Kind.IP and _client_address(value) is None:
                return False  # malformed: could not tell, so no negation holds
            return not _MEMBER[self.kind](self, value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return _COMPARE[self.op](float(value), self.numbers[0])


def _text_member(c: Condition, value: FactValue) -> bool:
    text = str(value).lower()
    if c.domain:
        text = text.rstrip(".")
        return text in c.texts or any(text.endswith(s) for s in c.suffixes)
    return text in c.texts


def _bool_member(c: Condition, value: FactValue) -> bool:
    return isinstance(value, bool) and value in c.bools


def _number_member(c: Condition, value: FactValue) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float))
            and float(value) in c.numbers)


def _list_member(c: Condition, value: FactValue) -> bool:
    items = value if isinstance(value, (tuple, list)) else ()
    return any(str(item).lower() in c.texts for item in items)


def _ip_member(c: Condition, value: FactValue) -> bool:
    addr = _client_address(value)
    if addr is None:
        return False
    version, number = addr
    for v, first, last in c.ranges:
        if v == version and first <= number <= last:
            return True
    return False


# How `f = value` compares, by the fact's kind.
_MEMBER: dict[Kind, Callable[[Condition, FactValue], bool]] = {
    Kind.TEXT: _text_member,
    Kind.BOOL: _bool_member,
    Kind.NUMBER: _number_member,
    Kind.LIST: _list_member,
    Kind.IP: _ip_member,
}


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    stage: str
    action: str
    when: tuple[Condition, ...] = ()
    reason: str = ""
    text: str = ""
    observe: bool = False
    strict: bool = False
    delay: float = 0.0
    builtin: bool = False        # not written as [[rule]]: the postmaster allowlist

    def matches(self, facts: Mapping[str, FactValue]) -> bool:
        for condition in self.when:
            if not condition.holds(facts):
                return False
        return True

    @property
    def facts(self) -> frozenset[str]:
        """The facts (as the session gathers them) this rule reads."""
        return frozenset(DERIVED_FACTS[c.fact][0] if c.fact in DERIVED_FACTS else c.fact
                         for c in self.when)


@dataclass(frozen=True, slots=True)
class Policy:
    rules: tuple[Rule, ...] = ()             # [[rule]] in order, implicit ones after the connect accepts
    observe: bool = False
    reject_at: str = "rcpt"
    default_postmaster: bool = True
    # stage -> rules evaluated there, the postmaster allowlist first at rcpt.
    by_stage: Mapping[str, tuple[Rule, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        table = {s: tuple(r for r in self.rules if r.stage == s) for s in STAGES}
        if self.default_postmaster:
            table["rcpt"] = (POSTMASTER_RULE,) + table["rcpt"]
        object.__setattr__(self, "by_stage", table)

    def facts(self, stage: str | None = None) -> frozenset[str]:
        """Facts the rules read (of one stage, or all): the sources worth running."""
        stages = STAGES if stage is None else (stage,)
        out: frozenset[str] = frozenset()
        for s in stages:
            for rule in self.by_stage[s]:
                out |= rule.facts
        return out


# The built-in postmaster allowlist (Policy.default_postmaster): RCPT to
# postmaster@ (RFC 5321 §4.5.1, case-insensitive) or abuse@ (RFC 2142 §2).
# Written out as the parser would compile it (tests/test_policy.py checks
# that core.rules gives the same rule), so this module needs no parser.
POSTMASTER_RULE: Rule = Rule(
    name="postmaster", stage="rcpt", action="accept", reason="POSTMASTER", builtin=True,
    when=(Condition(key="rcpt_local_in", fact="rcpt_local", op="in", kind=Kind.TEXT,
                    texts=frozenset({"postmaster", "abuse"})),))
