"""Rules over facts: what the proxy does with a client at each SMTP stage.

Decides:
    the verdict for one stage of one session (connect, helo, mail, rcpt,
    data): refuse (reject, tempfail), defer unless graylisting has passed,
    slow down (tarpit), accept, or proceed; from ordered rules written in
    TOML, first match wins.
Inputs:
    a `Policy` (core.ruleset), compiled from TOML by `parse_policy` and
    `geo_rules` (core.rules, the rule language). `decide(policy, stage,
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
      the state to the reply (core.graylist: GRAYLIST, TRAP, or GRAYLIST-STORE
      unless `graylist.on_error = "accept"`): that setting, not the policy,
      owns what a store outage does.
    * tarpit `delay = "10s"`: spamd(8)'s stutter time (`-S 10`); at most
      119 s, below the shortest client timeout of RFC 5321 §4.5.3.2 (DATA
      initiation, 2 minutes).

This module is the evaluator. Its neighbours, one job each: core.tables
(stages, actions, reply codes, CORE_FACTS, fact_table ...), core.rules
(the TOML rule language and its validation), core.ruleset (Condition,
Rule, Policy: whether a rule matches facts). Every public name of those
is re-exported here, so `from smtpguard.core.policy import X` keeps working.

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
naming a fact not yet known at its stage (the FactTable's stages) is a configuration
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
    drop              521 5.7.1 and close at once, never held back
                      (postscreen's drop): by the screen at connect, by the
                      session at a later stage.
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

from dataclasses import dataclass, replace
from typing import Mapping

from smtpguard.core.facts import FactValue
from smtpguard.core.reply import REASONS
from smtpguard.core.rules import geo_rules, parse_policy
from smtpguard.core.ruleset import POSTMASTER_RULE, Condition, IPNetwork, Policy, Rule
from smtpguard.core.tables import (
    ACCEPT_SCOPE,
    ACTIONS,
    CONNECT_REPLY_CODES,
    COUNTRY_SPECIAL,
    DEFAULT_REASONS,
    DEFAULT_STAGE,
    DEFAULT_TARPIT_DELAY,
    DEFAULT_TEXTS,
    DEFERRABLE_STAGES,
    DERIVED_FACTS,
    CORE_FACTS,
    GEO_UNKNOWN_ACTIONS,
    GRAYLIST_PASSED,
    IMMEDIATE,
    MAX_TARPIT_DELAY,
    OPERATORS,
    POLICY_KEYS,
    REFUSALS,
    REJECT_AT,
    REPLY_CODES,
    RULE_KEYS,
    STAGE_INDEX,
    STAGES,
    STICKY_SCOPES,
    FactTable,
    fact_table,
)

__all__ = [
    # the evaluator
    "Verdict", "decide", "explain", "reply_code",
    # core.ruleset
    "Condition", "IPNetwork", "POSTMASTER_RULE", "Policy", "Rule",
    # core.rules
    "geo_rules", "parse_policy",
    # core.tables
    "ACCEPT_SCOPE", "ACTIONS", "CONNECT_REPLY_CODES", "COUNTRY_SPECIAL", "DEFAULT_REASONS",
    "DEFAULT_STAGE", "DEFAULT_TARPIT_DELAY", "DEFAULT_TEXTS", "DEFERRABLE_STAGES",
    "CORE_FACTS", "DERIVED_FACTS", "FactTable", "fact_table", "GEO_UNKNOWN_ACTIONS",
    "GRAYLIST_PASSED", "IMMEDIATE", "MAX_TARPIT_DELAY", "OPERATORS", "POLICY_KEYS", "REFUSALS",
    "REJECT_AT", "REPLY_CODES", "RULE_KEYS", "STAGE_INDEX", "STAGES", "STICKY_SCOPES",
]


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

