"""`smtpguard serve`: run the proxy."""

from __future__ import annotations

import argparse
from typing import Any, Mapping

from smtpguard import config as cfg
from smtpguard.errors import ConfigError
from smtpguard.observe import log
from smtpguard.workers import serve_one, supervise


def add_common_config_flags(p: argparse.ArgumentParser) -> None:
    """Flags shared by `serve` and `check`; each has a key in the TOML file."""
    p.add_argument("--config", metavar="FILE", help="TOML configuration file; every flag has a key there, and a flag overrides it")
    p.add_argument("--domain", action="append", metavar="DOMAIN",
                   help="a domain accepted for delivery (repeatable); .example.com also accepts subdomains [server.domains]")
    p.add_argument("--hostname", metavar="NAME", help="banner and EHLO name (default: this machine's FQDN) [server.hostname]")
    p.add_argument("--resolution-url", metavar="TEMPLATE",
                   help="URL in every refusal; placeholders {code} {ip} {helo} {sender} {rcpt} {session}, "
                        "URL-encoded when filled [server.resolution_url]")
    p.add_argument("--dns-server", action="append", metavar="IP[:PORT]",
                   help="resolver for every lookup smtpguard makes (repeatable; default the system's) [dns.servers]")
    p.add_argument("--state", metavar="URL",
                   help="state store: sqlite:///path, redis://host:port/db or memory:// [state.url]")
    p.add_argument("--zones", metavar="DIR", help="directory of ipdeny-style *.zone country files [geo.zones]")
    p.add_argument("--allow-country", metavar="CC,CC", help="default-deny geoblocking: only these countries [geo.allow]")
    p.add_argument("--log-format", choices=cfg.LOG_FORMATS, help="text or json, one line per event [log.format]")
    p.add_argument("--log-level", choices=cfg.LOG_LEVELS, help="debug, info, warning or error [log.level]")


def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "serve", help="run the proxy",
        description="Listen for SMTP clients, decide about each from facts, and relay accepted mail "
        "to the real MTA (--upstream) in real time. Durations accept seconds or 30s/5m/2h/35d; "
        "sizes accept bytes or 35MB. SIGTERM/SIGINT stop gracefully; SIGHUP reloads.")
    add_common_config_flags(p)
    p.add_argument("--listen", action="append", metavar="HOST:PORT",
                   help="address to listen on (repeatable; IPv6 as [::1]:2525; default 0.0.0.0:25) [server.listen]")
    p.add_argument("--upstream", metavar="HOST:PORT", help="the real MTA (required unless in the config) [upstream.address]")
    p.add_argument("--max-message-size", metavar="BYTES", help="advertised with SIZE (default 35MB) [server.max_message_size]")
    p.add_argument("--max-recipients", metavar="N", help="recipients per message (default 100) [server.max_recipients]")
    p.add_argument("--tls-cert", metavar="FILE", help="certificate for STARTTLS (with --tls-key) [server.tls_cert]")
    p.add_argument("--tls-key", metavar="FILE", help="private key for STARTTLS (with --tls-cert) [server.tls_key]")
    p.add_argument("--workers", metavar="N",
                   help="processes serving the same addresses (SO_REUSEPORT); default 1 [server.workers]")
    p.add_argument("--proxy-trusted", action="append", metavar="NETWORK",
                   help="networks allowed to send a PROXY header (repeatable or comma-separated; "
                        "required with proxy_protocol) [server.proxy_trusted]")
    p.add_argument("--pregreet-wait", metavar="DURATION",
                   help="the screen's early-talker wait before the last 220 line (default 6s; 0s: off) [pregreet.wait]")
    p.add_argument("--per-ip-sessions", metavar="N",
                   help="concurrent sessions per client, IPv6 per /64 (default 20; 0: off) [limits.per_ip_sessions]")
    p.add_argument("--per-ip-rate", metavar="N",
                   help="new sessions per minute per client (default 0: off) [limits.per_ip_rate]")
    p.add_argument("--max-sessions", metavar="N",
                   help="sessions of this process (default 1000; 0: off) [limits.max_sessions]")
    p.add_argument("--recipient-overshoot", metavar="N",
                   help="452 replies for recipients over max_recipients that do not count as errors "
                        "(default 1000, Postfix's smtpd_recipient_overshoot_limit) [limits.recipient_overshoot]")
    p.add_argument("--junk-commands", metavar="N",
                   help="NOOP, RSET, VRFY and HELP commands before each counts as an error, counted until a "
                        "delivery (default 100, Postfix's smtpd_junk_command_limit; 0: off) [limits.junk_commands]")
    p.add_argument("--limits-exempt", action="append", metavar="NETWORK",
                   help="networks exempt from the limits and the pregreet wait (repeatable) [limits.exempt]")
    p.add_argument("--xclient", action="store_const", const=True, default=None,
                   help="send the client's address, name and HELO to the MTA with XCLIENT (Postfix: "
                        "smtpd_authorized_xclient_hosts must list smtpguard's address) [upstream.xclient]")
    p.add_argument("--xforward", action="store_const", const=True, default=None,
                   help="send the client's address, name and HELO to the MTA with XFORWARD, for its logs "
                        "only (Postfix: smtpd_authorized_xforward_hosts) [upstream.xforward]")
    p.add_argument("--http", metavar="HOST:PORT",
                   help="serve the resolution page, /metrics, /healthz and /livez here (off by default; "
                        "with --workers N, worker k takes the first free of PORT..PORT+N-1) [http.listen]")
    p.set_defaults(func=run)


def load_config(args: argparse.Namespace) -> cfg.Config:
    return cfg.load(args.config, vars(args))


def run(args: argparse.Namespace) -> int:
    config = load_config(args)          # raises ConfigError: exit 2, nothing started
    from smtpguard.services import build_services

    log.setup(config.log.format, config.log.level)
    services = build_services(config, vars(args))  # raises ConfigError too, before any socket
    if config.server.workers > 1:
        from smtpguard.server import Server

        for host, port in config.server.listen:   # issue 11 item 3: exit 2 before any fork
            Server.probe_free(host, port)
        return supervise(config, vars(args))   # each worker builds its own after the fork
    return serve_one(config, vars(args), services)


# --- SMTPGUARD_* environment variables (issue 17) ---
# Containers are configured by their environment: every flag that has a key
# in the file also reads SMTPGUARD_<FLAG> (SMTPGUARD_UPSTREAM=mta:25,
# SMTPGUARD_DNS_SERVER=…, SMTPGUARD_CONFIG=/etc/smtpguard/smtpguard.toml).
# A flag wins over its variable and a variable over the file. A repeatable
# flag takes a comma-separated list. An empty variable counts as unset (as
# compose writes an unset ${VAR}); an unknown SMTPGUARD_* variable is an error,
# as an unknown key in the file is: a typo must not leave a default in force.
ENV_PREFIX = "SMTPGUARD_"


def env_name(dest: str) -> str:
    return ENV_PREFIX + dest.upper()


def apply_env(args: argparse.Namespace, parser: argparse.ArgumentParser,
              environ: Mapping[str, str]) -> dict[str, str]:
    """Fill the flags not given from SMTPGUARD_* variables, in place.

    Returns flag name (and file key) -> variable name for the values that
    came from the environment, so that an error about `--upstream` (or
    `upstream.address`) can name SMTPGUARD_UPSTREAM instead. Applies only
    to the flags this command has.
    """
    known = {env_name(dest): dest for dest in (*cfg.FLAG_KEYS, "config")}
    for var in sorted(environ):
        if var.startswith(ENV_PREFIX) and var not in known:
            raise ConfigError(var, "unknown variable; known: " + ", ".join(sorted(known)))
    appended = _repeatable(parser, args)
    origin: dict[str, str] = {}
    for var, dest in known.items():
        text = environ.get(var, "").strip()
        if not text or not hasattr(args, dest) or getattr(args, dest) not in (None, []):
            continue
        if "\x00" in text or "\n" in text or "\r" in text:
            raise ConfigError(var, "control characters are not allowed in a value")
        value: Any = [x.strip() for x in text.split(",") if x.strip()] if dest in appended else text
        setattr(args, dest, value)
        origin["--" + dest.replace("_", "-")] = var
        if dest in cfg.FLAG_KEYS:   # a later check may name the key (geo.zones): the value is the variable's
            origin[".".join(cfg.FLAG_KEYS[dest])] = var
    return origin


def _repeatable(parser: argparse.ArgumentParser, args: argparse.Namespace) -> set[str]:
    """The repeatable flags of the (sub)command that parsed `args`."""
    found: set[str] = set()
    for action in parser._actions:   # argparse has no public walk over its actions
        if isinstance(action, argparse._AppendAction):
            found.add(action.dest)
        elif isinstance(action, argparse._SubParsersAction):
            chosen = action.choices.get(getattr(args, action.dest, None) or "")
            if chosen is not None:
                found |= _repeatable(chosen, args)
    return found
