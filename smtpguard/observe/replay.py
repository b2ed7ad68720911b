"""The facts a session's policy saw, as logged, and their replay through another policy.

Decides:
    what another policy would have done with each logged session, stage by
    stage, and where that differs from what happened: a session it would
    have refused, deferred or let through differently, grouped by the new
    (or old) rule and reason.
Inputs:
    writing: `Trail.record(stage, facts, verdict, pending)` at every call of
    the policy (ClientSession.decide) and `Trail.fields()` for the session's
    `close` line. Reading: the `close` objects of the JSON decision log (its
    `seen` and `steps` fields) and a `Policy` (core/policy.py).
Output:
    the `close` line carries `seen` (every fact known at the first decision,
    the connect stage: ip, country, os*, rdns*, dnsbl*) and `steps`, one per
    call of the policy: `stage`, `set` (facts added or changed since the
    previous step: helo and its checks, sender, rcpt, graylist, dkim),
    `unset` (facts dropped, such as the previous recipient's graylist
    state), and the verdict (`action`, `rule`, `reason`, `held` when a
    refusal was held back to RCPT, `needs` when the graylist state was
    asked for), and what came of it: a rcpt step's `relayed` (the MTA
    accepted that recipient) and a data step's `delivered`. `Replay.add(record)` compares; `Replay.result()` is a
    JSON-able summary.
Failure modes:
    a record without `seen`/`steps` (an older log, or a session that never
    reached the policy) is counted as not replayable, never an error. After
    a session-wide `accept` rule the live session stops calling the policy,
    so later stages were not logged: replay says so (`truncated`) instead
    of guessing. A fact the new policy reads that was never gathered (sources
    run only when a rule reads their fact) is UNKNOWN to it, as it would be
    live; the summary lists such facts (`missing_facts`).
Defaults and why:
    * Strings in the logged facts are cut at observe.log.MAX_VALUE (256, the
      length of an RFC 5321 §4.5.3.1 path): the JSON formatter bounds only
      top-level fields, so the nested ones are bounded here.
    * At most MAX_STEPS steps per session (a session has at most
      server.max_recipients recipients per transaction, 100 by default;
      beyond 256 decisions the rest are counted in `steps_dropped`).
    * EXAMPLES per group: enough to recognise a sender, bounded memory.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Mapping

from smtpguard.core.facts import FactValue
from smtpguard.core.policy import ACCEPT_SCOPE, STAGE_INDEX, Policy, Verdict, decide
from smtpguard.observe.log import LOGGER, MAX_VALUE, JsonFormatter
from smtpguard.sources.registry import FACT_STAGE

# Decisions kept per session (see the module docstring).
MAX_STEPS = 256
# Examples kept per replay group.
EXAMPLES = 5
# The facts of the connection itself, read by the report.
EXAMPLE_FACTS = ("ip", "country", "os", "rdns", "rdns_name", "helo", "sender", "rcpt")


def _bounded(value: FactValue) -> Any:
    if isinstance(value, str):
        return value if len(value) <= MAX_VALUE else value[:MAX_VALUE] + "…"
    if isinstance(value, (tuple, list)):
        return [_bounded(v) for v in value[:64]]
    return value


def structured_log() -> bool:
    """True when the decision log is JSON: the full facts are written only
    there (in the text format they would be a long, truncated repr)."""
    return any(isinstance(h.formatter, JsonFormatter) for h in LOGGER.handlers)


class Trail:
    """What one session's policy saw, decision by decision (bounded)."""

    __slots__ = ("seen", "last", "steps", "dropped", "_rcpts", "_data")

    def __init__(self) -> None:
        self.seen: dict[str, Any] | None = None
        self.last: dict[str, FactValue] = {}
        self.steps: list[dict[str, Any]] = []
        self.dropped = 0
        self._rcpts: list[tuple[dict[str, Any], str]] = []  # rcpt steps of this transaction, not yet settled
        self._data: tuple[dict[str, Any], int] | None = None  # the last data step, messages before it

    def settle(self, stage: str, relayed: Iterable[str], messages: int) -> None:
        """What happened after earlier decisions: whether each recipient was
        relayed (the MTA said 250: `relayed` is the transaction's accepted
        recipients) and whether the message was delivered (`messages`, the
        session's count, went up). Known at the next rcpt or data decision
        and at close; a transaction dropped by RSET or a new MAIL leaves its
        recipients without `relayed` (unknown)."""
        if self._data is not None:
            step, before = self._data
            step["delivered"] = messages > before
            self._data = None
        if stage in ("rcpt", "data", "close"):
            # the fact is the normalised address, the session keeps the client's spelling
            accepted = {a.lower() for a in relayed}
            for step, rcpt in self._rcpts:
                if rcpt.lower() in accepted:
                    step["relayed"] = True
                elif stage != "close":
                    # at close, QUIT may already have reset the transaction: unknown
                    step["relayed"] = False
        self._rcpts = []

    def record(self, stage: str, facts: Mapping[str, FactValue], verdict: Verdict,
               relayed: Iterable[str] = (), messages: int = 0) -> None:
        self.settle(stage, relayed, messages)
        if len(self.steps) >= MAX_STEPS:
            self.dropped += 1
            return
        step: dict[str, Any] = {"stage": stage}
        if self.seen is None:
            self.seen = {k: _bounded(v) for k, v in facts.items() if k != "port"}
        else:
            changed = {k: _bounded(v) for k, v in facts.items()
                       if k != "port" and (k not in self.last or self.last[k] != v)}
            gone = [k for k in self.last if k not in facts]
            if changed:
                step["set"] = changed
            if gone:
                step["unset"] = gone
        self.last = dict(facts)
        step["action"] = verdict.action
        if verdict.rule:
            step["rule"] = verdict.rule
            step["reason"] = verdict.reason
        if verdict.deferred_to:
            step["held"] = verdict.deferred_to
        if verdict.needs:
            step["needs"] = list(verdict.needs)
        self.steps.append(step)
        if stage == "rcpt" and not verdict.needs and isinstance(facts.get("rcpt"), str):
            if outcome(verdict.action, bool(verdict.deferred_to), False, facts.get("graylist")) != THROUGH:
                step["relayed"] = False   # refused or deferred by the policy: never relayed
            else:
                self._rcpts.append((step, str(facts["rcpt"])))
        elif stage == "data":
            self._data = (step, messages)

    def fields(self) -> dict[str, Any]:
        """Extra fields of the `close` line."""
        if self.seen is None:
            return {}
        out: dict[str, Any] = {"seen": self.seen, "steps": self.steps}
        if self.dropped:
            out["steps_dropped"] = self.dropped
        return out


# ---------------------------------------------------------------------------
# Outcomes

REFUSED, DEFERRED, THROUGH, PENDING = "refused", "deferred", "through", "pending"
# Actions that end a command at once when not held back.
_OUTCOME: dict[str, str] = {"reject": REFUSED, "drop": REFUSED, "tempfail": DEFERRED}


def outcome(action: str, held: bool, needs: bool, graylist: Any) -> str:
    """What a client saw from one verdict: refused, deferred or let through.

    A graylist verdict is deferred unless its state trapped the client
    (refused); one that still needs the graylist state is PENDING (the
    session asks the store and decides again)."""
    if held:
        return THROUGH
    if action == "graylist":
        if needs:
            return PENDING
        return REFUSED if graylist == "trapped" else DEFERRED
    return _OUTCOME.get(action, THROUGH)


def steps_of(record: Mapping[str, Any]) -> Iterable[tuple[str, dict[str, Any], Mapping[str, Any]]]:
    """(stage, facts as the policy saw them, logged step) for each decision."""
    seen = record.get("seen")
    steps = record.get("steps")
    if not isinstance(seen, dict) or not isinstance(steps, list):
        return
    facts: dict[str, Any] = _tuples(seen)
    for step in steps:
        stage = step.get("stage") if isinstance(step, dict) else None
        if not isinstance(stage, str) or stage not in STAGE_INDEX:
            return
        gone = step.get("unset")
        for key in gone if isinstance(gone, list) else ():
            if isinstance(key, str):
                facts.pop(key, None)
        changed = step.get("set")
        if isinstance(changed, dict):
            facts.update(_tuples(changed))
        yield stage, dict(facts), step


def _tuples(facts: Mapping[str, Any]) -> dict[str, Any]:
    """Logged facts as FactValues again: lists back to tuples of strings; a
    value no source produces (the log is input) is dropped, so it is unknown."""
    out: dict[str, Any] = {}
    for key, value in facts.items():
        if isinstance(value, list):
            out[key] = tuple(str(v) for v in value if isinstance(v, (str, int, float)))
        elif value is None or isinstance(value, (str, int, float, bool)):
            out[key] = value
    return out


@dataclass
class Group:
    sessions: int = 0
    decisions: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)


class Replay:
    """Streams logged sessions through a new policy; keeps counters only."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.sessions = 0
        self.replayed = 0
        self.changed = 0
        self.not_replayable = 0
        self.truncated = 0
        self.groups: dict[tuple[str, str, str, str, str], Group] = {}
        self.missing: Counter[str] = Counter()
        self._reads = policy.facts()

    def add(self, record: Mapping[str, Any]) -> None:
        self.sessions += 1
        steps = list(steps_of(record))
        if not steps:
            self.not_replayable += 1
            return
        self.replayed += 1
        # Facts the new policy reads that were never gathered by the stage
        # the session reached (graylist is asked for when needed: not missing).
        reached = max(STAGE_INDEX[stage] for stage, _f, _s in steps)
        final = steps[-1][1]
        for name in self._reads:
            stage_of = FACT_STAGE.get(name)
            if (stage_of is not None and name not in ("port", "graylist") and name not in final
                    and STAGE_INDEX[stage_of] <= reached):
                self.missing[name] += 1
        last_action = steps[-1][2].get("action")
        if last_action == "accept" and steps[-1][0] in ("connect", "helo"):
            self.truncated += 1
        pending: Verdict | None = None
        accepted = ""  # a sticky accept of the new policy: "session" or "transaction"
        touched: set[tuple[str, str, str, str, str]] = set()
        for stage, facts, step in steps:
            old = outcome(str(step.get("action", "continue")), bool(step.get("held")),
                          bool(step.get("needs")), facts.get("graylist"))
            if old == PENDING:
                continue  # the same recipient is decided again with its graylist state
            if stage in ("helo", "mail") and accepted == "transaction":
                accepted = ""  # HELO and MAIL begin a new transaction (RFC 5321 §4.1.4)
            if accepted:
                # the live session stops asking the policy (ACCEPT_SCOPE)
                verdict = Verdict("accept", stage=stage)
            else:
                verdict = decide(self.policy, stage, facts, pending)
            if verdict.action == "accept" and verdict.sticky:
                accepted = ACCEPT_SCOPE[stage]
                pending = None if accepted == "session" else pending
            elif verdict.deferred_to and pending is None:
                pending = verdict
            if verdict.needs and "graylist" in verdict.needs:
                # The old policy did not ask for this triplet's state: a new
                # triplet is deferred at its first attempt (postgrey).
                new = DEFERRED
                verdict = replace(verdict, needs=())
            else:
                new = outcome(verdict.action, bool(verdict.deferred_to), False, facts.get("graylist"))
            if new == old:
                continue
            if new == THROUGH:
                key = (new, stage, str(step.get("rule") or ""), str(step.get("reason") or ""), old)
            else:
                key = (new, stage, verdict.rule or "", verdict.reason, old)
            group = self.groups.setdefault(key, Group())
            group.decisions += 1
            if key not in touched:
                touched.add(key)
                group.sessions += 1
                if len(group.examples) < EXAMPLES:
                    example = {k: facts[k] for k in EXAMPLE_FACTS if facts.get(k) not in (None, "")}
                    example["session"] = record.get("session")
                    example["stage"] = stage
                    group.examples.append({k: list(v) if isinstance(v, tuple) else v for k, v in example.items()})
        if touched:
            self.changed += 1

    def result(self) -> dict[str, Any]:
        rows = []
        for (new, stage, rule, reason, old), g in sorted(
                self.groups.items(), key=lambda kv: (-kv[1].sessions, kv[0])):
            rows.append({"would": new, "was": old, "stage": stage, "rule": rule or None,
                         "reason": reason or None, "sessions": g.sessions, "decisions": g.decisions,
                         "examples": g.examples})
        return {"sessions": self.sessions, "replayed": self.replayed, "changed": self.changed,
                "not_replayable": self.not_replayable, "truncated_by_accept": self.truncated,
                "missing_facts": dict(sorted(self.missing.items())), "differences": rows}


def close_fields(trail: Trail | None) -> dict[str, Any]:
    """The `close` line's replay fields, when the log can carry them."""
    if trail is None or not structured_log():
        return {}
    return trail.fields()


