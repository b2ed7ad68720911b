"""`smtpguard check`: the same facts and policy as a live session, printed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.fixtures_dns import DnsServer
from tests.test_syn import WINDOWS_OPTS, build_syn

CONFIG = """
[server]
hostname = "mx.example.test"
domains = ["example.test"]
resolution_url = "https://help.example.test/smtp?code={code}&ip={ip}"
[upstream]
address = "127.0.0.1:1"
[[dnsbl]]
zone = "bl.test"
weight = 3
"""


def check(tmp_path: Path, dns: DnsServer, *args: str, extra: str = "") -> dict[str, Any]:
    conf = tmp_path / "c.toml"
    conf.write_text(CONFIG + extra + _default_rules())
    r = subprocess.run([sys.executable, "-m", "smtpguard", "check", *args, "--config", str(conf),
                        "--dns-server", dns.address, "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _default_rules() -> str:
    from tests.fixtures_policy import default_rules_toml
    return "\n" + default_rules_toml()


def test_check_shows_every_dns_fact(tmp_path: Path, dns_server: DnsServer) -> None:
    dns_server.set("7.2.0.192.in-addr.arpa", "PTR", ["dsl-192-0-2-7.pool.isp.test."])
    dns_server.set("dsl-192-0-2-7.pool.isp.test", "A", ["192.0.2.7"])
    dns_server.set("7.2.0.192.bl.test", "A", ["127.0.0.2"])
    dns_server.set("helo.sender.test", "A", ["192.0.2.99"])
    out = check(tmp_path, dns_server, "192.0.2.7", "--helo", "helo.sender.test", "--sender", "a@sender.test",
                "--rcpt", "b@example.test")
    f = out["facts"]
    assert (f["rdns"], f["rdns_name"], f["rdns_domain"], f["rdns_generic"]) == \
        ("confirmed", "dsl-192-0-2-7.pool.isp.test", "isp.test", True)
    assert f["dnsbl"] == "listed" and f["dnsbl_score"] == 3 and f["dnsbl_hits"] == ["bl.test=127.0.0.2"]
    assert (f["helo_valid"], f["helo_resolves"], f["helo_matches_ip"], f["helo_is_us"]) == (True, True, False, False)
    assert f["helo_matches_rdns"] is False and f["helo_bare_ip"] is False
    [connect] = [s for s in out["stages"] if s["stage"] == "connect"]
    assert connect["rule"] == "dnsbl" and connect["deferred_to"] == "rcpt"
    assert out["reply"].startswith("550 5.7.1 [DNSBL] ") and "bl.test (127.0.0.2)" in out["reply"]
    assert out["reply"].endswith("https://help.example.test/smtp?code=DNSBL&ip=192.0.2.7")


def test_check_shows_the_os_fact_from_a_syn(tmp_path: Path, dns_server: DnsServer) -> None:
    dns_server.nxdomain("7.2.0.192.in-addr.arpa")
    syn = build_syn(ttl=117, window=64240, layout=WINDOWS_OPTS, ws=8).hex()
    out = check(tmp_path, dns_server, "192.0.2.7", "--syn", syn, "--rcpt", "b@example.test")
    f = out["facts"]
    assert (f["os"], f["os_match"], f["os_distance"]) == ("windows", "exact", 11)
    assert out["reply"].startswith("550 5.7.1 [OS-RDNS] ")  # Windows without rDNS, by the default policy


def test_check_refuses_a_relay_recipient(tmp_path: Path, dns_server: DnsServer) -> None:
    dns_server.nxdomain("7.2.0.192.in-addr.arpa")
    out = check(tmp_path, dns_server, "192.0.2.7", "--rcpt", "x@other.test")
    assert out["reply"].startswith("550 5.7.1 [RELAY] ")


def test_check_with_a_bad_ip_is_exit_2(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "smtpguard", "check", "not-an-ip"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


# --- issue 11 item 5: a truthful check ------------------------------------------------

NO_RULES = """
[server]
hostname = "mx.example.test"
domains = ["example.test"]
[upstream]
address = "127.0.0.1:1"
"""


def _check_cli(tmp_path: Path, dns: DnsServer, conf_text: str, *args: str) -> subprocess.CompletedProcess[str]:
    conf = tmp_path / "c.toml"
    conf.write_text(conf_text)
    return subprocess.run([sys.executable, "-m", "smtpguard", "check", *args, "--config", str(conf),
                           "--dns-server", dns.address], capture_output=True, text=True, timeout=60)


def test_without_rcpt_check_prints_the_refusal_held_back_until_rcpt(tmp_path: Path, dns_server: DnsServer) -> None:
    dns_server.set("7.2.0.192.bl.test", "A", ["127.0.0.2"])
    dns_server.nxdomain("7.2.0.192.in-addr.arpa")
    out = check(tmp_path, dns_server, "192.0.2.7")          # no --rcpt
    assert out["rcpt_assumed"] == "user@example.test"
    assert out["reply"].startswith("550 5.7.1 [DNSBL] ")     # not "250"
    assert "postmaster@ and abuse@" in out["note"]
    conf = (tmp_path / "c.toml").read_text()
    r = _check_cli(tmp_path, dns_server, conf, "192.0.2.7")
    assert r.returncode == 0, r.stderr
    assert "reply at RCPT to an ordinary recipient (user@example.test): 550 5.7.1 [DNSBL]" in r.stdout


def test_check_shows_every_fact_marking_those_the_policy_read(tmp_path: Path, dns_server: DnsServer) -> None:
    dns_server.set_ptr("192.0.2.7", ["mail.sender.test"])
    dns_server.set("mail.sender.test", "A", ["192.0.2.7"])
    r = _check_cli(tmp_path, dns_server, NO_RULES, "192.0.2.7", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["facts"]["rdns"] == "confirmed" and out["facts"]["rdns_name"] == "mail.sender.test"
    assert "rdns" not in out["policy_facts"]   # no rule reads it (the postmaster rule reads rcpt)
    text = _check_cli(tmp_path, dns_server, NO_RULES, "192.0.2.7").stdout
    assert "  rdns_name" in text and "* rdns_name" not in text
    rules = NO_RULES + '[[rule]]\nname = "no-rdns"\nstage = "connect"\nwhen = { rdns = "none" }\naction = "reject"\n'
    text = _check_cli(tmp_path, dns_server, rules, "192.0.2.7").stdout
    assert "* rdns " in text and "  dnsbl" not in text.replace("* dnsbl", "")
    only = json.loads(_check_cli(tmp_path, dns_server, NO_RULES, "192.0.2.7", "--json", "--only-policy").stdout)
    assert "rdns" not in only["facts"]          # today's behaviour on demand


# Every reason code a policy can give, with the action that gives it.
POLICY_CODES = {"POLICY": "reject", "GEO": "reject", "GEO-OS": "reject", "OS-RDNS": "reject", "RDNS": "reject",
                "DNSBL": "reject", "HELO-FORGED": "reject", "DNS-TEMP": "tempfail", "TEMP": "tempfail"}


def test_checks_reply_is_the_live_reply_byte_for_byte_for_every_reason_code(
        tmp_path: Path, dns_server: DnsServer, guard_factory: Any, recorder: Any) -> None:
    """One rule per code at RCPT for 127.0.0.5; a live session from 127.0.0.5 and `check 127.0.0.5`
    must write the same line; and the relay forms and the graylist's first deferral."""
    import asyncio
    import smtplib

    from smtpguard.commands.check import evaluate

    dns_server.set("5.0.0.127.bl.test", "A", ["127.0.0.2"])
    dns_server.set_ptr("127.0.0.5", ["client.example.test"])
    dns_server.set("client.example.test", "A", ["127.0.0.5"])
    url = "https://help.example.test/smtp?code={code}&ip={ip}&helo={helo}&sender={sender}&rcpt={rcpt}"
    cases: list[tuple[str, dict[str, Any], str]] = []
    for code, action in POLICY_CODES.items():
        cases.append((code, {"rule": [{"name": f"r-{code.lower()}", "stage": "rcpt", "action": action,
                                      "reason": code, "when": {"ip_in": ["127.0.0.0/8"]}}],
                             "dnsbl": [{"zone": "bl.test", "weight": 3}]}, "user@example.test"))
    cases.append(("RELAY", {}, "x@other.test"))
    cases.append(("RELAY", {}, "b%other.test@example.test"))   # the percent hack
    cases.append(("GRAYLIST", {"rule": [{"name": "graylist", "stage": "rcpt", "action": "graylist"}],
                           "state": {"url": "memory://"}}, "user@example.test"))
    for code, doc, rcpt in cases:
        doc = {**doc, "server": {"resolution_url": url}}
        g = guard_factory(doc, upstream=recorder.address)
        with smtplib.SMTP(g.host, g.port, timeout=10, source_address=("127.0.0.5", 0)) as s:
            s.ehlo("helo.client.test")
            s.mail("a@sender.test")
            live_code, live_text = s.rcpt(rcpt)
        live = f"{live_code} {live_text.decode()}".replace("\n", "\r\n")
        result = asyncio.run(evaluate(g.config, "127.0.0.5", "helo.client.test", "a@sender.test", rcpt))
        assert f"[{code}]" in live, (code, live)
        assert result["reply"].replace("\r\n" + str(live_code) + "-", "\r\n" + str(live_code) + " ") == live \
            or result["reply"] == live, (code, result["reply"], live)


def test_check_runs_the_sessions_own_stages_helo_and_mail_refusals_and_tarpits_included(
        tmp_path: Path, dns_server: DnsServer, guard_factory: Any, recorder: Any) -> None:
    """check drives the live session's stage methods (issue 16): a refusal at
    HELO or MAIL (reject_at = "connect" refuses where the rule fires) is the
    live line byte for byte, the stages after it are not run, and a tarpit
    is reported without being waited out."""
    import asyncio
    import smtplib
    import time

    from smtpguard.commands.check import evaluate

    cases = [
        ("helo", {"helo_in": ["bad.client.test"]}, "HELO-FORGED"),
        ("mail", {"sender_domain_in": ["spam.test"]}, "POLICY"),
    ]
    for stage, when, reason in cases:
        doc = {"policy": {"reject_at": "connect"},
               "rule": [{"name": f"r-{stage}", "stage": stage, "action": "reject", "reason": reason, "when": when}]}
        g = guard_factory(doc, upstream=recorder.address)
        with smtplib.SMTP(g.host, g.port, timeout=10, source_address=("127.0.0.5", 0)) as s:
            code, text = s.ehlo("bad.client.test")
            if stage == "mail":
                assert code == 250
                code, text = s.mail("a@spam.test")
        live = f"{code} {text.decode()}"
        result = asyncio.run(evaluate(g.config, "127.0.0.5", "bad.client.test", "a@spam.test", "user@example.test"))
        assert f"[{reason}]" in live and result["reply"] == live, (stage, result["reply"], live)
        assert [s["stage"] for s in result["stages"]][-1] == stage   # nothing ran after the refusal
    doc = {"rule": [{"name": "slow", "stage": "mail", "action": "tarpit", "delay": "30s",
                     "when": {"ip_in": ["127.0.0.0/8"]}}]}
    g = guard_factory(doc, upstream=recorder.address)
    started = time.monotonic()
    result = asyncio.run(evaluate(g.config, "127.0.0.5", "client.test", "a@sender.test", "user@example.test"))
    assert time.monotonic() - started < 20     # the 30 s delay was not slept
    assert [s.get("tarpit") for s in result["stages"] if s["stage"] == "mail"] == [30]
    assert result["reply"].startswith("250")
