"""The policy core: rule language, validation, decide(), observe, reject_at.

Pure tables (STYLE.md §11): every case is a labelled row; no I/O.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest

from smtpguard.core import policy as core_policy
from smtpguard.core.facts import Kind
from smtpguard.core.policy import (
    ACTIONS,
    DEFAULT_TARPIT_DELAY,
    POSTMASTER_RULE,
    Policy,
    Rule,
    decide,
    explain,
    reply_code,
)
from smtpguard.errors import ConfigError
from smtpguard.sources.registry import FACT_TABLE, FACTS
from tests.fixtures_policy import default_rules_toml

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "smtpguard.toml"


def parse_policy(doc: Any, implicit: Any = ()) -> Policy:
    """The rule parser with the shipped sources' facts, as config.build calls it."""
    return core_policy.parse_policy(doc, implicit, facts=FACT_TABLE)


def geo_rules(*args: Any, **kwargs: Any) -> tuple[Rule, ...]:
    return core_policy.geo_rules(*args, facts=FACT_TABLE, **kwargs)


def one_rule(when: dict[str, Any], stage: str = "rcpt", lists: dict[str, Any] | None = None) -> Rule:
    doc: dict[str, Any] = {"rule": [{"name": "r", "stage": stage, "action": "reject", "when": when}]}
    if lists is not None:
        doc["lists"] = lists
    return parse_policy(doc).rules[0]


def ids(cases: list[tuple[Any, ...]]) -> list[str]:
    return [c[0] for c in cases]


# ---------------------------------------------------------------------------
# The rule language: (label, when, facts, matches)

HOME = {"home": ["US", "CA", "MX"]}

CONDITION_CASES: list[tuple[str, dict[str, Any], dict[str, Any], bool]] = [
    # text
    ("text equality matches the same value", {"os": "windows"}, {"os": "windows"}, True),
    ("text equality ignores case", {"os": "Windows"}, {"os": "WINDOWS"}, True),
    ("text equality fails on another value", {"os": "windows"}, {"os": "linux"}, False),
    ("text _in matches one of the list", {"country_in": ["US", "CA"]}, {"country": "CA"}, True),
    ("text _in fails outside the list", {"country_in": ["US", "CA"]}, {"country": "DE"}, False),
    ("text _not matches another value", {"os_not": "windows"}, {"os": "linux"}, True),
    ("text _not fails on the value", {"os_not": "windows"}, {"os": "windows"}, False),
    ("text _not_in matches outside the list", {"country_not_in": ["US"]}, {"country": "DE"}, True),
    ("text _not_in fails inside the list", {"country_not_in": ["US"]}, {"country": "us"}, False),
    ("country codes compare in any case", {"country": "de"}, {"country": "DE"}, True),
    ("an envelope address compares case-insensitively", {"sender": "Bob@Example.COM"},
     {"sender": "bob@example.com"}, True),
    ("the null sender can be matched", {"sender": ""}, {"sender": ""}, True),
    # unknown and absent
    ("equality with a value is false on an unknown fact", {"os": "windows"}, {"os": "unknown"}, False),
    ("a negation never matches an unknown fact", {"os_not": "windows"}, {"os": "unknown"}, False),
    ("a negated list never matches an unknown fact", {"country_not_in": ["US"]},
     {"country": "unknown"}, False),
    ("a fact the session did not gather is unknown", {"country_not_in": ["US"]}, {}, False),
    ("\"unknown\" matches a failed lookup explicitly", {"rdns": "unknown"}, {"rdns": "unknown"}, True),
    ("\"unknown\" matches a fact that is missing", {"rdns": "unknown"}, {}, True),
    ("\"unknown\" does not match a known value", {"rdns": "unknown"}, {"rdns": "none"}, False),
    ("\"unknown\" can be one entry of a list", {"rdns_in": ["none", "unknown"]},
     {"rdns": "unknown"}, True),
    ("_not \"unknown\" matches any answered lookup", {"rdns_not": "unknown"}, {"rdns": "none"}, True),
    ("_not \"unknown\" does not match a failed lookup", {"rdns_not": "unknown"},
     {"rdns": "unknown"}, False),
    ("_not_in listing \"unknown\" does not match a failed lookup",
     {"rdns_not_in": ["none", "unknown"]}, {"rdns": "unknown"}, False),
    ("a positive condition fails on an absent value", {"rdns_name": "mx.example.com"},
     {"rdns_name": None}, False),
    ("a negation holds on an absent value (no PTR name is not that name)",
     {"rdns_domain_not_in": [".example.com"]}, {"rdns_domain": None}, True),
    # bool
    ("a yes/no fact matches true", {"helo_is_us": True}, {"helo_is_us": True}, True),
    ("a yes/no fact matches false", {"rdns_generic": False}, {"rdns_generic": False}, True),
    ("a yes/no fact true does not match false", {"helo_is_us": True}, {"helo_is_us": False}, False),
    ("a yes/no _not true matches false", {"helo_valid_not": True}, {"helo_valid": False}, True),
    ("a yes/no fact can be matched as unknown", {"helo_resolves": "unknown"},
     {"helo_resolves": "unknown"}, True),
    ("a yes/no fact given as text is no match", {"tls": True}, {"tls": "true"}, False),
    # numbers
    ("_ge holds at the threshold", {"dnsbl_score_ge": 3}, {"dnsbl_score": 3}, True),
    ("_ge fails below it", {"dnsbl_score_ge": 3}, {"dnsbl_score": 2.5}, False),
    ("_gt fails at the threshold", {"dnsbl_score_gt": 3}, {"dnsbl_score": 3}, False),
    ("_gt holds above it", {"dnsbl_score_gt": 3}, {"dnsbl_score": 3.5}, True),
    ("_lt holds below", {"os_distance_lt": 3}, {"os_distance": 2}, True),
    ("_le holds at the limit", {"os_distance_le": 3}, {"os_distance": 3}, True),
    ("_le fails above", {"os_distance_le": 3}, {"os_distance": 4}, False),
    ("a comparison never holds on unknown", {"dnsbl_score_lt": 3}, {"dnsbl_score": "unknown"}, False),
    ("a comparison never holds on an absent value", {"dnsbl_score_lt": 3}, {"dnsbl_score": None}, False),
    ("number equality compares ints and floats", {"port": 25}, {"port": 25.0}, True),
    ("number _in matches one of them", {"port_in": [25, 587]}, {"port": 587}, True),
    ("a boolean is not a number", {"port_le": 1}, {"port": True}, False),
    # lists
    ("a list fact contains the value", {"dnsbl_hits": "zen.spamhaus.org"},
     {"dnsbl_hits": ("b.barracudacentral.org", "zen.spamhaus.org")}, True),
    ("a list fact _in: contains one of them", {"dnsbl_hits_in": ["bl.spamcop.net", "ZEN.spamhaus.org"]},
     {"dnsbl_hits": ("zen.spamhaus.org",)}, True),
    ("a list fact _not: an empty list does not contain it", {"dnsbl_hits_not": "zen.spamhaus.org"},
     {"dnsbl_hits": ()}, True),
    ("a list fact _not_in fails when one is there", {"dnsbl_hits_not_in": ["zen.spamhaus.org"]},
     {"dnsbl_hits": ("zen.spamhaus.org",)}, False),
    ("a list fact that is unknown matches no negation", {"dnsbl_hits_not_in": ["zen.spamhaus.org"]},
     {"dnsbl_hits": "unknown"}, False),
    # addresses
    ("an IPv4 address inside a CIDR", {"ip_in": ["192.0.2.0/24"]}, {"ip": "192.0.2.77"}, True),
    ("an IPv4 address outside it", {"ip_in": ["192.0.2.0/24"]}, {"ip": "198.51.100.1"}, False),
    ("an IPv6 address inside a CIDR", {"ip_in": ["2001:db8::/32"]}, {"ip": "2001:db8:1::25"}, True),
    ("an IPv4-mapped client matches as IPv4", {"ip_in": ["192.0.2.0/24"]},
     {"ip": "::ffff:192.0.2.9"}, True),
    ("an IPv4 address never matches an IPv6 network", {"ip_in": ["::/0"]}, {"ip": "192.0.2.1"}, False),
    ("a malformed client address matches no network", {"ip_in": ["0.0.0.0/0"]},
     {"ip": "not-an-ip"}, False),
    ("ip = a single address", {"ip": "192.0.2.1"}, {"ip": "192.0.2.1"}, True),
    ("ip_not_in holds outside every network", {"ip_not_in": ["10.0.0.0/8", "2001:db8::/32"]},
     {"ip": "192.0.2.1"}, True),
    ("a malformed client address matches no negation", {"ip_not_in": ["10.0.0.0/8"]},
     {"ip": "not-an-ip"}, False),
    # domains
    ("a domain entry matches that name exactly", {"rdns_domain_in": ["example.com"]},
     {"rdns_domain": "example.com"}, True),
    ("a domain entry ignores case and the trailing dot", {"rdns_domain_in": ["example.com"]},
     {"rdns_domain": "EXAMPLE.com."}, True),
    ("a domain entry does not match its subdomains", {"rdns_domain_in": ["example.com"]},
     {"rdns_domain": "mx.example.com"}, False),
    ("a .domain entry matches names below it", {"rdns_name_in": [".example.com"]},
     {"rdns_name": "mx1.out.example.com"}, True),
    ("a .domain entry does not match the domain itself", {"rdns_name_in": [".example.com"]},
     {"rdns_name": "example.com"}, False),
    ("a .domain entry does not match a longer label", {"rdns_name_in": [".example.com"]},
     {"rdns_name": "badexample.com"}, False),
    ("helo suffixes use the same rule", {"helo": ".dynamic.example.net"},
     {"helo": "host-1.dynamic.example.net"}, True),
    ("sender domains with _not_in", {"sender_domain_not_in": ["example.org", ".example.org"]},
     {"sender_domain": "mail.example.org"}, False),
    # derived facts
    ("the recipient's local part, any case", {"rcpt_local": "postmaster"},
     {"rcpt": "PostMaster@example.com"}, True),
    ("a bare Postmaster is its own local part", {"rcpt_local": "postmaster"},
     {"rcpt": "Postmaster"}, True),
    ("the sender's local part", {"sender_local_in": ["mailer-daemon"]},
     {"sender": "MAILER-DAEMON@example.net"}, True),
    # named lists
    ("a named list stands for a list", {"country_in": "$home"}, {"country": "MX"}, True),
    ("a named list negated", {"country_not_in": "$home"}, {"country": "DE"}, True),
    ("a named list negated fails inside it", {"country_not_in": "$home"}, {"country": "US"}, False),
    ("a named list spliced into a list", {"country_in": ["$home", "GB"]}, {"country": "GB"}, True),
    # composition
    ("no when matches every session", {}, {}, True),
    ("all conditions must hold", {"os": "windows", "country_not_in": "$home"},
     {"os": "windows", "country": "DE"}, True),
    ("one failing condition fails the rule", {"os": "windows", "country_not_in": "$home"},
     {"os": "windows", "country": "US"}, False),
]


@pytest.mark.parametrize("label, when, facts, expected", CONDITION_CASES, ids=ids(CONDITION_CASES))
def test_condition(label: str, when: dict[str, Any], facts: dict[str, Any], expected: bool) -> None:
    rule = one_rule(when, lists=HOME)
    assert rule.matches(facts) is expected


def _sample(kind: Kind) -> Any:
    return {Kind.TEXT: "x", Kind.BOOL: True, Kind.NUMBER: 1, Kind.LIST: "x",
            Kind.IP: "192.0.2.0/24"}[kind]


NEGATIONS = [(fact, op) for fact in FACTS for op in ("_not", "_not_in")]


@pytest.mark.parametrize("fact, op", NEGATIONS,
                         ids=[f"{f}{op} never matches an unknown {f}" for f, op in NEGATIONS])
def test_no_negation_matches_unknown(fact: str, op: str) -> None:
    value = _sample(FACTS[fact])
    if fact == "country":
        value = "US"
    elif fact == "os":
        value = "linux"
    elif fact == "os_match":
        value = "exact"
    elif fact in ("rdns", "dkim", "dnsbl"):
        value = "none"
    elif fact == "graylist":
        value = "new"
    stage = "data"
    rule = one_rule({f"{fact}{op}": [value] if op == "_not_in" else value}, stage=stage)
    assert rule.matches({fact: "unknown"}) is False
    assert rule.matches({}) is False


# ---------------------------------------------------------------------------
# Validation: (label, document, key, words in the message)

def r(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"name": "foreign-windows", "action": "reject"}
    base.update(kw)
    return base


FW = 'rule[1] "foreign-windows"'

ERROR_CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("an unknown fact names the rule and key", {"rule": [r(when={"cuntry": "US"})]},
     f"{FW}.when.cuntry", "unknown fact; known facts: ip, port"),
    ("an unknown operator suffix", {"rule": [r(when={"country_nin": ["US"]})]},
     f"{FW}.when.country_nin", "unknown operator '_nin' for fact country"),
    ("a comparison on a text fact", {"rule": [r(when={"country_gt": 3})]},
     f"{FW}.when.country_gt", "_gt compares numbers; country is a text fact"),
    ("a comparison with text", {"rule": [r(when={"dnsbl_score_ge": "3"})]},
     f"{FW}.when.dnsbl_score_ge", "expected a number"),
    ("a yes/no fact given a string", {"rule": [r(when={"helo_is_us": "yes"})]},
     f"{FW}.when.helo_is_us", "expected true, false or \"unknown\""),
    ("a number fact given a boolean", {"rule": [r(when={"port": True})]},
     f"{FW}.when.port", "expected a number or \"unknown\""),
    ("a text fact given a number", {"rule": [r(when={"os": 3})]},
     f"{FW}.when.os", "expected a string for os"),
    ("_in given one value", {"rule": [r(when={"country_in": "US"})]},
     f"{FW}.when.country_in", "expected a list"),
    ("equality given a list", {"rule": [r(when={"country": ["US"]})]},
     f"{FW}.when.country", "use the _in or _not_in form"),
    ("a country that is no ISO code", {"rule": [r(when={"country_in": ["US", "XX"]})]},
     f"{FW}.when.country_in", "'XX' is not an ISO 3166-1 alpha-2 country code"),
    ("a misspelt enumerated value", {"rule": [r(when={"os": "widnows"})]},
     f"{FW}.when.os", "'widnows' is not a value of os; values: android"),
    ("a CIDR with host bits", {"rule": [r(when={"ip_in": ["192.0.2.1/24"]})]},
     f"{FW}.when.ip_in", "'192.0.2.1/24' is not an address or CIDR network"),
    ("a domain that is only a dot", {"rule": [r(when={"rdns_domain": "."})]},
     f"{FW}.when.rdns_domain", "is not a domain name"),
    ("a fact not yet known at the rule's stage", {"rule": [r(stage="connect", when={"sender": "a@b"})]},
     f"{FW}.when.sender", "sender is known from stage mail on; this rule runs at stage connect"),
    ("dkim before data", {"rule": [r(when={"dkim": "fail"})]},
     f"{FW}.when.dkim", "known from stage data on"),
    ("an unknown named list", {"lists": HOME, "rule": [r(when={"country_in": "$hom"})]},
     f"{FW}.when.country_in", "unknown named list '$hom'; [lists] defines: $home"),
    ("a named list with equality", {"lists": HOME, "rule": [r(when={"country": "$home"})]},
     f"{FW}.when.country", "a named list needs _in or _not_in: write country_in = '$home'"),
    ("a country in a named list is checked where used",
     {"lists": {"home": ["US", "ZZ"]}, "rule": [r(when={"country_in": "$home"})]},
     f"{FW}.when.country_in", "'ZZ' is not an ISO"),
    ("when that is not a table", {"rule": [r(when="os = windows")]},
     f"{FW}.when", "expected a table of conditions"),
    ("an unknown action", {"rule": [r(action="bounce")]},
     f"{FW}.action", "unknown action 'bounce'; actions: reject, tempfail"),
    ("a missing action", {"rule": [{"name": "foreign-windows"}]},
     f"{FW}.action", "missing; actions"),
    ("an unknown stage", {"rule": [r(stage="rctp")]},
     f"{FW}.stage", "unknown stage 'rctp'; stages: connect, helo, mail, rcpt, data"),
    ("graylisting before the recipient is known", {"rule": [r(stage="connect", action="graylist")]},
     f"{FW}.action", "use stage = \"rcpt\""),
    ("a missing name", {"rule": [r(), {"action": "reject"}]},
     "rule[2].name", "missing"),
    ("a name with a space", {"rule": [r(name="foreign windows")]},
     "rule[1].name", "is not a rule name"),
    ("a duplicate name names the second rule", {"rule": [r(), r()]},
     'rule[2] "foreign-windows".name', "duplicate name, already used by rule[1] \"foreign-windows\""),
    ("the built-in postmaster name is taken", {"rule": [r(name="postmaster")]},
     'rule[1] "postmaster".name', "the built-in postmaster allowlist"),
    ("strict on a reject", {"rule": [r(strict=True)]},
     f"{FW}.strict", "strict applies to graylist only"),
    ("strict that is not a boolean", {"rule": [r(action="graylist", strict="yes")]},
     f"{FW}.strict", "expected true or false"),
    ("observe that is not a boolean", {"rule": [r(observe=1)]},
     f"{FW}.observe", "expected true or false, got 1"),
    ("a delay on a reject", {"rule": [r(delay="5s")]},
     f"{FW}.delay", "delay applies to tarpit only"),
    ("a tarpit delay beyond client timeouts", {"rule": [r(action="tarpit", delay="5m")]},
     f"{FW}.delay", "at most 119s"),
    ("a tarpit delay that is no duration", {"rule": [r(action="tarpit", delay="soon")]},
     f"{FW}.delay", "expected a duration"),
    ("a lower-case reason code", {"rule": [r(reason="geo")]},
     f"{FW}.reason", "'geo' is not a reason code"),
    ("a reason code too long", {"rule": [r(reason="A" * 21)]},
     f"{FW}.reason", "is not a reason code"),
    ("a text with a line break", {"rule": [r(text="no\r\n250 ok")]},
     f"{FW}.text", "printable ASCII"),
    ("an unknown rule key", {"rule": [r(wehn={"os": "windows"})]},
     f"{FW}.wehn", "unknown key; rule keys: name, stage, when"),
    ("[rule] written as a table", {"rule": r()},
     "rule", "write [[rule]], not [rule]"),
    ("a rule that is not a table", {"rule": ["reject"]},
     "rule[1]", "expected a table"),
    ("an unknown [policy] key", {"policy": {"observ": True}},
     "policy.observ", "unknown key; known keys in [policy]: observe, reject_at, default_postmaster"),
    ("reject_at at an unsupported stage", {"policy": {"reject_at": "helo"}},
     "policy.reject_at", "expected one of rcpt, connect, got 'helo'"),
    ("global observe that is not a boolean", {"policy": {"observe": "yes"}},
     "policy.observe", "expected true or false"),
    ("default_postmaster that is not a boolean", {"policy": {"default_postmaster": "no"}},
     "policy.default_postmaster", "expected true or false"),
    ("a named list that is not a list", {"lists": {"home": "US"}},
     "lists.home", "expected a list"),
    ("a named list including another", {"lists": {"a": ["US"], "b": ["$a"]}},
     "lists.b", "cannot include another"),
    ("a named list with a bad name", {"lists": {"1st": ["US"]}},
     "lists.1st", "a list name is a letter"),
]


@pytest.mark.parametrize("label, doc, key, words", ERROR_CASES, ids=ids(ERROR_CASES))
def test_validation_error(label: str, doc: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_policy(doc)
    assert caught.value.key == key
    assert words in caught.value.message
    assert str(caught.value).startswith(f"{key}: ")


def test_duplicate_of_an_implicit_rule_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_policy({"rule": [r(name="geo-allow")]}, implicit=geo_rules(["US"]))
    assert caught.value.key == 'rule[1] "geo-allow".name'
    assert "an implicit rule" in caught.value.message


GEO_ERRORS = [
    ("an allowed country that is no code", dict(allow=["XX"]), "geo.allow", "'XX' is not an ISO"),
    ("local cannot be denied", dict(allow=[], deny=["local"]), "geo.deny", "'local' is not an ISO"),
    ("a country string instead of a list", dict(allow="US"), "geo.allow", "expected a list"),
    ("an unknown action for unknown countries", dict(allow=["US"], unknown_action="drop"),
     "geo.unknown", "expected one of continue, allow, tempfail, reject, deny"),
]


@pytest.mark.parametrize("label, kwargs, key, words", GEO_ERRORS, ids=ids(GEO_ERRORS))
def test_geo_shorthand_error(label: str, kwargs: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        geo_rules(**kwargs)
    assert caught.value.key == key and words in caught.value.message


def test_a_valid_document_parses_every_action() -> None:
    # drop acts in the screen: connect stage (graylist needs rcpt, the default)
    rules = [{"name": f"r-{a}", "action": a, **({"stage": "connect"} if a == "drop" else {})} for a in ACTIONS]
    policy = parse_policy({"rule": rules})
    assert [rl.action for rl in policy.rules] == list(ACTIONS)


# ---------------------------------------------------------------------------
# decide(): (label, policy document, stage, facts, expected verdict fields)

def doc(*rules: dict[str, Any], **policy: Any) -> dict[str, Any]:
    return {"policy": policy, "rule": list(rules)}


WIN = {"os": "windows"}
DECIDE_CASES: list[tuple[str, dict[str, Any], str, dict[str, Any], dict[str, Any]]] = [
    ("no matching rule proceeds",
     doc({"name": "a", "when": WIN, "action": "reject"}), "rcpt", {"os": "linux"},
     dict(action="continue", rule=None, deferred_to=None)),
    ("reject refuses with the rule's reason and text",
     doc({"name": "a", "when": WIN, "action": "reject", "reason": "GEO-OS", "text": "no bots"}),
     "rcpt", WIN, dict(action="reject", rule="a", reason="GEO-OS", text="no bots", stage="rcpt")),
    ("reject without a reason gets POLICY and its text",
     doc({"name": "a", "action": "reject"}), "rcpt", {},
     dict(action="reject", reason="POLICY", text="refused by local policy")),
    ("a known reason supplies its text from the reply table",
     doc({"name": "a", "action": "reject", "reason": "DNSBL"}), "rcpt", {},
     dict(text="the client address is listed by a DNS blocklist")),
    ("tempfail without a reason gets TEMP",
     doc({"name": "a", "action": "tempfail"}), "rcpt", {},
     dict(action="tempfail", reason="TEMP", deferred_to=None)),
    ("a custom reason on a tempfail keeps a deferral text",
     doc({"name": "a", "action": "tempfail", "reason": "MY-TEMP"}), "rcpt", {},
     dict(text="temporarily refused by local policy, try again later")),
    ("the first matching rule wins",
     doc({"name": "a", "when": WIN, "action": "tempfail"}, {"name": "b", "action": "reject"}),
     "rcpt", WIN, dict(action="tempfail", rule="a")),
    ("a rule that does not match lets the next decide",
     doc({"name": "a", "when": WIN, "action": "tempfail"}, {"name": "b", "action": "reject"}),
     "rcpt", {"os": "linux"}, dict(action="reject", rule="b")),
    ("a connect rule is not checked at rcpt",
     doc({"name": "a", "stage": "connect", "action": "reject"}), "rcpt", {},
     dict(action="continue", rule=None)),
    ("a rcpt rule is not checked at connect",
     doc({"name": "a", "stage": "rcpt", "action": "reject"}), "connect", {},
     dict(action="continue", rule=None)),
    ("rules default to the rcpt stage",
     doc({"name": "a", "action": "reject"}), "rcpt", {}, dict(rule="a", stage="rcpt")),
    # accept
    ("accept at connect is sticky for the session",
     doc({"name": "a", "stage": "connect", "action": "accept"}), "connect", {},
     dict(action="accept", sticky=True)),
    ("accept at mail is sticky for the transaction",
     doc({"name": "a", "stage": "mail", "action": "accept"}), "mail", {},
     dict(action="accept", sticky=True)),
    ("accept at rcpt covers that recipient only",
     doc({"name": "a", "action": "accept"}), "rcpt", {}, dict(action="accept", sticky=False)),
    ("accept stops later rules",
     doc({"name": "a", "action": "accept"}, {"name": "b", "action": "reject"}), "rcpt", {},
     dict(action="accept", rule="a")),
    # continue and tarpit
    ("continue records the match and evaluation goes on",
     doc({"name": "a", "action": "continue"}, {"name": "b", "action": "reject"}), "rcpt", {},
     dict(action="reject", rule="b", matched=("a",))),
    ("continue alone proceeds",
     doc({"name": "a", "action": "continue"}), "rcpt", {},
     dict(action="continue", rule=None, matched=("a",))),
    ("tarpit slows the session by the default delay and goes on",
     doc({"name": "a", "stage": "connect", "action": "tarpit"}), "connect", {},
     dict(action="continue", delay=DEFAULT_TARPIT_DELAY, matched=("a",))),
    ("a tarpit delay rides on the verdict that follows",
     doc({"name": "a", "stage": "connect", "action": "tarpit", "delay": "30s"},
         {"name": "b", "stage": "connect", "action": "reject"}, reject_at="connect"),
     "connect", {}, dict(action="reject", rule="b", delay=30.0)),
    # graylist
    ("graylist asks for the graylist fact first",
     doc({"name": "g", "when": WIN, "action": "graylist", "strict": True}), "rcpt", WIN,
     dict(action="graylist", rule="g", needs=("graylist",), strict=True, reason="GRAYLIST")),
    ("a new triplet is deferred",
     doc({"name": "g", "action": "graylist"}), "rcpt", {"graylist": "new"},
     dict(action="graylist", needs=(), text="graylisted, try again later")),
    ("a triplet still in its delay is deferred",
     doc({"name": "g", "action": "graylist"}), "rcpt", {"graylist": "deferred"},
     dict(action="graylist", needs=())),
    ("a passed triplet goes on to the next rule",
     doc({"name": "g", "action": "graylist"}, {"name": "b", "action": "reject"}), "rcpt",
     {"graylist": "passed"}, dict(action="reject", rule="b")),
    ("an allowed client passes",
     doc({"name": "g", "action": "graylist"}), "rcpt", {"graylist": "allowed"},
     dict(action="continue", rule=None)),
    ("a trapped client ends evaluation for the session to answer TRAP",
     doc({"name": "g", "action": "graylist"}, {"name": "b", "action": "accept"}), "rcpt",
     {"graylist": "trapped"}, dict(action="graylist", rule="g", needs=())),
    ("a store that cannot answer ends evaluation for graylist.on_error to settle",
     doc({"name": "g", "action": "graylist"}, {"name": "b", "action": "accept"}), "rcpt",
     {"graylist": "unknown"}, dict(action="graylist", rule="g", needs=())),
    # observe
    ("an observed rule records what it would do and does not act",
     doc({"name": "a", "action": "reject", "reason": "GEO", "observe": True}), "rcpt", {},
     dict(action="continue", rule=None, observed=(("a", "reject", "GEO"),), observe=False)),
    ("after an observed rule the next rule decides",
     doc({"name": "a", "action": "reject", "reason": "GEO", "observe": True},
         {"name": "b", "action": "tempfail"}), "rcpt", {},
     dict(action="tempfail", rule="b", observed=(("a", "reject", "GEO"),))),
    ("global observe records every match and acts on none",
     doc({"name": "a", "action": "accept"}, {"name": "b", "action": "reject"}, observe=True),
     "rcpt", {"rcpt": "bob@example.com"},
     dict(action="continue", rule=None, observe=True,
          observed=(("a", "accept", "ACCEPT"), ("b", "reject", "POLICY")))),
    ("an observed graylist rule does not ask for a lookup",
     doc({"name": "g", "action": "graylist", "observe": True}), "rcpt", {},
     dict(action="continue", needs=(), observed=(("g", "graylist", "GRAYLIST"),))),
    ("an observed tarpit does not slow the session",
     doc({"name": "t", "stage": "connect", "action": "tarpit", "observe": True}), "connect", {},
     dict(action="continue", delay=0.0, observed=(("t", "tarpit", "TARPIT"),))),
    # reject_at
    ("a connect reject is held back to rcpt by default",
     doc({"name": "a", "stage": "connect", "action": "reject"}), "connect", {},
     dict(action="reject", deferred_to="rcpt", stage="connect")),
    ("a helo reject is held back to rcpt",
     doc({"name": "a", "stage": "helo", "action": "reject"}), "helo", {},
     dict(action="reject", deferred_to="rcpt")),
    ("a mail reject is held back to rcpt so postmaster stays reachable",
     doc({"name": "a", "stage": "mail", "action": "reject"}), "mail", {},
     dict(action="reject", deferred_to="rcpt")),
    ("a connect tempfail is held back too",
     doc({"name": "a", "stage": "connect", "action": "tempfail"}), "connect", {},
     dict(action="tempfail", deferred_to="rcpt")),
    ("reject_at connect refuses at once",
     doc({"name": "a", "stage": "connect", "action": "reject"}, reject_at="connect"), "connect", {},
     dict(action="reject", deferred_to=None)),
    ("a data-stage reject is never held back",
     doc({"name": "a", "stage": "data", "action": "reject"}), "data", {},
     dict(action="reject", deferred_to=None)),
    # postmaster
    ("postmaster@ is accepted before every rcpt rule",
     doc({"name": "a", "action": "reject"}), "rcpt", {"rcpt": "postmaster@example.com"},
     dict(action="accept", rule="postmaster", sticky=False)),
    ("abuse@ is accepted before every rcpt rule",
     doc({"name": "a", "action": "reject"}), "rcpt", {"rcpt": "Abuse@example.com"},
     dict(action="accept", rule="postmaster")),
    ("another recipient meets the rule",
     doc({"name": "a", "action": "reject"}), "rcpt", {"rcpt": "bob@example.com"},
     dict(action="reject", rule="a")),
    ("without default_postmaster postmaster@ meets the rule",
     doc({"name": "a", "action": "reject"}, default_postmaster=False), "rcpt",
     {"rcpt": "postmaster@example.com"}, dict(action="reject", rule="a")),
    ("the postmaster allowlist acts even in global observe",
     doc({"name": "a", "action": "reject"}, observe=True), "rcpt",
     {"rcpt": "postmaster@example.com"}, dict(action="accept", rule="postmaster", observed=())),
]


@pytest.mark.parametrize("label, document, stage, facts, expected", DECIDE_CASES, ids=ids(DECIDE_CASES))
def test_decide(label: str, document: dict[str, Any], stage: str, facts: dict[str, Any],
                expected: dict[str, Any]) -> None:
    verdict = decide(parse_policy(document), stage, facts)
    assert {k: getattr(verdict, k) for k in expected} == expected


# A session's life with a held-back refusal: (label, stage, facts, expected).
HELD_POLICY = doc(
    {"name": "bot", "stage": "connect", "when": WIN, "action": "reject", "reason": "GEO-OS"},
    {"name": "helo-rule", "stage": "helo", "action": "reject"},
    {"name": "rcpt-accept", "stage": "rcpt", "action": "accept"},
    {"name": "data-rule", "stage": "data", "when": {"dkim": "fail"}, "action": "reject"},
)
HELD_CASES: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("at helo the held refusal is handed back unchanged", "helo", WIN,
     dict(action="reject", rule="bot", deferred_to="rcpt")),
    ("at mail it is still held", "mail", WIN, dict(action="reject", rule="bot", deferred_to="rcpt")),
    ("at rcpt it is enforced for an ordinary recipient", "rcpt", {**WIN, "rcpt": "bob@example.com"},
     dict(action="reject", rule="bot", reason="GEO-OS", deferred_to=None, stage="connect")),
    ("at rcpt postmaster@ still gets through", "rcpt", {**WIN, "rcpt": "postmaster@example.com"},
     dict(action="accept", rule="postmaster")),
    ("an admin's rcpt accept does not lift a refusal decided earlier", "rcpt",
     {**WIN, "rcpt": "sales@example.com"}, dict(action="reject", rule="bot")),
    ("after rcpt the message to postmaster meets the data rules", "data", {**WIN, "dkim": "fail"},
     dict(action="reject", rule="data-rule", deferred_to=None)),
]


@pytest.mark.parametrize("label, stage, facts, expected", HELD_CASES, ids=ids(HELD_CASES))
def test_held_back_refusal(label: str, stage: str, facts: dict[str, Any],
                           expected: dict[str, Any]) -> None:
    policy = parse_policy(HELD_POLICY)
    pending = decide(policy, "connect", WIN)
    assert pending.deferred_to == "rcpt"
    verdict = decide(policy, stage, facts, pending=pending)
    assert {k: getattr(verdict, k) for k in expected} == expected


def test_a_graylist_verdict_is_settled_by_a_second_call() -> None:
    policy = parse_policy(doc({"name": "g", "when": WIN, "action": "graylist", "strict": True},
                              {"name": "b", "when": {"dnsbl_score_ge": 3}, "action": "reject"}))
    first = decide(policy, "rcpt", {**WIN, "dnsbl_score": 5})
    assert (first.action, first.needs, first.strict) == ("graylist", ("graylist",), True)
    second = decide(policy, "rcpt", {**WIN, "dnsbl_score": 5, "graylist": "passed"})
    assert (second.action, second.rule) == ("reject", "b")


def test_unknown_stage_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="unknown stage 'quit'"):
        decide(Policy(), "quit", {})


def test_verdicts_are_frozen() -> None:
    verdict = decide(Policy(), "rcpt", {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        verdict.action = "reject"  # type: ignore[misc]


# ---------------------------------------------------------------------------
# Reply codes: (label, action, reason, stage, expected)

REPLY_CASES: list[tuple[str, str, str, str, tuple[int, str] | None]] = [
    ("a reject at rcpt is 550 5.7.1", "reject", "GEO", "rcpt", (550, "5.7.1")),
    ("a reject keeps its reason's own enhanced code", "reject", "RDNS", "rcpt", (550, "5.7.25")),
    ("a tempfail is 451 4.7.1", "tempfail", "TEMP", "rcpt", (451, "4.7.1")),
    ("a tempfail keeps DNS-TEMP's 4.4.3", "tempfail", "DNS-TEMP", "rcpt", (451, "4.4.3")),
    ("a tempfail with a 5xx reason stays 4xx", "tempfail", "DNSBL", "rcpt", (451, "4.7.1")),
    ("a reject with a 4xx reason stays 5xx", "reject", "GRAYLIST", "rcpt", (550, "5.7.1")),
    ("a custom reason takes the action's code", "reject", "MY-RULE", "mail", (550, "5.7.1")),
    ("graylisting is 451 4.7.1", "graylist", "GRAYLIST", "rcpt", (451, "4.7.1")),
    ("a reject at the greeting is 554", "reject", "GEO", "connect", (554, "5.7.1")),
    ("a tempfail at the greeting is 421", "tempfail", "DNS-TEMP", "connect", (421, "4.4.3")),
    ("accept writes no reply of its own", "accept", "ACCEPT", "rcpt", None),
    ("continue writes no reply of its own", "continue", "MATCH", "rcpt", None),
    ("tarpit writes no reply of its own", "tarpit", "TARPIT", "connect", None),
]


@pytest.mark.parametrize("label, action, reason, stage, expected", REPLY_CASES, ids=ids(REPLY_CASES))
def test_reply_code(label: str, action: str, reason: str, stage: str,
                    expected: tuple[int, str] | None) -> None:
    assert reply_code(action, reason, stage) == expected


# ---------------------------------------------------------------------------
# The geo shorthand and the shipped default policy

def default_policy(allow: list[str] | None = None, unknown: str = "continue") -> Policy:
    return parse_policy(tomllib.loads(default_rules_toml()),
                        implicit=geo_rules(allow if allow is not None else ["US", "CA", "MX"],
                                           [], unknown))


DEFAULT_CASES: list[tuple[str, str, dict[str, Any], dict[str, Any]]] = [
    ("a foreign client is refused by geo, held to rcpt", "connect",
     {"country": "DE", "os": "linux", "rdns": "confirmed"},
     dict(action="reject", rule="geo-allow", reason="GEO", deferred_to="rcpt")),
    ("a home client passes geo", "connect", {"country": "US", "os": "linux", "rdns": "confirmed"},
     dict(action="continue", rule=None)),
    ("a local address is never blocked by geo", "connect", {"country": "local"},
     dict(action="continue", rule=None)),
    ("a country no zone lists passes by default", "connect", {"country": "unknown"},
     dict(action="continue", rule=None)),
    ("a Windows host without reverse DNS is refused", "connect",
     {"country": "US", "os": "windows", "os_match": "exact", "rdns": "none"},
     dict(action="reject", rule="windows-no-rdns", reason="OS-RDNS")),
    ("a Windows host whose name does not resolve back is refused", "connect",
     {"country": "US", "os": "windows", "os_match": "generic", "rdns": "unconfirmed"},
     dict(action="reject", rule="windows-no-rdns")),
    ("a Windows host with a dynamic-pool name is refused, at HELO (the name is weighed with the HELO)", "helo",
     {"country": "US", "os": "windows", "os_match": "exact", "rdns": "confirmed", "rdns_generic": True},
     dict(action="reject", rule="windows-generic-rdns", reason="OS-RDNS")),
    ("a fuzzy Windows match without reverse DNS is not refused (issue 14: only a sure match)", "connect",
     {"country": "US", "os": "windows", "os_match": "fuzzy", "rdns": "none", "rdns_generic": True},
     dict(action="continue", rule=None)),
    ("a Windows host whose reverse DNS failed is told to retry", "connect",
     {"country": "US", "os": "windows", "rdns": "unknown"},
     dict(action="tempfail", rule="windows-rdns-temp", reason="DNS-TEMP")),
    ("a Windows mail server with a proper name passes connect", "connect",
     {"country": "US", "os": "windows", "rdns": "confirmed", "rdns_generic": False},
     dict(action="continue", rule=None)),
    ("that Windows server is graylisted strictly at rcpt", "rcpt",
     {"os": "windows", "rcpt": "bob@example.com"},
     dict(action="graylist", rule="windows-graylist", strict=True, needs=("graylist",))),
    ("a Linux host without reverse DNS is not refused for it", "connect",
     {"country": "US", "os": "linux", "rdns": "none"}, dict(action="continue", rule=None)),
    ("a DNSBL score at the threshold is refused", "connect", {"country": "US", "dnsbl_score": 3},
     dict(action="reject", rule="dnsbl", reason="DNSBL")),
    ("a DNSBL score below the threshold passes", "connect", {"country": "US", "dnsbl_score": 2},
     dict(action="continue", rule=None)),
    ("DNS lists that could not be queried pass", "connect",
     {"country": "US", "dnsbl_score": "unknown"}, dict(action="continue", rule=None)),
    ("a HELO with our own name is refused", "helo", {"helo_is_us": True},
     dict(action="reject", rule="helo-forged", reason="HELO-FORGED")),
    ("a HELO that does not match the client alone is never refused (RFC 5321 4.1.4)", "helo",
     {"helo_is_us": False, "helo_matches_ip": False, "helo_matches_rdns": False,
      "helo_resolves": False}, dict(action="continue", rule=None)),
    ("postmaster@ is reachable from a Windows host", "rcpt",
     {"os": "windows", "rcpt": "postmaster@example.com"}, dict(action="accept", rule="postmaster")),
]


@pytest.mark.parametrize("label, stage, facts, expected", DEFAULT_CASES, ids=ids(DEFAULT_CASES))
def test_default_policy(label: str, stage: str, facts: dict[str, Any],
                        expected: dict[str, Any]) -> None:
    verdict = decide(default_policy(), stage, facts)
    assert {k: getattr(verdict, k) for k in expected} == expected


@pytest.mark.parametrize("stage", ["connect", "helo", "mail", "rcpt", "data"],
                         ids=lambda s: f"an outage of every lookup never rejects at {s}")
def test_an_outage_never_rejects(stage: str) -> None:
    policy = default_policy(unknown="continue")
    verdict = decide(policy, stage, {fact: "unknown" for fact in FACTS})
    assert verdict.action not in ("reject",)


GEO_SHORTHAND = [
    ("deny refuses the listed countries", dict(allow=[], deny=["RU"]), {"country": "RU"}, "geo-deny"),
    ("deny leaves the others", dict(allow=[], deny=["RU"]), {"country": "DE"}, None),
    ("unknown = tempfail defers an unplaced address", dict(allow=["US"], unknown_action="tempfail"),
     {"country": "unknown"}, "geo-unknown"),
    ("unknown = reject refuses it", dict(allow=["US"], unknown_action="reject"),
     {"country": "unknown"}, "geo-unknown"),
    ("unknown = deny (GeoSettings' word) refuses it", dict(allow=["US"], unknown_action="deny"),
     {"country": "unknown"}, "geo-unknown"),
    ("unknown = allow lets it through", dict(allow=["US"], unknown_action="allow"),
     {"country": "unknown"}, None),
    ("unknown = deny with a deny list refuses it too", dict(allow=[], deny=["RU"], unknown_action="deny"),
     {"country": "unknown"}, "geo-unknown"),
    ("nothing configured makes no rule", dict(allow=[]), {"country": "RU"}, None),
    ("without allow or deny there is no geoblocking, so unknown is not refused",
     dict(allow=[], unknown_action="deny"), {"country": "unknown"}, None),
]


@pytest.mark.parametrize("label, kwargs, facts, rule", GEO_SHORTHAND, ids=ids(GEO_SHORTHAND))
def test_geo_shorthand(label: str, kwargs: dict[str, Any], facts: dict[str, Any],
                       rule: str | None) -> None:
    policy = parse_policy({}, implicit=geo_rules(**kwargs))
    verdict = decide(policy, "connect", facts)
    assert verdict.rule == rule
    assert all(rl.stage == "connect" and rl.reason == "GEO" for rl in policy.rules)


def test_geo_rules_run_after_connect_allowlists_and_before_other_written_rules() -> None:
    written = [{"name": "partner", "stage": "connect", "when": {"ip_in": ["192.0.2.0/24"]}, "action": "accept"},
               {"name": "no-rdns", "stage": "connect", "when": {"rdns": "none"}, "action": "reject"}]
    policy = parse_policy({"rule": written}, implicit=geo_rules(["US"]))
    assert [rl.name for rl in policy.rules] == ["partner", "geo-allow", "no-rdns"]
    # a partner abroad passes the default-deny shorthand; everyone else abroad does not
    assert decide(policy, "connect", {"ip": "192.0.2.7", "country": "CN"}).action == "accept"
    assert decide(policy, "connect", {"ip": "198.51.100.7", "country": "CN", "rdns": "none"}).rule == "geo-allow"
    assert decide(policy, "connect", {"country": "DE"}).rule == "geo-allow"


def test_the_shipped_policy_is_the_example_file_s() -> None:
    # one source of truth (issue 16): the rules the tests run are the
    # example configuration's, which `make run` and the README ship
    example = tomllib.loads(EXAMPLE.read_text(encoding="utf-8"))
    shipped = parse_policy(tomllib.loads(default_rules_toml()))
    assert shipped == parse_policy({k: example[k] for k in ("policy", "lists", "rule") if k in example})
    assert [r.name for r in shipped.rules] == ["helo-forged", "pregreet", "dnsbl", "windows-rdns-temp",
                                               "windows-no-rdns", "windows-generic-rdns", "windows-graylist"]


def test_the_shipped_policy_reader_refuses_a_part_that_is_not_the_whole_policy(tmp_path: Path) -> None:
    conf = tmp_path / "c.toml"
    conf.write_text('[policy]\nobserve = false\n[[rule]]\nname = "r"\naction = "reject"\n'
                    '[log]\nlevel = "info"\n')
    with pytest.raises(ValueError, match="not exactly"):
        default_rules_toml(conf)
    conf.write_text('[[rule]]\nname = "r"\naction = "reject"\n[policy]\nobserve = false\n')
    with pytest.raises(ValueError, match="not exactly"):
        default_rules_toml(conf)
    conf.write_text('[log]\nlevel = "info"\n\n[policy]\nobserve = true\n\n[lists]\nhome = ["US"]\n')
    assert tomllib.loads(default_rules_toml(conf)) == {"policy": {"observe": True}, "lists": {"home": ["US"]}}


def test_the_core_keeps_no_copy_of_the_shipped_rules() -> None:
    core = Path(__file__).resolve().parent.parent / "smtpguard" / "core"
    for module in core.glob("*.py"):
        text = module.read_text(encoding="utf-8")
        assert "DEFAULT_RULES_TOML" not in text and 'name = "windows-graylist"' not in text, module.name


def test_the_built_in_postmaster_rule_is_what_the_parser_compiles() -> None:
    # core.ruleset writes the rule out so that it needs no parser; it must
    # stay what the rule language gives for the same table
    from smtpguard.core.rules import _rule
    parsed = _rule(0, {"name": "postmaster", "stage": "rcpt", "action": "accept", "reason": "POSTMASTER",
                       "when": {"rcpt_local_in": ["postmaster", "abuse"]}}, {}, FACT_TABLE, builtin=True)
    assert parsed == POSTMASTER_RULE


def test_policy_lists_the_facts_its_rules_read() -> None:
    policy = default_policy()
    assert policy.facts("connect") == {"country", "os", "os_match", "rdns", "dnsbl_score", "pregreet"}
    assert policy.facts("helo") == {"helo_is_us", "os", "os_match", "rdns_generic"}
    assert policy.facts("rcpt") == {"rcpt", "os"}  # the postmaster allowlist reads rcpt


def test_explain_names_the_condition_that_failed() -> None:
    policy = default_policy()
    rows = dict((name, (hit, failed)) for name, hit, failed in
                explain(policy, "connect", {"country": "US", "os": "windows", "os_match": "exact", "rdns": "none"}))
    assert rows["windows-no-rdns"] == (True, "")
    assert rows["windows-rdns-temp"] == (False, "rdns")
    assert rows["geo-allow"] == (False, "country_not_in")
