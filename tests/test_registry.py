"""The source registry (issue 16): adding a fact is one module and one line.

What these prove:
  * the tables the code reads (FACTS, FACT_STAGE, ENUM_VALUES, SOURCE_FACTS,
    config's tables) are derived from the sources' declarations, and a
    declaration that contradicts another is refused when the registry is built;
  * the recipe of docs/adding-a-fact.md works end to end: a source module
    the registry file does not list (an `asn` fact, built here as a module
    object) is registered in the test; its [asn] table is read by config, a
    rule on `asn` refuses a client through `smtpguard check` and in a live
    SMTP session on loopback;
  * a rule naming a fact no registered source provides is still a one-line
    config error (exit 2), and so is a table no source owns;
  * the stage loop turns a source that has not finished within [dns]
    stage_budget into `unknown` for each of its facts.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import smtplib
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from smtpguard import config as cfg
from smtpguard.commands.check import evaluate
from smtpguard.core.facts import NONE, OK, FactSpec, FactValue, Kind, SourceSpec
from smtpguard.core.settings import reject_unknown_keys
from smtpguard.core.tables import CORE_FACTS, STAGES, fact_table
from smtpguard.errors import ConfigError
from smtpguard.sources import Context, table
from smtpguard.sources.registry import (
    ENUM_VALUES,
    FACT_STAGE,
    FACTS,
    REGISTRY,
    SOURCE_FACTS,
    SOURCES,
    Registry,
    Source,
)
from tests.fixtures_smtp import wait_for

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------
# The test-only source of the recipe: `asn`, the client's autonomous system
# from a table in the config (docs/adding-a-fact.md shows it as a file,
# smtpguard/sources/asn.py).

@dataclass(frozen=True, slots=True)
class AsnSettings:
    networks: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, int], ...] = ()


@dataclass(frozen=True, slots=True)
class AsnFact:
    status: str
    asn: int

    def as_facts(self) -> dict[str, FactValue]:
        return {"asn": self.asn}


def _asn_settings(raw: Any) -> AsnSettings:
    got = table(raw, "asn")
    reject_unknown_keys(got, "asn", ("networks",))
    raw_networks = got.get("networks", {})
    if not isinstance(raw_networks, dict):
        raise ConfigError("asn.networks", "expected a table of CIDR = AS number")
    out = []
    for cidr, number in raw_networks.items():
        try:
            net = ipaddress.ip_network(cidr)
        except ValueError:
            raise ConfigError("asn.networks", f"{cidr!r} is not a CIDR network") from None
        if isinstance(number, bool) or not isinstance(number, int) or not 0 < number < 2**32:
            raise ConfigError("asn.networks", f"{number!r} is not an AS number")
        out.append((net, number))
    return AsnSettings(tuple(out))


async def _asn_gather(ctx: Context) -> AsnFact:
    ip = ipaddress.ip_address(ctx.client.ip)
    for net, number in ctx.settings.networks:
        if ip.version == net.version and ip in net:
            return AsnFact(OK, number)
    return AsnFact(NONE, 0)


def make_source(name: str = "asn", **spec: Any) -> types.ModuleType:
    """A source module, as smtpguard/sources/<name>.py would be."""
    module = types.ModuleType(f"test_sources_{name}")
    module.SOURCE = SourceSpec(**{"name": name, "stage": "connect", "area": name,  # type: ignore[attr-defined]
                                  "facts": (FactSpec(name, Kind.NUMBER),), **spec})
    module.read_settings = _asn_settings  # type: ignore[attr-defined]
    module.gather_facts = _asn_gather     # type: ignore[attr-defined]
    return module


ASN = make_source()
ASN_REGISTRY = REGISTRY.with_modules(ASN)
ASN_RULE = {"name": "bad-network", "stage": "connect", "when": {"asn": 64500}, "action": "reject",
            "reason": "ASN", "text": "mail from this network is not accepted"}


def _flags(dns_server: Any, **more: Any) -> dict[str, Any]:
    return {"upstream": "127.0.0.1:25", "domain": ["example.test"], "hostname": "mx.example.test",
            "dns_server": [dns_server.address], **more}


# ---------------------------------------------------------------------------
# Derived tables


def test_every_fact_a_rule_may_name_comes_from_core_or_one_source() -> None:
    core = {f.name for f in CORE_FACTS}
    by_source = [f for s in REGISTRY.sources for f in s.spec.fact_names()]
    assert len(by_source) == len(set(by_source)) and not core & set(by_source)
    assert set(FACTS) == core | set(by_source)
    for source in REGISTRY.sources:
        assert SOURCE_FACTS[source.spec.name] == source.spec.fact_names()
        for fact in source.spec.facts:
            assert FACT_STAGE[fact.name] == source.spec.stage
            assert FACTS[fact.name] is fact.kind
            assert ENUM_VALUES.get(fact.name, frozenset()) == fact.values


def test_the_registry_lists_each_shipped_source_module_once() -> None:
    names = [s.spec.name for s in REGISTRY.sources]
    assert [m.__name__.rsplit(".", 1)[1] for m in SOURCES] == names
    shipped = sorted(p.stem for p in (ROOT / "smtpguard" / "sources").glob("*.py")
                     if p.stem not in ("__init__", "registry"))
    assert sorted(names) == shipped   # a module that is not listed is a source nobody runs


def test_config_reads_every_source_table_and_refuses_a_table_nobody_owns(dns_server: Any) -> None:
    for source in REGISTRY.areas():
        assert source.spec.area in cfg.Config.__dataclass_fields__ or source.spec.area == "asn"
    with pytest.raises(ConfigError) as err:
        cfg.build({"asn": {"networks": {}}}, _flags(dns_server))
    assert err.value.key == "asn" and "unknown table" in err.value.message
    config = cfg.build({"asn": {"networks": {"192.0.2.0/24": 64500}}}, _flags(dns_server), registry=ASN_REGISTRY)
    assert config.area("asn") == AsnSettings(((ipaddress.ip_network("192.0.2.0/24"), 64500),))
    for bad, key in (({"networks": {"192.0.2.0/24": "x"}}, "asn.networks"), ({"netwroks": {}}, "asn.netwroks"),
                     ("192.0.2.0/24", "asn")):
        with pytest.raises(ConfigError) as err:
            cfg.build({"asn": bad}, _flags(dns_server), registry=ASN_REGISTRY)
        assert err.value.key == key


def _spec(name: str, stage: str = "connect", facts: tuple[FactSpec, ...] | None = None, **kw: Any) -> SourceSpec:
    return SourceSpec(name=name, stage=stage, facts=facts if facts is not None else (FactSpec(name, Kind.TEXT),), **kw)


CONTRADICTIONS = [
    ("a fact the core already has", [_spec("x", facts=(FactSpec("ip", Kind.IP),))], "declared twice"),
    ("a fact two sources provide", [_spec("a", facts=(FactSpec("f", Kind.TEXT),)),
                                    _spec("b", facts=(FactSpec("f", Kind.TEXT),))], "declared twice"),
    ("a derived fact's name", [_spec("x", facts=(FactSpec("rcpt_local", Kind.TEXT),))], "declared twice"),
    ("one source named twice", [_spec("a"), _spec("a", facts=(FactSpec("g", Kind.TEXT),))], "declared twice"),
    ("a stage that does not exist", [_spec("a", stage="quit")], "unknown stage"),
    ("values on a number fact", [_spec("a", facts=(FactSpec("a", Kind.NUMBER, frozenset({"x"})),))],
     "not a text fact"),
    ("a need of a later stage's source", [_spec("a", needs=("b",)), _spec("b", stage="helo")], "needs 'b'"),
    ("a need of no source", [_spec("a", needs=("nobody",))], "needs 'nobody'"),
    ("a revision at its own stage", [_spec("a", revise_at="connect", revises=("a",))], "not a later stage"),
    ("a revision of another's fact", [_spec("a", revise_at="helo", revises=("ip",))], "does not provide"),
    ("needed_for a fact it does not provide", [_spec("a", needs=("b",), needed_for=("zz",)), _spec("b")],
     "needed_for"),
    ("needed_for without a need", [_spec("a", needed_for=("a",))], "needed_for"),
    ("a domain that is not text", [_spec("a", facts=(FactSpec("a", Kind.NUMBER, domain=True),))], "not a text fact"),
]


@pytest.mark.parametrize(("specs", "words"), [c[1:] for c in CONTRADICTIONS], ids=[c[0] for c in CONTRADICTIONS])
def test_contradictory_declarations_are_refused_when_the_table_is_built(specs: list[SourceSpec], words: str) -> None:
    with pytest.raises(ValueError, match=words):
        fact_table(specs)


def test_a_module_missing_an_entry_point_its_declaration_needs_is_refused() -> None:
    with pytest.raises(TypeError, match="no SOURCE"):
        Source.of(types.ModuleType("empty"))
    for missing in ("gather_facts", "read_settings"):
        module = make_source()
        delattr(module, missing)
        with pytest.raises(TypeError, match=missing):
            Registry.of(module)
    with pytest.raises(ValueError, match="config area"):
        REGISTRY.with_modules(make_source("asn2", area="geo"))


def test_a_source_runs_when_a_rule_reads_it_and_what_it_reads_runs_too() -> None:
    run = REGISTRY.wanted(frozenset({"helo_matches_rdns"}))
    assert run["helo"] and run["rdns"]           # helo reads the rdns result for that fact
    assert not run["geo"] and not run["dnsbl"] and not run["dkim"]
    run = REGISTRY.wanted(frozenset({"helo_is_us", "helo_resolves"}))
    assert run["helo"] and not run["rdns"]       # no PTR lookups for facts that do not need them
    assert REGISTRY.wanted(frozenset(), frozenset({"rdns"}))["rdns"]   # the relay's own need
    assert [s.spec.name for s in REGISTRY.at("data")] == ["dkim"]
    assert "graylist" not in [s.spec.name for stage in STAGES for s in REGISTRY.at(stage)]  # asked per recipient


# ---------------------------------------------------------------------------
# The recipe, end to end


def test_a_registered_source_fact_refuses_a_client_through_check(dns_server: Any) -> None:
    doc = {"asn": {"networks": {"192.0.2.0/24": 64500, "2001:db8::/32": 64501}}, "rule": [ASN_RULE]}
    config = cfg.build(doc, _flags(dns_server), registry=ASN_REGISTRY)
    assert config.policy.facts("connect") >= {"asn"}
    refused = asyncio.run(evaluate(config, "192.0.2.7", helo="mail.example.net", sender="a@example.net"))
    assert refused["facts"]["asn"] == 64500
    assert refused["stages"][0]["rule"] == "bad-network"
    assert refused["reply"].startswith("550 5.7.1 [ASN] mail from this network is not accepted")
    passed = asyncio.run(evaluate(config, "2001:db8::1", helo="mail.example.net", sender="a@example.net"))
    assert passed["facts"]["asn"] == 64501
    assert passed["reply"].startswith("250")


def test_a_registered_source_fact_refuses_a_client_in_a_live_session(
        dns_server: Any, recorder: Any, guard_factory: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    # The live guard of the fixtures builds its config with config.build; it
    # gets the registry with the test's source, as an embedding program would pass it.
    monkeypatch.setattr(cfg, "build", functools.partial(cfg.build, registry=ASN_REGISTRY))
    g = guard_factory({"asn": {"networks": {"127.0.0.0/8": 64500}}, "rule": [ASN_RULE]}, upstream=recorder.address)
    assert g.services.run["asn"]
    with smtplib.SMTP(g.host, g.port, timeout=10) as client:
        client.ehlo("mail.example.net")
        client.mail("a@example.net")
        code, text = client.rcpt("b@example.test")
    assert code == 550 and b"[ASN]" in text   # held back to RCPT (reject_at = "rcpt")
    assert recorder.messages == []
    # the decision log shows the fact the policy saw, and the rule it fired
    rejects = g.events("reject")
    assert rejects and rejects[0]["rule"] == "bad-network" and rejects[0]["stage"] == "rcpt"
    closes = wait_for(lambda: g.events("close"))
    assert closes[0]["seen"]["asn"] == 64500


def test_a_rule_on_an_unregistered_fact_is_a_one_line_config_error(tmp_path: Path, dns_server: Any) -> None:
    doc = {"rule": [ASN_RULE]}
    with pytest.raises(ConfigError) as err:
        cfg.build(doc, _flags(dns_server))
    assert err.value.key == 'rule[1] "bad-network".when.asn'
    assert err.value.message.startswith("unknown fact; known facts: ip, port")
    path = tmp_path / "smtpguard.toml"
    path.write_text('[[rule]]\nname = "bad-network"\nstage = "connect"\nwhen = { asn = 64500 }\naction = "reject"\n')
    done = subprocess.run([sys.executable, "-m", "smtpguard", "check", "192.0.2.7", "--config", str(path),
                           "--dns-server", dns_server.address], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and 'rule[1] "bad-network".when.asn' in lines[0] and "unknown fact" in lines[0]


def test_a_source_that_does_not_finish_within_the_stage_budget_gives_unknown(dns_server: Any) -> None:
    never = asyncio.Event()

    async def stuck(ctx: Context) -> Any:
        await never.wait()   # never set: only the stage deadline ends it

    slow = make_source("slow", facts=(FactSpec("slow", Kind.NUMBER), FactSpec("slow_name", Kind.TEXT)))
    slow.gather_facts = stuck  # type: ignore[attr-defined]
    registry = ASN_REGISTRY.with_modules(slow)
    doc = {"dns": {"stage_budget": "0.2s"}, "asn": {"networks": {"192.0.2.0/24": 64500}}, "slow": {},
           "rule": [{"name": "slow-unknown", "stage": "connect", "when": {"slow": "unknown"}, "action": "tempfail"}]}
    config = cfg.build(doc, _flags(dns_server), registry=registry)
    got = asyncio.run(evaluate(config, "192.0.2.7", only_policy=True))
    assert got["facts"]["slow"] == "unknown" and got["facts"]["slow_name"] == "unknown"
    assert got["stages"][0]["rule"] == "slow-unknown"
    assert "asn" not in got["facts"]   # only the sources the rules read (--only-policy)


def test_a_declared_domain_fact_takes_domain_rules() -> None:
    # FactSpec(domain=True) is all it takes: `.example.test` matches the names
    # below it, a trailing dot is ignored; a plain text fact compares exactly
    from smtpguard.core.policy import decide, parse_policy

    facts = (FactSpec("owner", Kind.TEXT, domain=True), FactSpec("label", Kind.TEXT))
    table = fact_table([*(s.spec for s in REGISTRY.sources), _spec("whois", facts=facts)])
    assert table.domains >= {"owner", "helo", "rdns_name", "from_domain"} and "label" not in table.domains
    rules = [{"name": "d", "stage": "connect", "when": {"owner_in": [".example.test"]}, "action": "reject"},
             {"name": "t", "stage": "connect", "when": {"label": ".x.test"}, "action": "reject"}]
    policy = parse_policy({"rule": rules}, facts=table)
    assert decide(policy, "connect", {"owner": "mx.Example.TEST."}).rule == "d"
    assert decide(policy, "connect", {"owner": "example.test"}).rule is None   # not below itself
    assert decide(policy, "connect", {"label": "a.x.test"}).rule is None       # text: exact only
    assert decide(policy, "connect", {"label": ".x.test"}).rule == "t"
