"""`smtpguard report` and the replay of a new policy, over a decision log made
by live sessions: clients from several 127.0.0.x addresses placed in
countries by test zones, real Linux SYNs at TTL 64 and 128 (a test signature
file names the TTL-128 loopback SYN Windows), reverse DNS of every class from
the test's loopback DNS server, smtpguard in front of a recording upstream.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import shutil
import smtplib
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from smtpguard.cli import main
from smtpguard.commands import report as cmd
from smtpguard.observe import report as rep
from smtpguard.observe.replay import MAX_STEPS, Trail, steps_of
from tests.fixtures_dns import DnsServer
from tests.fixtures_smtp import Recorder, wait_for

MESSAGE = b"Subject: report\r\n\r\nbody\r\n"
FP = Path(__file__).resolve().parents[1] / "smtpguard" / "data" / "smtpguard.fp"
# The shipped signatures, plus one that names a TTL-128 loopback SYN Windows:
# a Linux client with IP_TTL 128 then sends a real "Windows" SYN.
WINDOWS_LOOPBACK = ("label = s:win:Windows:test loopback\n"
                    "sig   = 4:128:0:65495:65495,*:mss,sok,ts,nop,ws:df,id+:0\n")

# The clients: address -> (country, TTL, rDNS set-up, what it sends)
US, DE, CN_WIN, CN_DYN = "127.0.0.1", "127.0.0.3", "127.0.0.2", "127.0.0.4"
CURRENT_RULES = [
    # the shipped policy's Windows rule
    {"name": "windows-no-rdns", "stage": "connect", "when": {"os": "windows", "rdns_in": ["none", "unconfirmed"]},
     "action": "reject", "reason": "OS-RDNS"},
    # an observed rule: the sources of country and rdns_generic run, nothing is refused
    {"name": "study", "stage": "connect", "when": {"country_in": ["CN"], "rdns_generic": True},
     "action": "reject", "observe": True},
]


def _signatures(tmp_path: Path) -> str:
    text = FP.read_text().replace("label = s:unix:Linux:loopback",
                                  WINDOWS_LOOPBACK + "label = s:unix:Linux:loopback", 1)
    path = tmp_path / "test.fp"
    path.write_text(text)
    return str(path)


def _zones(tmp_path: Path) -> str:
    d = tmp_path / "zones"
    d.mkdir(exist_ok=True)
    (d / "us.zone").write_text(f"{US}/32\n192.0.2.0/24\n")
    (d / "de.zone").write_text(f"{DE}/32\n")
    (d / "cn.zone").write_text(f"{CN_WIN}/32\n{CN_DYN}/32\n")
    return str(d)


def _dns(dns: DnsServer) -> None:
    dns.set_ptr(US, ["mail.us.test."])
    dns.set("mail.us.test", "A", [US])                       # confirmed
    dns.set_ptr(DE, ["mail.de.test."])
    dns.set("mail.de.test", "A", ["192.0.2.77"])             # unconfirmed: the name is elsewhere
    dns.nxdomain("2.0.0.127.in-addr.arpa")                   # none
    dns.set_ptr(CN_DYN, ["127-0-0-4.dyn.pool.cn.test."])
    dns.set("127-0-0-4.dyn.pool.cn.test", "A", [CN_DYN])    # confirmed, but a dynamic pool: generic


def _client(g: Any, source: str, ttl: int | None = None) -> smtplib.SMTP:
    sock = socket.socket()
    if ttl is not None:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect((g.host, g.port))
    s = smtplib.SMTP()
    s.sock = sock
    s.file = None
    s.getreply()
    return s


def _session(g: Any, source: str, ttl: int | None, helo: str, messages: int, rcpt: str = "b@example.test") -> list[int]:
    """One SMTP session; the RCPT codes it got."""
    codes = []
    s = _client(g, source, ttl)
    try:
        s.ehlo(helo)
        for _ in range(messages):
            s.mail("a@sender.test")
            code, _ = s.rcpt(rcpt)
            codes.append(code)
            if code == 250:
                assert s.data(MESSAGE)[0] == 250
            else:
                s.rset()
        s.quit()
    finally:
        s.close()
    return codes


@pytest.fixture
def traffic(recorder: Recorder, guard_factory: Any, dns_server: DnsServer, tmp_path: Path) -> dict[str, Any]:
    """Five live sessions and their decision log, split in a rotated gzip'ed file and the current one."""
    _dns(dns_server)
    doc = {"geo": {"zones": _zones(tmp_path)}, "fingerprint": {"signatures": _signatures(tmp_path)},
           "rule": CURRENT_RULES}
    g = guard_factory(doc, upstream=recorder.address)
    assert _session(g, US, None, "mail.us.test", 1) == [250]
    assert _session(g, DE, None, "mail.de.test", 1) == [250]
    assert _session(g, CN_WIN, 128, "desktop", 1) == [550]    # Windows without rDNS
    assert _session(g, CN_DYN, None, "dyn.test", 1) == [250]
    assert _session(g, US, None, "mail.us.test", 2) == [250, 250]
    wait_for(lambda: len(g.events("close")) == 5)
    lines = [line for line in g.log.getvalue().splitlines() if line.startswith("{")]
    cut = len(lines) // 2
    with gzip.open(tmp_path / "smtpguard.log.1.gz", "wt") as f:
        f.write("\n".join(lines[:cut]) + "\n")
    (tmp_path / "smtpguard.log").write_text("\n".join(lines[cut:]) + "\nnot json at all\n")
    return {"guard": g, "logs": [str(tmp_path / "smtpguard.log.1.gz"), str(tmp_path / "smtpguard.log")],
            "zones": str(tmp_path / "zones"), "recorder": recorder, "tmp": tmp_path}


def _rows(result: dict[str, Any], table: str) -> dict[tuple[str, ...], tuple[int, int]]:
    return {tuple(r["key"]): (r["sessions"], r["delivered"]) for r in result["tables"][table]}


def test_the_close_line_carries_every_fact_and_decision(traffic: dict[str, Any]) -> None:
    closes = traffic["guard"].events("close")
    refused = next(c for c in closes if c["ip"] == CN_WIN)
    assert refused["seen"]["os"] == "windows" and refused["seen"]["rdns"] == "none"
    assert refused["seen"]["country"] == "CN"
    stages = [(s["stage"], s["action"], s.get("rule"), s.get("held")) for s in refused["steps"]]
    assert stages == [("connect", "reject", "windows-no-rdns", "rcpt"), ("helo", "reject", "windows-no-rdns", "rcpt"),
                      ("mail", "reject", "windows-no-rdns", "rcpt"), ("rcpt", "reject", "windows-no-rdns", None)]
    rcpt_step = refused["steps"][-1]
    assert rcpt_step["set"]["rcpt"] == "b@example.test" and rcpt_step["set"]["rcpt_domain"] == "example.test"
    assert rcpt_step["relayed"] is False
    # two transactions in one session: each recipient decision has its own facts
    twice = [c for c in closes if c["ip"] == US and c["messages"] == 2][0]
    facts = [f for stage, f, _ in steps_of(twice) if stage == "rcpt"]
    assert len(facts) == 2 and all(f["rcpt"] == "b@example.test" and f["helo"] == "mail.us.test" for f in facts)
    # per recipient and per message, what came of each decision
    assert [(s["stage"], s.get("relayed"), s.get("delivered")) for s in twice["steps"]] == [
        ("connect", None, None), ("helo", None, None),
        ("mail", None, None), ("rcpt", True, None), ("data", None, True),
        ("mail", None, None), ("rcpt", True, None), ("data", None, True)]


def test_report_counts_sessions_and_delivered_mail(traffic: dict[str, Any]) -> None:
    result, replayed = cmd.build(traffic["logs"])
    assert replayed is None
    assert (result["sessions"], result["delivered"]) == (5, 5)
    assert len(traffic["recorder"].messages) == 5
    assert result["skipped_lines"] == 0     # the non-JSON line is not a close line: never parsed
    assert _rows(result, "country") == {("US",): (2, 3), ("CN",): (2, 1), ("DE",): (1, 1)}
    assert _rows(result, "os") == {("linux",): (4, 5), ("windows",): (1, 0)}
    assert _rows(result, "rdns") == {("confirmed",): (2, 3), ("unconfirmed",): (1, 1), ("none",): (1, 0),
                                     ("generic",): (1, 1)}
    assert _rows(result, "outcome") == {("delivered", "", ""): (4, 5),
                                        ("reject", "OS-RDNS", "windows-no-rdns"): (1, 0)}
    assert _rows(result, "country_os") == {("US", "linux"): (2, 3), ("DE", "linux"): (1, 1),
                                           ("CN", "windows"): (1, 0), ("CN", "linux"): (1, 1)}
    assert _rows(result, "country_rdns")[("CN", "generic")] == (1, 1)
    share = {tuple(r["key"]): r["delivered_share"] for r in result["tables"]["country"]}
    assert share == {("US",): 0.6, ("DE",): 0.2, ("CN",): 0.2}
    [example] = [r for r in result["tables"]["outcome"] if r["key"][0] == "reject"][0]["examples"]
    assert example["ip"] == CN_WIN


def test_since_keeps_only_recent_sessions(traffic: dict[str, Any]) -> None:
    last = max(c["ts"] for c in traffic["guard"].events("close"))
    assert cmd.build(traffic["logs"], since=30 * 86400, now=lambda: last + 30 * 86400 - 60)[0]["sessions"] == 5
    result = cmd.build(traffic["logs"], since=30 * 86400, now=lambda: last + 31 * 86400)[0]
    assert result["sessions"] == 0 and result["before_since"] == 5


def _policy(tmp: Path, name: str, text: str) -> str:
    path = tmp / name
    path.write_text(text)
    return str(path)


def test_replay_of_a_stricter_policy_lists_exactly_the_sessions_it_would_refuse(traffic: dict[str, Any]) -> None:
    stricter = _policy(traffic["tmp"], "strict.toml", f'''
[geo]
zones = "{traffic["zones"]}"
allow = ["US", "DE"]

[[rule]]
name = "windows-no-rdns"
stage = "connect"
when = {{ os = "windows", rdns_in = ["none", "unconfirmed"] }}
action = "reject"
reason = "OS-RDNS"

[[rule]]
name = "unconfirmed-later"
stage = "connect"
when = {{ rdns = "unconfirmed" }}
action = "tempfail"
reason = "RDNS"
''')
    _result, replayed = cmd.build(traffic["logs"], policy=cmd.load_policy(stricter))
    assert replayed is not None
    assert (replayed["sessions"], replayed["replayed"], replayed["changed"]) == (5, 5, 2)
    rows = {(r["would"], r["stage"], r["rule"], r["reason"], r["was"]): (r["sessions"], [e["ip"] for e in r["examples"]])
            for r in replayed["differences"]}
    # CN_WIN was refused already (by the Windows rule): not a difference, though geo-allow now comes first
    assert rows == {("refused", "rcpt", "geo-allow", "GEO", "through"): (1, [CN_DYN]),
                    ("deferred", "rcpt", "unconfirmed-later", "RDNS", "through"): (1, [DE])}


def test_replay_of_a_laxer_policy_lists_what_it_would_let_through(traffic: dict[str, Any]) -> None:
    laxer = _policy(traffic["tmp"], "lax.toml", "[policy]\nobserve = false\n")
    _result, replayed = cmd.build(traffic["logs"], policy=cmd.load_policy(laxer))
    assert replayed is not None
    [row] = replayed["differences"]
    assert (row["would"], row["stage"], row["rule"], row["reason"], row["was"], row["sessions"]) == \
        ("through", "rcpt", "windows-no-rdns", "OS-RDNS", "refused", 1)
    assert row["examples"][0]["ip"] == CN_WIN and row["examples"][0]["os"] == "windows"


def test_cli_text_json_and_a_bad_policy_file(traffic: dict[str, Any], capsys: Any) -> None:
    tmp = traffic["tmp"]
    assert main(["report", *traffic["logs"]]) == 0
    out = capsys.readouterr().out
    assert out.startswith("5 sessions, 5 messages delivered\n")
    assert "by country" in out and "  US " in out and "60.0%" in out
    assert main(["report", *traffic["logs"], "--format", "json", "--out", str(tmp / "r.json")]) == 0
    assert json.loads((tmp / "r.json").read_text())["report"]["sessions"] == 5
    (tmp / "bad.toml").write_text("[[rule]]\nname = 'x'\naction = 'explode'\n")
    assert main(["report", *traffic["logs"], "--policy", str(tmp / "bad.toml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'rule[1] "x".action' in err
    assert main(["report", str(tmp / "missing.log")]) == 2
    assert "LOG: cannot read" in capsys.readouterr().err
    assert main(["report", *traffic["logs"], "--since", "soon"]) == 2


def test_the_facts_of_check_are_those_of_the_live_session(traffic: dict[str, Any]) -> None:
    """`smtpguard check` gathers and decides as the live session did: same facts."""
    from smtpguard.commands.check import evaluate
    from smtpguard.sources.fingerprint import enable_save_syn, read_saved_syn

    g = traffic["guard"]
    # a real TTL-64 SYN from the DE client's address, as the live session saw one
    with socket.socket() as listener:
        assert enable_save_syn(listener)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.socket() as c:
            c.bind((DE, 0))
            c.connect(listener.getsockname())
            conn, _ = listener.accept()
            syn = read_saved_syn(conn)
            conn.close()
    live = next(c for c in g.events("close") if c["ip"] == DE)
    [(_stage, live_facts, _step)] = [x for x in steps_of(live) if x[0] == "rcpt"]
    live_facts = {k: list(v) if isinstance(v, tuple) else v for k, v in live_facts.items()}
    assert live_facts["country"] == "DE" and live_facts["rdns"] == "unconfirmed" and live_facts["os"] == "linux"
    # check's own function on the live session's configuration ...
    checked = asyncio.run(evaluate(g.config, DE, helo="mail.de.test", sender="a@sender.test",
                                   rcpt="b@example.test", syn=syn))
    _same_facts(checked["facts"], live_facts, g)
    # ... and the command, `check --json`, from a configuration file saying the same
    tmp = traffic["tmp"]
    config = tmp / "live.toml"
    rules = "".join(f'[[rule]]\nname = "{r["name"]}"\nstage = "{r["stage"]}"\nwhen = {_toml_table(r["when"])}\n'
                    f'action = "{r["action"]}"\n' + (f'reason = "{r["reason"]}"\n' if "reason" in r else "")
                    + ("observe = true\n" if r.get("observe") else "") for r in CURRENT_RULES)
    config.write_text(f'[server]\nhostname = "mx.example.test"\ndomains = ["example.test"]\n'
                      f'[geo]\nzones = "{traffic["zones"]}"\n'
                      f'[fingerprint]\nsignatures = "{g.config.fingerprint.signatures}"\n{rules}')
    out = _cli_json(["check", DE, "--helo", "mail.de.test", "--sender", "a@sender.test", "--rcpt", "b@example.test",
                     "--syn", syn.hex(), "--json", "--config", str(config),
                     "--dns-server", g.config.dns.servers[0]])
    _same_facts(out["facts"], live_facts, g)
    # with --only-policy check runs the sources the rules read, as the live session does: equal
    only = _cli_json(["check", DE, "--helo", "mail.de.test", "--sender", "a@sender.test", "--rcpt", "b@example.test",
                      "--syn", syn.hex(), "--json", "--only-policy", "--config", str(config),
                      "--dns-server", g.config.dns.servers[0]])
    assert only["facts"] == live_facts


def _same_facts(checked: dict[str, Any], live: dict[str, Any], g: Any) -> None:
    """Every fact the live session saw, check saw with the same value; check,
    a diagnostic, may also show the facts of sources no live rule needed."""
    from smtpguard.sources.registry import SOURCE_FACTS

    assert {k: checked.get(k) for k in live} == live
    not_run = set().union(*(facts for name, facts in SOURCE_FACTS.items() if not g.services.run.get(name)))
    assert set(checked) - set(live) <= not_run


def _toml_table(table: dict[str, Any]) -> str:
    return "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in table.items()) + " }"


def _cli_json(argv: list[str]) -> dict[str, Any]:
    """Run a command in-process, its standard output parsed; the logging it sets up undone."""
    import contextlib
    import io
    import logging

    names = ("smtpguard", "mail.log", "asyncio", "aiosmtplib")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level) for n in names}
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            assert main(argv) == 0
    finally:
        for n, (handlers, level) in saved.items():
            logging.getLogger(n).handlers[:] = handlers
            logging.getLogger(n).setLevel(level)
    result: dict[str, Any] = json.loads(buf.getvalue())
    return result


def test_html_is_one_self_contained_page(traffic: dict[str, Any]) -> None:
    out = traffic["tmp"] / "report.html"
    laxer = _policy(traffic["tmp"], "lax.toml", "")
    assert main(["report", *traffic["logs"], "--format", "html", "--out", str(out), "--policy", laxer]) == 0
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<svg") == 4
    assert "would let through at rcpt what was refused by the old rule windows-no-rdns [OS-RDNS]" in page
    # no network resource: no src/href to anywhere, no url() fetches
    assert "src=" not in page and 'href="http' not in page and "url(http" not in page and "@import" not in page
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed here: the page was not opened in a browser "
                    "(scripts/system-deps.sh installs it)")
    r = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
                        "--v=0", "--dump-dom", out.as_uri()], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "HOME": str(traffic["tmp"])})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "<h1>smtpguard traffic report</h1>" in r.stdout and r.stdout.count("<svg") == 4
    assert "Uncaught" not in r.stderr and ":CONSOLE(" not in r.stderr


def test_strangers_strings_in_the_log_are_bounded_and_escaped() -> None:
    from smtpguard.core.policy import Verdict

    trail = Trail()
    trail.record("connect", {"ip": "192.0.2.1", "country": "US"}, Verdict("continue"))
    trail.record("helo", {"ip": "192.0.2.1", "country": "US", "helo": "<script>" + "x" * 1000}, Verdict("continue"))
    helo = trail.fields()["steps"][1]["set"]["helo"]
    assert len(helo) == 257 and helo.endswith("…")
    record = {"event": "close", "ip": "192.0.2.1", "messages": 1, **json.loads(json.dumps(trail.fields()))}
    report = rep.Report()
    report.add(record)
    record["seen"] = {"country": "<img src=x>", "os": "linux\x1b[31m"}
    report.add(record)
    page = rep.html(report.result())
    assert "<img" not in page and "\x1b" not in page and "<script>" not in page


def test_the_trail_is_bounded() -> None:
    from smtpguard.core.policy import Verdict

    trail = Trail()
    for i in range(MAX_STEPS + 10):
        trail.record("rcpt", {"rcpt": f"r{i}@example.test"}, Verdict("continue"))
    fields = trail.fields()
    assert len(fields["steps"]) == MAX_STEPS and fields["steps_dropped"] == 10


def test_the_text_log_keeps_its_digest_and_the_json_log_gets_the_facts() -> None:
    import io
    import logging

    from smtpguard.core.policy import Verdict
    from smtpguard.observe import log
    from smtpguard.observe.replay import close_fields

    trail = Trail()
    trail.record("connect", {"ip": "192.0.2.1", "country": "US", "helo": 'x" y=z\r\nforged'}, Verdict("continue"))
    names = ("smtpguard", *getattr(log, "LIBRARY_LOGGERS", ()), "mail.log")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level,
                 logging.getLogger(n).propagate) for n in names}
    try:
        for fmt in ("text", "json"):
            stream = io.StringIO()
            log.setup(fmt, "info", stream=stream)
            log.event("close", session="s1", facts="country=US", **close_fields(trail))
            line = stream.getvalue()
            assert line.count("\n") == 1  # one line: the HELO's CR LF cannot forge another
            if fmt == "text":
                assert "seen" not in line and 'facts="country=US"' in line
            else:
                assert json.loads(line)["seen"]["helo"] == 'x" y=z\r\nforged'
    finally:
        for n, (handlers, level, propagate) in saved.items():
            logger = logging.getLogger(n)
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate = propagate


def test_clients_refused_at_the_greeting_are_counted_without_facts(
        recorder: Recorder, guard_factory: Any, dns_server: DnsServer, tmp_path: Path) -> None:
    """A refusal before any session is the client's only log line: the report counts it."""
    _dns(dns_server)
    doc = {"geo": {"zones": _zones(tmp_path), "allow": ["US"]}, "policy": {"reject_at": "connect"}}
    g = guard_factory(doc, upstream=recorder.address)
    assert _session(g, US, None, "mail.us.test", 1) == [250]
    with socket.socket() as sock:
        sock.bind((CN_WIN, 0))
        sock.settimeout(10)
        sock.connect((g.host, g.port))
        f = sock.makefile("rb")
        assert f.readline().startswith(b"554 5.7.1 [GEO] ")
        sock.sendall(b"QUIT\r\n")
        assert f.readline().startswith(b"221 ")
    wait_for(lambda: g.events("close") and g.events("reject"))
    log_path = tmp_path / "greeting.log"
    log_path.write_text(g.log.getvalue())
    result, replayed = cmd.build([str(log_path)], policy=cmd.load_policy(_policy(tmp_path, "p.toml", "")))
    assert (result["sessions"], result["delivered"]) == (2, 1)
    assert _rows(result, "outcome") == {("delivered", "", ""): (1, 1), ("reject", "GEO", "geo-allow"): (1, 0)}
    assert _rows(result, "country") == {("US",): (1, 1), ("-",): (1, 0)}
    assert replayed is not None and (replayed["replayed"], replayed["not_replayable"]) == (1, 1)


def test_each_recipient_says_whether_the_mta_took_it_and_each_message_whether_delivered(
        recorder: Recorder, guard_factory: Any) -> None:
    recorder.refuse_rcpt["nobody@example.test"] = "550 5.1.1 no such user"
    g = guard_factory(upstream=recorder.address)
    with smtplib.SMTP(g.host, g.port, timeout=10) as s:
        s.ehlo("c.test")
        s.mail("a@sender.test")
        assert s.rcpt("b@example.test")[0] == 250
        assert s.rcpt("nobody@example.test")[0] == 550
        assert s.data(MESSAGE)[0] == 250
        recorder.data_reply = "554 5.6.0 content refused"
        s.mail("a@sender.test")
        assert s.rcpt("B@Example.TEST")[0] == 250
        assert s.data(MESSAGE)[0] == 554
        s.mail("a@sender.test")
        assert s.rcpt("c@example.test")[0] == 250   # then the client leaves without DATA
    [close] = wait_for(lambda: g.events("close"))
    outcomes = [(s["stage"], s.get("set", {}).get("rcpt"), s.get("relayed"), s.get("delivered"))
                for s in close["steps"] if s["stage"] in ("rcpt", "data")]
    assert outcomes == [("rcpt", "b@example.test", True, None), ("rcpt", "nobody@example.test", False, None),
                        ("data", None, None, True), ("rcpt", "B@example.test", True, None),
                        ("data", None, None, False), ("rcpt", "c@example.test", None, None)]
    # the last one: QUIT reset the transaction before the close line, so whether the MTA took it is not said


def test_replay_names_the_facts_the_old_policy_never_gathered(traffic: dict[str, Any]) -> None:
    """The live policy read no HELO check and no DNS list: a policy that does sees them as unknown."""
    path = _policy(traffic["tmp"], "helo.toml", '''
[[rule]]
name = "helo-forged"
stage = "helo"
when = { helo_is_us = true }
action = "reject"
reason = "HELO-FORGED"
''')
    _result, replayed = cmd.build(traffic["logs"], policy=cmd.load_policy(path))
    assert replayed is not None
    assert replayed["missing_facts"] == {"helo_is_us": 5}
    # unknown never matches a positive condition: nothing changes, and the text says why
    assert replayed["changed"] == 1 and replayed["differences"][0]["rule"] == "windows-no-rdns"
    assert "the new policy reads helo_is_us, which 5 sessions did not gather" in cmd.rep.replay_text(replayed)


def _step(stage: str, action: str = "continue", **kw: Any) -> dict[str, Any]:
    return {"stage": stage, "action": action, **kw}


@pytest.mark.parametrize("steps, extra, expected", [
    pytest.param([_step("connect"), _step("rcpt")], {"messages": 1}, ("delivered", "", ""),
                 id="no rule acted and a message went through: delivered"),
    pytest.param([_step("connect")], {}, ("no mail", "", ""), id="a client that left without mail"),
    pytest.param([_step("connect", "reject", rule="geo", reason="GEO", held="rcpt"),
                  _step("rcpt", "reject", rule="geo", reason="GEO")], {"refusals": 1}, ("reject", "GEO", "geo"),
                 id="a held-back refusal counts where it was enforced"),
    pytest.param([_step("connect", "reject", rule="geo", reason="GEO", held="rcpt"),
                  _step("rcpt", "accept", rule="postmaster", reason="POSTMASTER")], {"messages": 1},
                 ("accept", "POSTMASTER", "postmaster"), id="a held-back refusal that postmaster@ escaped"),
    pytest.param([_step("connect", "accept", rule="friends", reason="ACCEPT")], {"messages": 3},
                 ("accept", "ACCEPT", "friends"), id="an allowlist rule"),
    pytest.param([_step("rcpt", "graylist", rule="graylist", reason="GRAYLIST", needs=["graylist"]),
                  _step("rcpt", "graylist", rule="graylist", reason="GRAYLIST", set={"graylist": "new"})], {},
                 ("graylist", "GRAYLIST", "graylist"), id="a graylisted first attempt is a deferral"),
    pytest.param([_step("rcpt", "graylist", rule="graylist", reason="GRAYLIST", needs=["graylist"]),
                  _step("rcpt", set={"graylist": "passed"})], {"messages": 1}, ("delivered", "", ""),
                 id="a passed retry is delivered"),
    pytest.param([_step("connect"), _step("rcpt")], {"refusals": 1, "reason": "RELAY"}, ("refused", "RELAY", ""),
                 id="a refusal of the proxy's own (relay) after the policy let it through"),
])
def test_session_outcome_table(steps: list[dict[str, Any]], extra: dict[str, Any], expected: tuple[str, str, str]) -> None:
    record = {"event": "close", "seen": {"ip": "192.0.2.1"}, "steps": steps, **extra}
    assert rep.session_outcome(record) == expected


def test_any_json_in_the_log_is_counted_or_skipped_never_a_crash() -> None:
    """A log is input: whatever JSON a close line holds, report and replay go on."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from smtpguard.core.policy import parse_policy
    from smtpguard.observe.replay import Replay
    from smtpguard.sources.registry import FACT_TABLE

    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8) \
        | st.sampled_from(["connect", "helo", "mail", "rcpt", "data", "reject", "graylist", "tempfail", "drop"])
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.sampled_from(["stage", "action", "set", "unset", "held", "needs",
                                                             "rule", "reason", "graylist", "rcpt", "country"]),
                                            inner, max_size=4), max_leaves=12)
    records = st.fixed_dictionaries({"event": st.just("close")}, optional={
        "seen": values, "steps": st.lists(values, max_size=4), "messages": values, "refusals": values,
        "ts": values, "ip": values, "facts": values, "reason": values})
    policy = parse_policy({"rule": [{"name": "graylist", "action": "graylist"},
                                    {"name": "cn", "stage": "connect", "when": {"country": "CN"}, "action": "reject"}]},
                          facts=FACT_TABLE)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(records, max_size=5))
    def run(batch: list[dict[str, Any]]) -> None:
        report, replay = rep.Report(), Replay(policy)
        for record in batch:
            report.add(record)
            replay.add(record)
        result = report.result()
        assert result["sessions"] == len(batch)
        json.dumps(result)
        json.dumps(replay.result())
        rep.text(result)

    run()


def test_a_country_rule_is_replayed_without_zone_data(traffic: dict[str, Any]) -> None:
    """The countries are in the log: the new policy needs no zone files to be replayed."""
    path = _policy(traffic["tmp"], "cn.toml", '[[rule]]\nname = "no-cn"\nstage = "connect"\n'
                                               'when = { country = "CN" }\naction = "reject"\nreason = "GEO"\n')
    _result, replayed = cmd.build(traffic["logs"], policy=cmd.load_policy(path))
    assert replayed is not None
    rows = {(r["would"], r["rule"], r["was"]): [e["ip"] for e in r["examples"]] for r in replayed["differences"]}
    # CN_WIN was refused by the Windows rule and would be by no-cn: the same outcome, not a difference
    assert rows == {("refused", "no-cn", "through"): [CN_DYN]}


def test_a_text_log_gives_an_empty_report_and_says_why(tmp_path: Path, capsys: Any) -> None:
    log_path = tmp_path / "text.log"
    log_path.write_text('2026-11-30T19:40:19Z info close session=s1 ip=192.0.2.1 facts="country=US"\n')
    assert main(["report", str(log_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("0 sessions, 0 messages delivered")
    assert "reads the JSON decision log" in captured.err
