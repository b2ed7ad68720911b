"""`smtpguard firewall export`: the country policy as an nftables, ipset or pf rule set.

Decides:
    which client networks the packet filter lets reach the SMTP port, so
    that a country the policy refuses is refused before a TCP session (the
    seed's author keeps the same country list in his firewall). It applies
    to port 25 (`--port`) only; loopback, private networks and the
    configured allowlist are always let through.
Inputs:
    the configuration (`--config`, `--zones`, `--allow-country`): `[geo]
    allow` or `deny` and `unknown`, the zone files (GeoDB), the allowlist
    (connect-stage `accept` rules whose only condition is `ip_in`, and
    `[limits] exempt` where configured).
Output:
    a file for `nft -f`, `ipset restore` or a pf.conf include, IPv4 and
    IPv6, every set merged to the fewest CIDRs (netaddr.cidr_merge). Which
    set is written follows the policy exactly (core.policy.geo_rules):
      * `unknown = "deny"` (the default): an address no zone places is
        refused too, so the set holds the networks to ACCEPT (allow: the
        allowed countries; deny: every zoned country but the denied ones)
        and everything else to the port is dropped;
      * `unknown = "allow"`: the set holds the networks to DROP (allow: the
        zoned countries not allowed; deny: the denied ones).
Failure modes:
    no `[geo] allow`/`deny`, no zone files (an .mmdb cannot be enumerated),
    or a bad `--port` or `--format` is a ConfigError naming the key (exit 2).
Defaults and why:
    * port 25: the MX port, the one smtpguard fronts; submission ports
      (587, 465) serve authenticated users from anywhere.
    * the exempt networks are core.geo.LOCAL_NETWORKS (RFC 1918, RFC 4193,
      loopback, link-local, RFC 6598), never blocked by the policy either.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from smtpguard import config as cfg
from smtpguard.core.geo import LOCAL_NETWORKS
from smtpguard.commands.output import write_output
from smtpguard.errors import ConfigError

FORMATS = ("nft", "ipset", "pf")
DEFAULT_PORT = 25  # RFC 5321 §4.5.4.2 / the MX port smtpguard fronts
TABLE = "smtpguard"
PLACEHOLDER_UPSTREAM = "127.0.0.1:25"
PLACEHOLDER_DOMAIN = "firewall.invalid"
# ipset's hash:net default maxelem; raised when a set is larger.
IPSET_MAXELEM = 65536


def add_parser(sub: Any) -> None:
    p = sub.add_parser("firewall", help="export the country policy for nftables, ipset or pf",
                       description="Write the [geo] country policy of the configuration as packet "
                       "filter rules for the SMTP port.")
    fsub = p.add_subparsers(dest="firewall_command", metavar="SUBCOMMAND", parser_class=type(p))
    e = fsub.add_parser("export", help="write the rule set",
                        description="Write the country policy (the [geo] allow or deny list, from the "
                        "loaded zone files) as an nftables table, an ipset restore file or a pf table, "
                        "for one port only, with loopback, private networks and the allowlist exempt; "
                        "IPv4 and IPv6; merged to the fewest CIDRs.")
    e.add_argument("--format", choices=FORMATS, default="nft", help="nft (default), ipset or pf")
    e.add_argument("--config", metavar="FILE", help="the smtpguard configuration file")
    e.add_argument("--zones", metavar="DIR", help="directory of *.zone country files [geo.zones]")
    e.add_argument("--allow-country", metavar="CC,CC", help="only these countries [geo.allow]")
    e.add_argument("--port", default=str(DEFAULT_PORT), metavar="PORT", help="the SMTP port (default 25)")
    e.add_argument("--out", metavar="FILE", help="write to FILE instead of standard output")
    e.set_defaults(func=run)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


@dataclass(frozen=True, slots=True)
class RuleSet:
    """What the filter does on the port: `mode` accept (the set is let in,
    the rest dropped) or drop (the set is dropped, the rest let in)."""

    mode: str
    networks: tuple[Any, ...]        # netaddr.IPNetwork, merged, IPv4 first
    exempt: tuple[Any, ...]
    port: int
    countries: tuple[str, ...]       # the countries the set is made of

    def family(self, nets: Iterable[Any], version: int) -> list[str]:
        return [str(n) for n in nets if n.version == version]


def _config(args: argparse.Namespace) -> cfg.Config:
    doc = cfg.read_toml(args.config) if args.config else {}
    flags: dict[str, Any] = {"zones": args.zones, "allow_country": args.allow_country,
                             "hostname": "firewall.invalid"}
    upstream = doc.get("upstream")
    server = doc.get("server")
    if not (isinstance(upstream, dict) and upstream.get("address")):
        flags["upstream"] = PLACEHOLDER_UPSTREAM
    if not (isinstance(server, dict) and server.get("domains")):
        flags["domain"] = [PLACEHOLDER_DOMAIN]
    return cfg.build(doc, flags, args.config or "")


def allowlist(config: cfg.Config) -> list[str]:
    """Networks the configuration always lets in: connect-stage accept rules
    that test nothing but the address, and `[limits] exempt`."""
    out: list[str] = []
    for rule in config.policy.rules:
        if (rule.stage == "connect" and rule.action == "accept" and not rule.observe
                and not config.policy.observe and rule.when
                and all(c.fact == "ip" and c.op == "in" for c in rule.when) and len(rule.when) == 1):
            out.extend(str(n) for n in rule.when[0].networks)
    limits = getattr(config, "limits", None)
    out.extend(str(n) for n in getattr(limits, "exempt", ()) or ())
    return out


def rule_set(config: cfg.Config, table: Any, port: int) -> RuleSet:
    """The networks to accept or drop, from the loaded zone table (core.geo.RangeTable)."""
    from netaddr import IPNetwork, IPRange, cidr_merge

    geo = config.geo
    if not (geo.allow or geo.deny):
        raise ConfigError("geo.allow", "no country policy to export: set [geo] allow (or deny) "
                                       "or --allow-country")
    if not geo.zones:
        raise ConfigError("geo.zones", "the firewall export needs zone files ([geo] zones or --zones); "
                                       "an .mmdb cannot be listed")
    zoned = set(table.countries)
    allow = {c.upper() for c in geo.allow if c != "local"}
    deny = {c.upper() for c in geo.deny if c != "local"}
    if geo.unknown == "deny":
        mode = "accept"
        chosen = allow if geo.allow else zoned - deny
    else:
        mode = "drop"
        chosen = zoned - allow if geo.allow else deny
    pieces: list[Any] = []
    for version in (4, 6):
        for first, last, country in table.ranges(version):
            if country in chosen:
                pieces.extend(IPRange(first, last).cidrs() if version == 4
                              else IPRange(_v6(first), _v6(last)).cidrs())
    exempt = [IPNetwork(n) for n, _why in LOCAL_NETWORKS] + [IPNetwork(n) for n in allowlist(config)]
    return RuleSet(mode=mode, networks=tuple(_ordered(cidr_merge(pieces))),
                   exempt=tuple(_ordered(cidr_merge(exempt))), port=port,
                   countries=tuple(sorted(chosen & zoned)))


def _v6(value: int) -> Any:
    from netaddr import IPAddress
    return IPAddress(value, 6)


def _ordered(nets: Sequence[Any]) -> list[Any]:
    return sorted(nets, key=lambda n: (n.version, n.first, n.prefixlen))


# --- writers ------------------------------------------------------------------

def _header(rs: RuleSet, comment: str = "#") -> list[str]:
    what = "accepted (every other client is dropped)" if rs.mode == "accept" else "dropped"
    return [f"{comment} smtpguard firewall export: TCP port {rs.port} only.",
            f"{comment} Clients from {', '.join(rs.countries) or 'no country'} are {what};",
            f"{comment} loopback, private networks and the allowlist are always accepted."]


def _elements(nets: list[str], indent: str) -> list[str]:
    if not nets:
        return []
    lines = [f"{indent}elements = {{"]
    for i in range(0, len(nets), 8):
        chunk = ", ".join(nets[i:i + 8])
        lines.append(f"{indent}    {chunk}{',' if i + 8 < len(nets) else ''}")
    lines.append(f"{indent}}}")
    return lines


def nft(rs: RuleSet) -> str:
    lines = _header(rs)
    lines += [f"table inet {TABLE}", f"delete table inet {TABLE}", f"table inet {TABLE} {{"]
    for name, nets in (("exempt", rs.exempt), ("geo", rs.networks)):
        for version, kind in ((4, "ipv4_addr"), (6, "ipv6_addr")):
            lines += [f"    set {name}{version} {{", f"        type {kind}", "        flags interval"]
            lines += _elements(rs.family(nets, version), "        ")
            lines.append("    }")
    verdict = "accept" if rs.mode == "accept" else "drop"
    lines += ["    chain input {",
              "        type filter hook input priority filter - 1; policy accept;",
              f"        tcp dport {rs.port} ip saddr @exempt4 accept",
              f"        tcp dport {rs.port} ip6 saddr @exempt6 accept",
              f"        tcp dport {rs.port} ip saddr @geo4 {verdict}",
              f"        tcp dport {rs.port} ip6 saddr @geo6 {verdict}"]
    if rs.mode == "accept":
        lines.append(f"        tcp dport {rs.port} drop")
    lines += ["    }", "}"]
    return "\n".join(lines) + "\n"


def ipset(rs: RuleSet) -> str:
    # `ipset restore` reads commands only; how to use the sets goes to stderr.
    lines: list[str] = []
    for name, nets in (("exempt", rs.exempt), ("geo", rs.networks)):
        for version, family in ((4, "inet"), (6, "inet6")):
            members = rs.family(nets, version)
            set_name = f"{TABLE}-{name}{version}"
            maxelem = max(IPSET_MAXELEM, len(members))
            lines.append(f"create {set_name} hash:net family {family} maxelem {maxelem} -exist")
            lines.append(f"flush {set_name}")
            lines += [f"add {set_name} {n}" for n in members]
    return "\n".join(lines) + "\n"


def ipset_usage(rs: RuleSet) -> str:
    verdict = "ACCEPT" if rs.mode == "accept" else "DROP"
    out = []
    for tool, v in (("iptables", 4), ("ip6tables", 6)):
        out.append(f"{tool} -I INPUT -p tcp --dport {rs.port} -m set --match-set {TABLE}-exempt{v} src -j ACCEPT")
        out.append(f"{tool} -A INPUT -p tcp --dport {rs.port} -m set --match-set {TABLE}-geo{v} src -j {verdict}")
        if rs.mode == "accept":
            out.append(f"{tool} -A INPUT -p tcp --dport {rs.port} -j DROP")
    return "\n".join(out) + "\n"


def pf(rs: RuleSet) -> str:
    lines = _header(rs)

    def table(name: str, nets: Sequence[Any]) -> None:
        # pf.conf(5): a line ending in a backslash continues on the next
        members = [str(n) for n in nets]
        lines.append(f"table <{TABLE}_{name}> const {{ \\")
        for i in range(0, len(members), 8):
            more = "," if i + 8 < len(members) else ""
            lines.append("    " + ", ".join(members[i:i + 8]) + more + " \\")
        lines.append("}")

    table("exempt", rs.exempt)
    table("geo", rs.networks)
    lines.append(f"pass in quick proto tcp from <{TABLE}_exempt> to any port {rs.port}")
    if rs.mode == "accept":
        lines.append(f"pass in quick proto tcp from <{TABLE}_geo> to any port {rs.port}")
        lines.append(f"block in quick proto tcp to any port {rs.port}")
    else:
        lines.append(f"block in quick proto tcp from <{TABLE}_geo> to any port {rs.port}")
    return "\n".join(lines) + "\n"


WRITERS = {"nft": nft, "ipset": ipset, "pf": pf}


def run(args: argparse.Namespace) -> int:
    try:
        port = int(args.port)
    except ValueError:
        port = 0
    if not 1 <= port <= 65535:
        raise ConfigError("--port", f"{args.port!r} is not a TCP port (1 to 65535)")
    config = _config(args)
    from smtpguard.adapters.zones import GeoDB
    if not config.geo.zones:
        rule_set(config, None, port)  # raises the config error naming the missing key
    db = GeoDB.open(config.geo)
    try:
        rs = rule_set(config, db.table, port)
    finally:
        db.close()
    unzoned = sorted({c.upper() for c in config.geo.allow if c != "local"} - set(rs.countries)) \
        if rs.mode == "accept" and config.geo.allow else []
    if unzoned:
        # an allowed country without data would be dropped whole by the filter
        sys.stderr.write(f"smtpguard: warning: no zone data for allowed {', '.join(unzoned)}: "
                         "the filter would drop its clients\n")
    body = WRITERS[args.format](rs)
    write_output(body, args.out, encoding="ascii")
    if args.format == "ipset":
        sys.stderr.write("# load with `ipset restore < FILE`, then:\n" + ipset_usage(rs))
    return 0
