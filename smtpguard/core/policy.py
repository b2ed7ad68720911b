"""Rules over facts: what the proxy does with a client at each SMTP stage.

Decides:
    the verdict for one stage of one session (connect, helo, mail, rcpt,
    data): refuse (reject, tempfail), defer unless graylisting has passed,
    slow down (tarpit), accept, or proceed; from ordered rules written in
    TOML, first match wins.
Inputs:
    `parse_policy(doc)` takes the whole TOML document ([policy], [lists] and
    the [[rule]] array) and returns a `Policy`; `geo_rules(allow, deny,
    unknown)` compiles the [geo] shorthand into rules the caller passes as
    `implicit` (they run after the written connect-stage accepts). `decide(policy, stage,
    facts, pending)` takes the stage, the flat fact mapping of
    `smtpguard.core.facts` and the refusal the session holds back, if any.
Output:
    `Verdict` (frozen): action, deciding rule, reason code and text,
    `strict`, `delay`, `sticky`, `deferred_to`, `needs`, and the rules that
    matched without deciding (`observed`, `matched`). `reply_code(action,
    reason, stage)` gives the SMTP code pair of a refusal.
Failure modes:
    every mistake in the configuration raises ConfigError at start, its key
    naming the rule and the key in it (`rule[3] "foreign-windows".when.cuntry:
    unknown fact; known facts: ...`). `decide` never raises for odd fact
    values: a missing fact is UNKNOWN; a malformed client address matches
    neither a network nor its negation. An unknown stage passed to `decide`
    is a programming error (ValueError).
Defaults and why:
    * `reject_at = "rcpt"`: refusals decided at connect, helo or mail are
      held back and issued at RCPT, as Postfix does with smtpd_delay_reject
      = yes and postscreen with `enforce`: the log then shows sender and
      recipient, clients that take a refused greeting for a temporary
      failure and retry get a RCPT refusal they bounce, and postmaster@
      stays reachable (below).
    * `default_postmaster = true`: RCPT to postmaster@ or abuse@ (any served
      domain, or the bare `Postmaster` of RFC 5321 §4.5.1) is accepted before
      any rule of the RCPT stage and before a held-back refusal, so that a
      refused sender can always reach a human (RFC 5321 §4.5.1, RFC 2142
      §2). That the domain is one we serve is checked before the policy, by
      the session: this allowlist never makes the proxy a relay.
    * Negation never matches an UNKNOWN fact, so a DNS outage never rejects;
      a rule can name `"unknown"` explicitly to tempfail instead.
    * `observe = false`: rules act. With observe (global or per rule) a
      matching rule is recorded with the action it would have taken and
      evaluation goes on as if it had not matched.
    * A graylist rule is satisfied only by "passed" or "allowed"; every
      other state (new, deferred, trapped, and unknown when the store cannot
      answer) ends evaluation with a graylist verdict, and the session maps
      the state to the reply (core.greylist: GREY, TRAP, or GREY-STORE
      unless `graylist.on_error = "accept"`): that setting, not the policy,
      owns what a store outage does.
    * tarpit `delay = "10s"`: spamd(8)'s stutter time (`-S 10`); at most
      119 s, below the shortest client timeout of RFC 5321 §4.5.3.2 (DATA
      initiation, 2 minutes).

The rule language
-----------------
    [lists]
    home = ["US", "CA", "MX"]

    [[rule]]
    name = "foreign-windows"      # [A-Za-z0-9][A-Za-z0-9._-]{0,63}, unique
    stage = "connect"             # connect | helo | mail | rcpt (default) | data
    when = { os = "windows", country_not_in = "$home" }
    action = "reject"             # reject | tempfail | graylist | tarpit | accept | continue | drop
    reason = "GEO-OS"             # [A-Z0-9][A-Z0-9-]{1,19}; default per action
    text = "..."                  # printable ASCII; default: the reason's text
    observe = false
    strict = false                # graylist only: no auto-allow of the client
    delay = "10s"                 # tarpit only

Conditions (`when`), all ANDed; a rule without `when` matches every session.
For a fact `f` of FACTS (or a derived fact of DERIVED_FACTS):

    f = value          equal (text: case-insensitive; list fact: contains it)
    f_in = [..]        equal to one of them (list fact: contains one of them)
    f_not = value      not equal
    f_not_in = [..]    none of them
    f_gt/_ge/_lt/_le   numeric comparison, NUMBER facts only

Values by kind: TEXT strings; BOOL true/false; NUMBER numbers; IP an
address or CIDR network (`ip_in = ["192.0.2.0/24", "2001:db8::/32"]`; an
IPv4-mapped client address is matched as IPv4); LIST strings. Everywhere
the string "unknown" stands for a failed lookup. Domain facts (DOMAIN_FACTS:
rdns_name, rdns_domain, helo, sender_domain, rcpt_domain) follow the served
domain rule of the project: `example.com` is that name exactly and
`.example.com` is any name below it (list both for both). `country` values
are ISO 3166-1 alpha-2 codes, `local` or `unknown`; enumerated facts
(ENUM_VALUES) accept only their values, so that a typo is an error rather
than a rule that never matches.

Named lists: a string `"$name"` stands for the list `name` of [lists]:
`country_in = "$home"`, or spliced into a list, `country_in = ["$home",
"GB"]`. Only `_in` and `_not_in` take named lists.

Unknown and absent facts: a fact missing from the mapping, or whose value
is "unknown", is UNKNOWN. A positive condition holds on it only when it
lists "unknown"; a negated condition (`_not`, `_not_in`) and a comparison
never hold on it. A fact whose value is None is absent (answered, nothing
there): positive conditions do not hold, negated ones do. An empty string is
a value like any other: it is what the null sender is (`sender = ""`) and
what rdns_name is without a PTR, where domain entries never match it.

Stages: each rule runs only at its stage; first match wins among the rules
of that stage. Facts of earlier stages remain known later, so a check that
needs both (country and recipient) is written at the later stage. A rule
naming a fact not yet known at its stage (FACT_STAGE) is a configuration
error: it could only ever see UNKNOWN.

Actions:
    reject, tempfail  refuse (REPLY_CODES); held back to RCPT per reject_at.
    graylist          rcpt stage only. Without a `graylist` fact the verdict
                      asks for it (`needs = ("graylist",)`): the session
                      consults the graylist store (strict as the verdict
                      says: no auto-allow of the client), adds the fact and
                      calls decide again. "passed" or "allowed": the rule
                      is satisfied and evaluation continues; otherwise the
                      verdict is graylist with `needs = ()`, answered by
                      the state (above).
    tarpit            slow every later reply of this session by `delay`
                      (spamd's stuttering), then keep evaluating: the delay
                      rides on whatever verdict follows.
    accept            accept and stop. `sticky` when decided at connect or
                      helo (the session stops calling decide for the
                      connection) or mail (for the transaction: RSET and
                      end of DATA clear it, STYLE.md §12); at rcpt it
                      accepts that recipient only (ACCEPT_SCOPE).
    drop              connect stage only: the screen answers 521 5.7.1 and
                      closes at once, never held back (postscreen's drop).
    continue          matched: recorded in `matched`, evaluation goes on.
                      For logging what a rule sees without acting on it.

Contract with the session: call decide once per stage (once per recipient at
rcpt) while no sticky accept holds, passing back as `pending` the last
verdict whose `deferred_to` was set. Before that stage decide returns the
pending verdict unchanged (proceed normally); at it, the built-in postmaster
allowlist may accept the recipient, otherwise the refusal is returned with
`deferred_to = None`: enforce it now. A verdict with `deferred_to = None`
and an action of reject, tempfail or graylist is enforced at once. Every
verdict carries `delay`: keep the largest seen for the session's replies.
The `graylist` fact belongs to one recipient: drop it before the first
decide of each RCPT, or the next recipient would reuse the last triplet's
answer.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence, Union

from smtpguard.core.facts import FACTS, UNKNOWN, FactValue, Kind
from smtpguard.core.ip import unmapped
from smtpguard.core.reply import REASONS
from smtpguard.core.units import parse_duration
from smtpguard.errors import ConfigError

# ---------------------------------------------------------------------------
# Tables

# SMTP order (RFC 5321 §3.3); data is the end of DATA.
STAGES: tuple[str, ...] = ("connect", "helo", "mail", "rcpt", "data")
STAGE_INDEX: dict[str, int] = {s: i for i, s in enumerate(STAGES)}

# Rules default to rcpt: every connection and envelope fact is known there
# and it is where Postfix evaluates restrictions (smtpd_delay_reject = yes).
DEFAULT_STAGE = "rcpt"

ACTIONS: tuple[str, ...] = ("reject", "tempfail", "graylist", "tarpit", "accept", "continue", "drop")
# Actions the screen carries out at once, never held back (postscreen's
# `drop`: 521 and close); connect stage only, where the screen owns the
# connection.
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
    "graylist": "GREY",
    "tarpit": "TARPIT",
    "accept": "ACCEPT",
    "continue": "MATCH",
    "drop": "POLICY",
}
# action -> text when neither the rule nor reply.REASONS has one.
DEFAULT_TEXTS: dict[str, str] = {
    "reject": "refused by local policy",
    "tempfail": "temporarily refused by local policy, try again later",
    "graylist": "greylisted, try again later",
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

# Earliest stage at which each fact is known (DESIGN.md: sources gather at
# connect; HELO at helo; the envelope at mail and rcpt; DKIM after DATA).
FACT_STAGE: dict[str, str] = {
    "ip": "connect", "port": "connect", "tls": "connect",
    "country": "connect",
    "os": "connect", "os_name": "connect", "os_distance": "connect", "os_match": "connect",
    "rdns": "connect", "rdns_name": "connect", "rdns_domain": "connect", "rdns_generic": "connect",
    "helo": "helo", "helo_valid": "helo", "helo_bare_ip": "helo",
    "helo_literal_matches": "helo", "helo_is_us": "helo", "helo_resolves": "helo",
    "helo_matches_ip": "helo", "helo_matches_rdns": "helo",
    "dnsbl": "connect", "dnsbl_score": "connect", "dnsbl_hits": "connect",
    "graylist": "rcpt",
    "sender": "mail", "sender_domain": "mail",
    "rcpt": "rcpt", "rcpt_domain": "rcpt",
    "dkim": "data", "dkim_domains": "data",
    "from_domain": "data", "dkim_aligned": "data",
    "pregreet": "connect",
}


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

# Domain names: `.example.com` entries match names below example.com.
DOMAIN_FACTS: frozenset[str] = frozenset(
    {"rdns_name", "rdns_domain", "helo", "sender_domain", "rcpt_domain", "from_domain"})

# Enumerated TEXT facts: the values their sources produce (facts.py), so a
# misspelt value is an error. "unknown" is always allowed.
ENUM_VALUES: dict[str, frozenset[str]] = {
    "os": frozenset({"windows", "linux", "macos", "ios", "android", "freebsd", "openbsd", "other"}),
    "os_match": frozenset({"exact", "fuzzy", "generic", "none"}),
    "rdns": frozenset({"none", "unconfirmed", "confirmed"}),
    "graylist": frozenset({"new", "deferred", "passed", "allowed", "trapped"}),
    "dnsbl": frozenset({"listed", "none"}),
    "dkim": frozenset({"pass", "fail", "none"}),
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
_SUFFIXES = sorted((s for s in OPERATORS if s), key=len, reverse=True)

RULE_KEYS: tuple[str, ...] = ("name", "stage", "when", "action", "reason", "text",
                              "observe", "strict", "delay")
POLICY_KEYS: tuple[str, ...] = ("observe", "reject_at", "default_postmaster")

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_REASON = re.compile(r"[A-Z0-9][A-Z0-9-]{1,19}\Z")
_LIST_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}\Z")
_LIST_REF = re.compile(r"\$([A-Za-z][A-Za-z0-9_-]{0,63})\Z")
# RFC 5321 §4.2: reply text is printable ASCII; room is left for the code,
# the reason and the resolution URL within 512 octets (§4.5.3.1.5).
_TEXT = re.compile(r"[\x20-\x7e]{1,300}\Z")
_TWO_LETTERS = re.compile(r"[A-Za-z]{2}\Z")

IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]
Scalar = Union[str, int, float, bool]


# ---------------------------------------------------------------------------
# Conditions, rules, policy, verdict

def _fact_value(facts: Mapping[str, FactValue], name: str) -> FactValue:
    derived = DERIVED_FACTS.get(name)
    if derived is None:
        return facts.get(name, UNKNOWN)
    value = facts.get(derived[0], UNKNOWN)
    return value if _is_unknown(value) else derived[2](value)


def _is_unknown(value: FactValue) -> bool:
    return isinstance(value, str) and value == UNKNOWN


def _kind(fact: str) -> Kind:
    derived = DERIVED_FACTS.get(fact)
    return derived[1] if derived else FACTS[fact]


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
    if c.suffixes or c.fact in DOMAIN_FACTS:
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


@dataclass(frozen=True, slots=True)
class Verdict:
    action: str                              # an ACTIONS entry; "continue" = proceed
    rule: str | None = None                  # the deciding rule
    reason: str = ""
    text: str = ""
    stage: str = ""                          # where it was decided
    strict: bool = False                     # graylist: no auto-allow of the client
    observe: bool = False                    # the policy is in global observe mode
    observed: tuple[tuple[str, str, str], ...] = ()   # (rule, would-be action, reason)
    matched: tuple[str, ...] = ()            # continue and tarpit rules that matched
    deferred_to: str | None = None           # held back: enforce at that stage
    sticky: bool = False                     # accept for the session (connect, helo) or transaction (mail)
    delay: float = 0.0                       # tarpit: seconds before each later reply
    needs: tuple[str, ...] = ()              # facts to gather before calling decide again


# ---------------------------------------------------------------------------
# Deciding

def decide(policy: Policy, stage: str, facts: Mapping[str, FactValue],
           pending: Verdict | None = None) -> Verdict:
    """The verdict of `stage`: first matching rule of that stage wins."""
    if stage not in STAGE_INDEX:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
    if pending is not None and pending.deferred_to is not None:
        due = STAGE_INDEX[pending.deferred_to]
        if STAGE_INDEX[stage] < due:
            return pending
        if STAGE_INDEX[stage] == due:
            for rule in policy.by_stage[stage]:
                if rule.builtin and rule.action == "accept" and rule.matches(facts):
                    return _verdict(policy, rule, stage)
            return replace(pending, deferred_to=None)
        # After the stage it was due at, the refusal has been enforced per
        # recipient; what got through (postmaster) is evaluated normally.

    observed: list[tuple[str, str, str]] = []
    matched: list[str] = []
    delay = 0.0
    for rule in policy.by_stage[stage]:
        if not rule.matches(facts):
            continue
        if (rule.observe or policy.observe) and not rule.builtin:
            observed.append((rule.name, rule.action, rule.reason))
            continue
        if rule.action in ("continue", "tarpit"):
            matched.append(rule.name)
            if rule.action == "tarpit":
                delay = max(delay, rule.delay)
            continue
        needs: tuple[str, ...] = ()
        if rule.action == "graylist":
            state = facts.get("graylist")
            if state is None:
                needs = ("graylist",)
            elif state in GRAYLIST_PASSED:
                continue
        return _verdict(policy, rule, stage, tuple(observed), tuple(matched), delay, needs)
    return Verdict("continue", stage=stage, observe=policy.observe, observed=tuple(observed),
                   matched=tuple(matched), delay=delay)


def _verdict(policy: Policy, rule: Rule, stage: str,
             observed: tuple[tuple[str, str, str], ...] = (), matched: tuple[str, ...] = (),
             delay: float = 0.0, needs: tuple[str, ...] = ()) -> Verdict:
    deferred = (rule.action in REFUSALS and policy.reject_at == "rcpt"
                and stage in DEFERRABLE_STAGES)
    return Verdict(
        action=rule.action, rule=rule.name, reason=rule.reason, text=rule.text, stage=stage,
        strict=rule.strict, observe=policy.observe, observed=observed, matched=matched,
        deferred_to="rcpt" if deferred else None,
        sticky=rule.action == "accept" and ACCEPT_SCOPE[stage] in STICKY_SCOPES,
        delay=delay, needs=needs)


def explain(policy: Policy, stage: str,
            facts: Mapping[str, FactValue]) -> tuple[tuple[str, bool, str], ...]:
    """(rule, matched, first condition that failed) for every rule of a stage, for `check`."""
    out: list[tuple[str, bool, str]] = []
    for rule in policy.by_stage[stage]:
        failed = next((c.key for c in rule.when if not c.holds(facts)), "")
        out.append((rule.name, not failed, failed))
    return tuple(out)


def reply_code(action: str, reason: str, stage: str) -> tuple[int, str] | None:
    """(code, enhanced) for a refusal written at `stage`; None for other actions.

    The action sets the class (5xx or 4xx); the reason's own code from
    reply.REASONS is used when it is of that class (DNS-TEMP: 451 4.4.3),
    so a `tempfail` with a reason whose table code is 550 still answers 4xx.
    """
    base = REPLY_CODES.get(action)
    if base is None:
        return None
    if action in IMMEDIATE:
        return base  # postscreen's drop is 521 whatever the reason
    known = REASONS.get(reason)
    if known is not None and known[0] // 100 == base[0] // 100:
        base = (known[0], known[1])
    if stage == "connect" and action not in IMMEDIATE:
        return CONNECT_REPLY_CODES[base[0] // 100], base[1]
    return base


# ---------------------------------------------------------------------------
# Parsing and validation

def _rule_key(index: int, name: str | None) -> str:
    # 1-based: "the third [[rule]]" as the admin counts them.
    return f"rule[{index}]" if name is None else f'rule[{index}] "{name}"'


def _is_country(code: str) -> bool:
    try:
        # The geo module owns the list of codes; import lazily so that this
        # module does not depend on it being present (issue: geo).
        from smtpguard.core.geo import is_country_code
    except ImportError:  # pragma: no cover - until geo.py lands
        return bool(_TWO_LETTERS.match(code))
    return is_country_code(code)


def _split_key(key: str, known: Sequence[str]) -> tuple[str, str] | None:
    if key in known:
        return key, ""
    for suffix in _SUFFIXES:
        if key.endswith(suffix) and key[: -len(suffix)] in known:
            return key[: -len(suffix)], suffix
    return None


def _describe(value: Any) -> str:
    return repr(value) if not isinstance(value, bool) else str(value).lower()


def _scalar(key: str, fact: str, kind: Kind, value: Any) -> Scalar:
    """Check one value against the fact's kind; return it normalised."""
    if isinstance(value, str) and value == UNKNOWN:
        return UNKNOWN
    if kind in (Kind.TEXT, Kind.LIST):
        if not isinstance(value, str):
            raise ConfigError(key, f"expected a string for {fact}, got {_describe(value)}")
        text = value.lower()
        if fact == "country":
            if text not in COUNTRY_SPECIAL and not _is_country(value):
                raise ConfigError(key, f"{value!r} is not an ISO 3166-1 alpha-2 country code "
                                       "(or \"local\", \"unknown\")")
        elif fact in ENUM_VALUES and text not in ENUM_VALUES[fact]:
            raise ConfigError(key, f"{value!r} is not a value of {fact}; values: "
                                   f"{', '.join(sorted(ENUM_VALUES[fact]))}, unknown")
        elif fact in DOMAIN_FACTS:
            text = text.rstrip(".") if text != "." else text
            if text in ("", ".") or any(ch.isspace() for ch in text) or ".." in text:
                raise ConfigError(key, f"{value!r} is not a domain name "
                                       "(example.com, or .example.com for the names below it)")
        return text
    if kind is Kind.BOOL:
        if not isinstance(value, bool):
            raise ConfigError(key, f"expected true, false or \"unknown\" for {fact}, "
                                   f"got {_describe(value)}")
        return value
    if kind is Kind.NUMBER:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(key, f"expected a number or \"unknown\" for {fact}, "
                                   f"got {_describe(value)}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(key, f"expected an address or CIDR network for {fact}, "
                               f"got {_describe(value)}")
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError as e:
        raise ConfigError(key, f"{value!r} is not an address or CIDR network ({e})") from None
    return value


def _values(key: str, name: str, takes: str, raw: Any,
            lists: Mapping[str, tuple[Any, ...]]) -> list[Any]:
    """The raw values of a condition, named lists expanded."""
    def expand(item: Any) -> list[Any]:
        ref = _LIST_REF.match(item) if isinstance(item, str) else None
        if ref is None:
            return [item]
        if takes != "list":
            raise ConfigError(key, f"a named list needs _in or _not_in: write "
                                   f"{name}_in = {item!r}")
        if ref.group(1) not in lists:
            known = ", ".join(f"${n}" for n in lists) or "none"
            raise ConfigError(key, f"unknown named list {item!r}; [lists] defines: {known}")
        return list(lists[ref.group(1)])

    if takes == "list":
        if isinstance(raw, list):
            return [v for item in raw for v in expand(item)]
        if isinstance(raw, str) and _LIST_REF.match(raw):
            return expand(raw)
        raise ConfigError(key, f"expected a list like [\"a\", \"b\"] or a named list \"$name\", "
                               f"got {_describe(raw)}")
    if isinstance(raw, (list, dict)):
        raise ConfigError(key, f"expected one value, got {_describe(raw)}; "
                               "for several use the _in or _not_in form")
    return expand(raw)


def _condition(key: str, name: str, raw: Any, stage: str,
               lists: Mapping[str, tuple[Any, ...]]) -> Condition:
    known = [*FACTS, *DERIVED_FACTS]
    split = _split_key(name, known)
    if split is None:
        for fact in sorted(known, key=len, reverse=True):
            if name.startswith(fact + "_"):
                raise ConfigError(key, f"unknown operator {name[len(fact):]!r} for fact {fact}; "
                                       "operators: = _in _not _not_in, and _gt _ge _lt _le "
                                       "for numbers")
        raise ConfigError(key, f"unknown fact; known facts: {', '.join(known)}")
    fact, suffix = split
    op, takes = OPERATORS[suffix]
    kind = _kind(fact)
    source = DERIVED_FACTS[fact][0] if fact in DERIVED_FACTS else fact
    if STAGE_INDEX[FACT_STAGE[source]] > STAGE_INDEX[stage]:
        raise ConfigError(key, f"{fact} is known from stage {FACT_STAGE[source]} on; "
                               f"this rule runs at stage {stage}")
    if takes == "number":
        if kind is not Kind.NUMBER:
            raise ConfigError(key, f"{suffix} compares numbers; {fact} is a {kind.value} fact")
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ConfigError(key, f"expected a number, got {_describe(raw)}")
        return Condition(key=name, fact=fact, op=op, kind=kind, numbers=(float(raw),))
    values = [_scalar(key, fact, kind, v) for v in _values(key, name, takes, raw, lists)]
    unknown = any(isinstance(v, str) and v == UNKNOWN for v in values)
    concrete = [v for v in values if not (isinstance(v, str) and v == UNKNOWN)]
    if kind in (Kind.TEXT, Kind.LIST):
        texts = [str(v) for v in concrete]
        if fact in DOMAIN_FACTS:
            return Condition(key=name, fact=fact, op=op, kind=kind, unknown=unknown,
                             texts=frozenset(t for t in texts if not t.startswith(".")),
                             suffixes=tuple(t for t in texts if t.startswith(".")))
        return Condition(key=name, fact=fact, op=op, kind=kind, unknown=unknown,
                         texts=frozenset(texts))
    if kind is Kind.BOOL:
        return Condition(key=name, fact=fact, op=op, kind=kind, unknown=unknown,
                         bools=tuple(bool(v) for v in concrete))
    if kind is Kind.NUMBER:
        return Condition(key=name, fact=fact, op=op, kind=kind, unknown=unknown,
                         numbers=tuple(float(v) for v in concrete))
    networks = tuple(ipaddress.ip_network(str(v)) for v in concrete)
    return Condition(key=name, fact=fact, op=op, kind=kind, unknown=unknown, networks=networks,
                     ranges=tuple((n.version, int(n.network_address), int(n.broadcast_address))
                                  for n in networks))


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"expected true or false, got {_describe(value)}")
    return value


def _rule(index: int, table: Any, lists: Mapping[str, tuple[Any, ...]],
          builtin: bool = False) -> Rule:
    if not isinstance(table, dict):
        raise ConfigError(_rule_key(index, None), "expected a table: write [[rule]] "
                                                  "followed by name = ..., action = ...")
    name = table.get("name")
    if name is None:
        raise ConfigError(f"{_rule_key(index, None)}.name", "missing; every rule needs a "
                                                            "unique name for the log")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{_rule_key(index, None)}.name",
                          f"{_describe(name)} is not a rule name: letters, digits, . _ -, "
                          "at most 64, starting with a letter or digit")
    where = _rule_key(index, name)
    for key in table:
        if key not in RULE_KEYS:
            raise ConfigError(f"{where}.{key}", f"unknown key; rule keys: {', '.join(RULE_KEYS)}")

    stage = table.get("stage", DEFAULT_STAGE)
    if stage not in STAGE_INDEX:
        raise ConfigError(f"{where}.stage", f"unknown stage {_describe(stage)}; "
                                            f"stages: {', '.join(STAGES)}")
    if "action" not in table:
        raise ConfigError(f"{where}.action", f"missing; actions: {', '.join(ACTIONS)}")
    action = table["action"]
    if action not in ACTIONS:
        raise ConfigError(f"{where}.action", f"unknown action {_describe(action)}; "
                                             f"actions: {', '.join(ACTIONS)}")
    if action in IMMEDIATE and stage != "connect":
        raise ConfigError(f"{where}.action", f"{action} acts in the screen, before the session: "
                                             "use stage = \"connect\"")
    if action == "graylist" and stage != "rcpt":
        raise ConfigError(f"{where}.action", "graylist needs the recipient (the triplet is "
                                             "client, sender, recipient): use stage = \"rcpt\"")

    reason = table.get("reason", DEFAULT_REASONS[action])
    if not isinstance(reason, str) or not _REASON.match(reason):
        raise ConfigError(f"{where}.reason", f"{_describe(reason)} is not a reason code: "
                                             "2 to 20 of A-Z 0-9 -, like GEO-OS")
    text = table.get("text", "")
    if "text" in table and (not isinstance(text, str) or not _TEXT.match(text)):
        raise ConfigError(f"{where}.text", "expected 1 to 300 printable ASCII characters "
                                           "(RFC 5321 §4.2: a reply is ASCII, one line)")
    if not text and action in DEFAULT_TEXTS:
        known = REASONS.get(reason)
        text = known[2] if known else DEFAULT_TEXTS[action]

    observe = _bool(f"{where}.observe", table.get("observe", False))
    strict = _bool(f"{where}.strict", table.get("strict", False))
    if strict and action != "graylist":
        raise ConfigError(f"{where}.strict", f"strict applies to graylist only, this rule's "
                                             f"action is {action}")
    delay = 0.0
    if "delay" in table:
        if action != "tarpit":
            raise ConfigError(f"{where}.delay", f"delay applies to tarpit only, this rule's "
                                                f"action is {action}")
        try:
            delay = parse_duration(table["delay"])
        except ValueError as e:
            raise ConfigError(f"{where}.delay", str(e)) from None
        if not 0 < delay <= MAX_TARPIT_DELAY:
            raise ConfigError(f"{where}.delay", f"expected more than 0 and at most "
                                                f"{MAX_TARPIT_DELAY:g}s (RFC 5321 §4.5.3.2: "
                                                "clients give up after 2 minutes)")
    elif action == "tarpit":
        delay = DEFAULT_TARPIT_DELAY

    when = table.get("when", {})
    if not isinstance(when, dict):
        raise ConfigError(f"{where}.when", "expected a table of conditions, like "
                                           "when = { os = \"windows\" }")
    conditions = tuple(_condition(f"{where}.when.{key}", key, value, stage, lists)
                       for key, value in when.items())
    return Rule(name=name, stage=stage, action=action, when=conditions, reason=reason,
                text=text, observe=observe, strict=strict, delay=delay, builtin=builtin)


def _lists(raw: Any) -> dict[str, tuple[Any, ...]]:
    if not isinstance(raw, dict):
        raise ConfigError("lists", "expected a table of named lists: [lists] home = [\"US\"]")
    out: dict[str, tuple[Any, ...]] = {}
    for name, values in raw.items():
        key = f"lists.{name}"
        if not _LIST_NAME.match(name):
            raise ConfigError(key, "a list name is a letter then letters, digits, _ or -")
        if not isinstance(values, list):
            raise ConfigError(key, f"expected a list, got {_describe(values)}")
        for v in values:
            if isinstance(v, str) and _LIST_REF.match(v):
                raise ConfigError(key, f"{v!r}: a named list cannot include another")
            if not isinstance(v, (str, int, float)):
                raise ConfigError(key, f"expected strings or numbers, got {_describe(v)}")
        out[name] = tuple(values)
    return out


def parse_policy(doc: Mapping[str, Any], implicit: Sequence[Rule] = ()) -> Policy:
    """The policy of a whole TOML document.

    `implicit` rules (geo_rules) run after the last written `accept` rule
    of the connect stage; otherwise the written order holds."""
    settings = doc.get("policy", {})
    if not isinstance(settings, dict):
        raise ConfigError("policy", "expected a table: [policy]")
    for key in settings:
        if key not in POLICY_KEYS:
            raise ConfigError(f"policy.{key}", f"unknown key; known keys in [policy]: "
                                               f"{', '.join(POLICY_KEYS)}")
    observe = _bool("policy.observe", settings.get("observe", False))
    postmaster = _bool("policy.default_postmaster", settings.get("default_postmaster", True))
    reject_at = settings.get("reject_at", "rcpt")
    if reject_at not in REJECT_AT:
        raise ConfigError("policy.reject_at", f"expected one of {', '.join(REJECT_AT)}, "
                                              f"got {_describe(reject_at)}")
    lists = _lists(doc.get("lists", {}))

    raw_rules = doc.get("rule", [])
    if not isinstance(raw_rules, list):
        raise ConfigError("rule", "expected an array of tables: write [[rule]], not [rule]")
    seen: dict[str, str] = {r.name: "an implicit rule" for r in implicit}
    if postmaster:
        seen[POSTMASTER_RULE.name] = "the built-in postmaster allowlist"
    written: list[Rule] = []
    for index, table in enumerate(raw_rules, start=1):
        rule = _rule(index, table, lists)
        if rule.name in seen:
            raise ConfigError(f"{_rule_key(index, rule.name)}.name",
                              f"duplicate name, already used by {seen[rule.name]}")
        seen[rule.name] = _rule_key(index, rule.name)
        written.append(rule)
    # The geo shorthand (connect stage) goes after the last written accept
    # rule of that stage, so an allowlist can let a partner abroad in; the
    # written order is kept.
    cut = max((i + 1 for i, r in enumerate(written) if r.action == "accept" and r.stage == "connect"),
              default=0)
    rules = written[:cut] + list(implicit) + written[cut:]
    return Policy(rules=tuple(rules), observe=observe, reject_at=reject_at,
                  default_postmaster=postmaster)


# ---------------------------------------------------------------------------
# Built-in rules

POSTMASTER_RULE: Rule = _rule(0, {
    "name": "postmaster",
    "stage": "rcpt",
    # RFC 5321 §4.5.1 (postmaster, case-insensitive), RFC 2142 §2 (abuse).
    "when": {"rcpt_local_in": ["postmaster", "abuse"]},
    "action": "accept",
    "reason": "POSTMASTER",
}, {}, builtin=True)

# [geo] unknown: what to do with an address that no zone lists, as an
# action, or in the words of GeoSettings (sources/geo.py): allow, deny.
GEO_UNKNOWN_ACTIONS: dict[str, str] = {
    "continue": "continue", "allow": "continue",
    "tempfail": "tempfail",
    "reject": "reject", "deny": "reject",
}


def geo_rules(allow: Sequence[str], deny: Sequence[str] = (), unknown_action: str = "continue",
              prefix: str = "geo") -> tuple[Rule, ...]:
    """The [geo] shorthand as connect-stage rules, reason GEO, to pass as `implicit`.

    `allow`: only these countries (plus local addresses, never blocked);
    `deny`: not these; `unknown_action` for addresses no zone lists when
    either list is set (without one there is no geoblocking): continue or
    allow (a missing record is common for new allocations), tempfail, or
    reject or deny.
    """
    for key, codes in (("allow", allow), ("deny", deny)):
        if isinstance(codes, str) or not all(isinstance(c, str) for c in codes):
            raise ConfigError(f"{prefix}.{key}", "expected a list of country codes like [\"US\"]")
        for code in codes:
            if not _is_country(code):
                raise ConfigError(f"{prefix}.{key}", f"{code!r} is not an ISO 3166-1 alpha-2 "
                                                     "country code")
    if unknown_action not in GEO_UNKNOWN_ACTIONS:
        raise ConfigError(f"{prefix}.unknown", f"expected one of {', '.join(GEO_UNKNOWN_ACTIONS)}"
                                               f", got {_describe(unknown_action)}")
    unknown = GEO_UNKNOWN_ACTIONS[unknown_action]
    tables: list[dict[str, Any]] = []
    if deny:
        tables.append({"name": "geo-deny", "stage": "connect", "action": "reject",
                       "reason": "GEO", "when": {"country_in": list(deny)}})
    if allow:
        # "local" is never blocked; "unknown" is not matched by a negation.
        tables.append({"name": "geo-allow", "stage": "connect", "action": "reject",
                       "reason": "GEO", "when": {"country_not_in": [*allow, "local"]}})
    if (allow or deny) and unknown != "continue":
        tables.append({"name": "geo-unknown", "stage": "connect", "action": unknown,
                       "reason": "GEO", "when": {"country": "unknown"},
                       "text": "the country of the client address could not be determined"
                       + (", try again later" if unknown == "tempfail" else "")})
    return tuple(_rule(0, t, {}) for t in tables)


# The shipped policy; examples/smtpguard.toml mirrors it (a test keeps them
# identical). The lead prepends geo_rules() from [geo].
DEFAULT_RULES_TOML = '''\
[policy]
observe = false             # rules act; true: log what they would do
reject_at = "rcpt"          # refuse at RCPT, as Postfix's smtpd_delay_reject
default_postmaster = true   # postmaster@ and abuse@ always reachable (RFC 5321 §4.5.1)

# A client that says HELO with our own name is forging it. A HELO that does
# not match the client's address or name is never grounds to reject on its
# own (RFC 5321 §4.1.4), so no rule here looks at helo_matches_*.
[[rule]]
name = "helo-forged"
stage = "helo"
when = { helo_is_us = true }
action = "reject"
reason = "HELO-FORGED"

# A client that talks before the greeting's last line is a bot (postscreen's
# pregreet test, [pregreet] wait); refused at RCPT like postscreen's
# `enforce`, so the log shows whom it wrote to. action = "drop" instead
# answers 521 and closes at once (postscreen's `drop`).
[[rule]]
name = "pregreet"
stage = "connect"
when = { pregreet = true }
action = "reject"
reason = "PREGREET"

# Weighted DNS list score: Postfix's POSTSCREEN_README example uses
# threshold 3 with zen.spamhaus.org*3, so one strong list or two weaker ones.
# A list that cannot be queried gives "unknown", which this never matches.
[[rule]]
name = "dnsbl"
stage = "connect"
when = { dnsbl_score_ge = 3 }
action = "reject"
reason = "DNSBL"

# A Windows host whose reverse DNS could not be looked up: ask it to come
# back rather than reject on a DNS outage.
[[rule]]
name = "windows-rdns-temp"
stage = "connect"
when = { os = "windows", rdns = "unknown" }
action = "tempfail"
reason = "DNS-TEMP"

# A Windows host with no reverse DNS, or one that does not resolve back to
# it (as Postfix's reject_unknown_client_hostname): a desktop, not an MTA.
# Refused only when the SYN matched a Windows signature exactly or by the
# generic Windows signature (TTL 128, DF and Windows' own option layout); a
# fuzzy match (a field off) is graylisted strictly below instead.
[[rule]]
name = "windows-no-rdns"
stage = "connect"
when = { os = "windows", os_match_in = ["exact", "generic"], rdns_in = ["none", "unconfirmed"] }
action = "reject"
reason = "OS-RDNS"

# A Windows host named like a dynamic address pool (dsl, dyn, pool, ...),
# on the same sure match.
[[rule]]
name = "windows-generic-rdns"
stage = "connect"
when = { os = "windows", os_match_in = ["exact", "generic"], rdns_generic = true }
action = "reject"
reason = "OS-RDNS"

# Every other Windows host is graylisted, strictly: each triplet must retry,
# whatever the client's history.
[[rule]]
name = "windows-graylist"
stage = "rcpt"
when = { os = "windows" }
action = "graylist"
strict = true
reason = "GREY"
'''


def default_rules_toml() -> str:
    """The shipped [policy] and [[rule]] tables as TOML text."""
    return DEFAULT_RULES_TOML
