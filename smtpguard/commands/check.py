"""`smtpguard check IP`: what would smtpguard do with this client, and why?

Runs the same fact gathering and the same policy as a live session, without
SMTP and without touching the upstream or the graylist store, and prints
every fact, which rule matched at each stage, and the exact reply the client
would get. The admin's diagnosis tool when a legitimate sender complains.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
from typing import Any

from smtpguard import config as cfg
from smtpguard.commands.serve import add_common_config_flags
from smtpguard.core.facts import ClientInfo
from smtpguard.core.policy import explain
from smtpguard.errors import ConfigError
from smtpguard.observe import log

# check never connects upstream; a config written for `serve` has one, a
# quick check from the command line may not.
PLACEHOLDER_UPSTREAM = "127.0.0.1:25"
PLACEHOLDER_DOMAIN = "check.invalid"


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "check", help="show the facts and the decision for a client, without SMTP",
        description="Gather the facts about IP as a live session would (country, OS from --syn, "
        "reverse DNS, HELO, DNS lists), run the policy at every stage and print the reply the "
        "client would get. Nothing is sent to the MTA and the graylist store is not changed.")
    p.add_argument("ip", metavar="IP", help="the client's address (IPv4 or IPv6)")
    p.add_argument("--helo", default="", metavar="NAME", help="the HELO/EHLO name the client gives")
    p.add_argument("--sender", default="", metavar="ADDR", help="MAIL FROM address")
    p.add_argument("--rcpt", default="", metavar="ADDR", help="RCPT TO address")
    p.add_argument("--syn", default="", metavar="HEX", help="the client's SYN (IP+TCP headers as hex) for the os fact")
    p.add_argument("--message", default="", metavar="FILE.eml",
                   help="a stored message: show its DKIM facts (dkim, dkim_domains, from_domain, dkim_aligned), "
                        "each signature's result and the Authentication-Results header the MTA would get")
    p.add_argument("--json", action="store_true", help="one JSON object instead of text")
    p.add_argument("--only-policy", action="store_true",
                   help="gather only the facts the loaded rules read (by default every fact smtpguard can "
                        "gather is shown, those the policy read marked *)")
    add_common_config_flags(p)
    p.set_defaults(func=run)


def _config(args: argparse.Namespace) -> cfg.Config:
    doc = cfg.read_toml(args.config) if args.config else {}
    flags = dict(vars(args))
    upstream = doc.get("upstream", {}) if isinstance(doc.get("upstream"), dict) else {}
    server = doc.get("server", {}) if isinstance(doc.get("server"), dict) else {}
    if not upstream.get("address"):
        flags["upstream"] = PLACEHOLDER_UPSTREAM
    if not server.get("domains") and not args.domain:
        flags["domain"] = [PLACEHOLDER_DOMAIN]
    return cfg.build(doc, flags, args.config or "")


def ordinary_recipient(config: cfg.Config) -> str:
    """A recipient of the first served domain that no built-in rule singles out."""
    domain = config.server.domains[0] if config.server.domains else PLACEHOLDER_DOMAIN
    return "user@" + ("mail" + domain if domain.startswith(".") else domain)


async def evaluate(config: cfg.Config, ip: str, helo: str = "", sender: str = "", rcpt: str = "",
                   syn: bytes | None = None, only_policy: bool = False) -> dict[str, Any]:
    """The facts and per-stage decisions for one client, as a live session makes them.

    Without `rcpt`, the reply is the one an ordinary recipient of a served
    domain would get at RCPT (a refusal held back until RCPT shows there).
    Unless `only_policy`, every source runs, not only those the rules read."""
    from smtpguard.services import Preview, build_services
    from smtpguard.session import ClientSession

    services = build_services(config, with_store=False)
    policy_runs = dict(services.run)
    if not only_policy:
        # every registered source (one without its data, as geo without
        # country data, says nothing)
        for name in services.run:
            services.run[name] = True
        services.wanted = None   # and each source gathers every fact it can, read or not
    services.preview = Preview(lists_read=bool(policy_runs.get("dnsbl")))
    session = ClientSession(services, ClientInfo("check", ip, 0, syn=syn))
    session.pause = _no_pause
    result: dict[str, Any] = {"ip": ip, "stages": [], "reply": "250 (delivered to the MTA, whose answer decides)",
                              "policy_facts": sorted(services.policy.facts())}
    if not rcpt:
        rcpt = ordinary_recipient(config)
        result["rcpt_assumed"] = rcpt
        if config.policy.default_postmaster:
            result["note"] = "postmaster@ and abuse@ of the served domains stay reachable (policy.default_postmaster)"
    # The live session's own stage methods, in SMTP order: the facts, the
    # decisions and the reply are the ones a client would get (issue 16).
    session.decisions = []
    reply = None
    try:
        reply = await session.on_connect()
        if reply is None and helo:
            reply = await session.screen_helo(helo, esmtp=True)
        if reply is None:
            reply = await session.screen_mail(sender or "<>", [])
        if reply is None:
            screened = await session.screen_rcpt(rcpt, [])
            reply = screened if isinstance(screened, str) else None
    finally:
        await services.close()
    stages: dict[str, dict[str, Any]] = {}
    for stage, verdict, facts in session.decisions:   # the last decision of a stage is its verdict
        stages[stage] = _entry(services.policy, stage, verdict, facts)
        if stage == "rcpt" and verdict.action == "graylist":
            stages[stage]["note"] = ("graylisted" + (" (strict)" if verdict.strict else "")
                                     + ": the first attempt of a new triplet is deferred; check does not read "
                                     "the store")
    if reply is not None and "rcpt" not in stages and session.facts.get("rcpt") is None and session.sender is not None:
        # refused for the address itself, before any rule ran
        stages["rcpt"] = {"stage": "rcpt", "action": "reject", "rule": None, "reason": session.last_reason,
                          "note": "refused for the address itself (not a served domain, or not a plain address)"}
    result["stages"] = list(stages.values())
    if reply is not None:
        result["reply"] = reply
    result["facts"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in session.facts.items() if k != "port"}
    return result


def _entry(policy: Any, stage: str, verdict: Any, facts: dict[str, Any]) -> dict[str, Any]:
    entry = {"stage": stage, "action": verdict.action, "rule": verdict.rule, "reason": verdict.reason or None,
             "deferred_to": verdict.deferred_to, "observed": [list(o) for o in verdict.observed],
             "rules": [{"rule": r, "matched": m, "failed": f or None} for r, m, f in explain(policy, stage, facts)]}
    if verdict.delay:
        entry["tarpit"] = verdict.delay   # seconds a live session waits before its reply
    return entry


async def _no_pause(_seconds: float) -> None:
    """check reports a tarpit's delay; it does not wait it out."""


async def message_facts(config: cfg.Config, data: bytes) -> dict[str, Any]:
    """`--message`: the DKIM facts of a stored message, as the data stage sees them."""
    from smtpguard.adapters.dns import Resolver
    from smtpguard.sources import dkim

    resolver = Resolver.from_settings(config.dns)
    fact = await dkim.gather(data, resolver, config.dns.stage_budget, config.dkim)
    close = getattr(resolver, "close", None)
    if close is not None:
        await close()
    header = dkim.authentication_results(dkim.authserv(config.dkim, config.server.hostname), fact)
    return {"facts": {k: (list(v) if isinstance(v, tuple) else v) for k, v in fact.as_facts().items()},
            "signatures": [{"result": r.result, "domain": r.domain, "selector": r.selector,
                            "algorithm": r.algorithm, "reason": dkim.REASONS.get(r.reason, "")}
                           for r in fact.results],
            "error": fact.error, "authentication_results": header.decode("ascii")}


def _message_text(m: dict[str, Any]) -> str:
    lines = ["message:"]
    for key in sorted(m["facts"]):
        lines.append(f"  {key:<22} {m['facts'][key]}")
    for n, sig in enumerate(m["signatures"], 1):
        lines.append(f"  signature {n}: {sig['result']} d={sig['domain'] or '-'} s={sig['selector'] or '-'} "
                     f"a={sig['algorithm'] or '-'}" + (f" ({sig['reason']})" if sig["reason"] else ""))
    if m["error"]:
        lines.append(f"  note: {m['error']}")
    lines.append("  " + m["authentication_results"].rstrip().replace("\r\n", "\n  "))
    return "\n".join(lines)


def _text(result: dict[str, Any]) -> str:
    lines = [f"client {result['ip']}", "facts (* read by the policy):"]
    used = set(result.get("policy_facts", ()))
    for key in sorted(result["facts"]):
        lines.append(f"{'*' if key in used else ' '} {key:<22} {result['facts'][key]}")
    for st in result["stages"]:
        head = f"{st['stage']}: {st['action']}"
        if st.get("rule"):
            head += f" by rule \"{st['rule']}\""
        if st.get("reason"):
            head += f" [{st['reason']}]"
        if st.get("deferred_to"):
            head += f", held back until {st['deferred_to']}"
        if st.get("tarpit"):
            head += f", the reply delayed {st['tarpit']:g} s (tarpit)"
        lines.append(head)
        for r in st.get("rules", []):
            mark = "matched" if r["matched"] else f"no ({r['failed']})"
            lines.append(f"    {r['rule']:<28} {mark}")
        for o in st.get("observed", []):
            lines.append(f"    observe: {o[0]} would {o[1]} [{o[2]}]")
        if st.get("note"):
            lines.append(f"    {st['note']}")
    if result.get("rcpt_assumed"):
        lines.append(f"reply at RCPT to an ordinary recipient ({result['rcpt_assumed']}): {result['reply']}")
    else:
        lines.append(f"reply: {result['reply']}")
    if result.get("note"):
        lines.append(result["note"])
    return "\n".join(lines)


def _read_message(path: str, limit: int) -> bytes:
    """A stored message (.eml, LF or CRLF line ends), at most `limit` bytes."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise ConfigError("--message", f"cannot read {path!r}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise ConfigError("--message", f"{path!r} is larger than server.max_message_size ({limit} bytes)")
    if b"\r\n" not in data:
        data = data.replace(b"\n", b"\r\n")   # a message saved with Unix line ends: the wire form is CRLF
    return data


def run(args: argparse.Namespace) -> int:
    try:
        ipaddress.ip_address(args.ip)
    except ValueError:
        raise ConfigError("IP", f"{args.ip!r} is not an IPv4 or IPv6 address") from None
    syn = None
    if args.syn:
        try:
            syn = bytes.fromhex(args.syn.replace(":", "").replace(" ", ""))
        except ValueError:
            raise ConfigError("--syn", "expected the SYN's IP+TCP header bytes as hex") from None
    config = _config(args)
    data = _read_message(args.message, config.server.max_message_size) if args.message else None
    log.setup(config.log.format, args.log_level or "warning")
    result = asyncio.run(evaluate(config, args.ip, args.helo, args.sender, args.rcpt, syn,
                                  only_policy=args.only_policy))
    if data is not None:
        result["message"] = asyncio.run(message_facts(config, data))
    text = _text(result) + ("\n" + _message_text(result["message"]) if data is not None else "")
    print(json.dumps(result, indent=2, default=str) if args.json else text)
    sys.stdout.flush()
    return 0
