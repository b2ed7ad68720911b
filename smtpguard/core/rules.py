"""The TOML rule language: [policy], [lists] and [[rule]] parsed into a Policy.

Decides:
    whether a configuration's policy is valid, and compiles it: every rule
    and condition checked against the tables (core.tables) so that a typo
    is an error at start rather than a rule that never matches.
Inputs:
    `parse_policy(doc, implicit, facts=...)`: the whole TOML document as a
    mapping ([policy], [lists] and the [[rule]] array); `implicit` rules run
    after the written connect-stage accepts. `geo_rules(allow, deny,
    unknown, facts=...)` compiles the [geo] shorthand into such implicit
    rules. `facts` is the FactTable (core.tables.fact_table) of the facts a
    rule may name: the composition passes the registry's
    (sources/registry.FACT_TABLE), since the core never imports a source.
Output:
    `Policy` (core.ruleset) for core.policy.decide; `geo_rules` a tuple of
    `Rule`.
Failure modes:
    every mistake raises ConfigError, its key naming the rule and the key in
    it (`rule[3] "foreign-windows".when.cuntry: unknown fact; known facts:
    ...`). Nothing else is raised.
Defaults and why:
    `stage = "rcpt"` (DEFAULT_STAGE: Postfix's smtpd_delay_reject), reason
    and text per action (DEFAULT_REASONS, DEFAULT_TEXTS), tarpit `delay`
    10 s (spamd's -S), [policy] `observe = false`, `reject_at = "rcpt"`,
    `default_postmaster = true`: core.policy's docstring says why.

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
For a fact `f` of the FactTable (or a derived fact of DERIVED_FACTS):

    f = value          equal (text: case-insensitive; list fact: contains it)
    f_in = [..]        equal to one of them (list fact: contains one of them)
    f_not = value      not equal
    f_not_in = [..]    none of them
    f_gt/_ge/_lt/_le   numeric comparison, NUMBER facts only

Values by kind: TEXT strings; BOOL true/false; NUMBER numbers; IP an
address or CIDR network (`ip_in = ["192.0.2.0/24", "2001:db8::/32"]`; an
IPv4-mapped client address is matched as IPv4); LIST strings. Everywhere
the string "unknown" stands for a failed lookup. Domain facts (declared with
`domain=True`: rdns_name, rdns_domain, helo, sender_domain, rcpt_domain,
from_domain) follow the served
domain rule of the project: `example.com` is that name exactly and
`.example.com` is any name below it (list both for both). `country` values
are ISO 3166-1 alpha-2 codes, `local` or `unknown`; enumerated facts
(a FactSpec's `values`) accept only their values, so that a typo is an error rather
than a rule that never matches.

Named lists: a string `"$name"` stands for the list `name` of [lists]:
`country_in = "$home"`, or spliced into a list, `country_in = ["$home",
"GB"]`. Only `_in` and `_not_in` take named lists.

"""

from __future__ import annotations

import ipaddress
import re
from typing import Any, Mapping, Sequence, Union

from smtpguard.core.facts import UNKNOWN, Kind
from smtpguard.core.reply import REASONS
from smtpguard.core.ruleset import POSTMASTER_RULE, Condition, Policy, Rule
from smtpguard.core.tables import (
    ACTIONS,
    COUNTRY_SPECIAL,
    DEFAULT_REASONS,
    DEFAULT_STAGE,
    DEFAULT_TARPIT_DELAY,
    DEFAULT_TEXTS,
    DERIVED_FACTS,
    GEO_UNKNOWN_ACTIONS,
    MAX_TARPIT_DELAY,
    OPERATORS,
    POLICY_KEYS,
    REJECT_AT,
    RULE_KEYS,
    STAGE_INDEX,
    STAGES,
    FactTable,
)
from smtpguard.core.units import parse_duration
from smtpguard.errors import ConfigError

# Operator suffixes, longest first when splitting a key (OPERATORS).
_SUFFIXES = sorted((s for s in OPERATORS if s), key=len, reverse=True)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
_REASON = re.compile(r"[A-Z0-9][A-Z0-9-]{1,19}\Z")
_LIST_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,63}\Z")
_LIST_REF = re.compile(r"\$([A-Za-z][A-Za-z0-9_-]{0,63})\Z")
# RFC 5321 §4.2: reply text is printable ASCII; room is left for the code,
# the reason and the resolution URL within 512 octets (§4.5.3.1.5).
_TEXT = re.compile(r"[\x20-\x7e]{1,300}\Z")
_TWO_LETTERS = re.compile(r"[A-Za-z]{2}\Z")

Scalar = Union[str, int, float, bool]


def _kind(fact: str, facts: FactTable) -> Kind:
    derived = DERIVED_FACTS.get(fact)
    return derived[1] if derived else facts.kinds[fact]


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


def _scalar(key: str, fact: str, kind: Kind, value: Any, enum: frozenset[str] = frozenset(),
            domain: bool = False) -> Scalar:
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
        elif enum and text not in enum:
            raise ConfigError(key, f"{value!r} is not a value of {fact}; values: "
                                   f"{', '.join(sorted(enum))}, unknown")
        elif domain:
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
               lists: Mapping[str, tuple[Any, ...]], facts: FactTable) -> Condition:
    known = [*facts.kinds, *DERIVED_FACTS]
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
    kind = _kind(fact, facts)
    source = DERIVED_FACTS[fact][0] if fact in DERIVED_FACTS else fact
    if STAGE_INDEX[facts.stages[source]] > STAGE_INDEX[stage]:
        raise ConfigError(key, f"{fact} is known from stage {facts.stages[source]} on; "
                               f"this rule runs at stage {stage}")
    if takes == "number":
        if kind is not Kind.NUMBER:
            raise ConfigError(key, f"{suffix} compares numbers; {fact} is a {kind.value} fact")
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            raise ConfigError(key, f"expected a number, got {_describe(raw)}")
        return Condition(key=name, fact=fact, op=op, kind=kind, numbers=(float(raw),))
    enum = facts.values.get(fact, frozenset())
    domain = fact in facts.domains
    values = [_scalar(key, fact, kind, v, enum, domain) for v in _values(key, name, takes, raw, lists)]
    unknown = any(isinstance(v, str) and v == UNKNOWN for v in values)
    concrete = [v for v in values if not (isinstance(v, str) and v == UNKNOWN)]
    if kind in (Kind.TEXT, Kind.LIST):
        texts = [str(v) for v in concrete]
        if domain:
            return Condition(key=name, fact=fact, op=op, kind=kind, unknown=unknown, domain=True,
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


def _rule(index: int, table: Any, lists: Mapping[str, tuple[Any, ...]], facts: FactTable,
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
    conditions = tuple(_condition(f"{where}.when.{key}", key, value, stage, lists, facts)
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


def parse_policy(doc: Mapping[str, Any], implicit: Sequence[Rule] = (), *, facts: FactTable) -> Policy:
    """The policy of a whole TOML document, its conditions checked against
    `facts` (the registry's table: sources/registry.FACT_TABLE).

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
        rule = _rule(index, table, lists, facts)
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


def geo_rules(allow: Sequence[str], deny: Sequence[str] = (), unknown_action: str = "continue",
              prefix: str = "geo", *, facts: FactTable) -> tuple[Rule, ...]:
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
    return tuple(_rule(0, t, {}, facts) for t in tables)
