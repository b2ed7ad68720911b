"""Every setting, from TOML and flags, validated once at start.

A flag overrides the file. A bad value raises ConfigError naming the key as
the admin wrote it (`server.listen` in the file, `--listen` on the command
line) and what is allowed; the CLI prints that one line and exits 2, having
started nothing. Unknown keys are errors too: a typo must not silently
leave a default in force.

Each area of the code owns its settings dataclass and its validation
(`from_mapping`); this module composes them and owns the server, upstream
and log settings.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
import socket
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping, Union

from smtpguard.adapters.dns import DnsSettings
from smtpguard.core.address import DomainSet, domain_key, normalise_domain
from smtpguard.core.policy import Policy, geo_rules, parse_policy
from smtpguard.core.units import parse_duration, parse_size
from smtpguard.errors import ConfigError
from smtpguard.observe.http import HttpSettings
from smtpguard.sources.dnsbl import DnsblSettings
from smtpguard.sources.registry import REGISTRY, Registry
from smtpguard.sources.geo import GeoSettings
from smtpguard.sources.graylist import GraylistSettings, StateSettings
from smtpguard.sources.fingerprint import FingerprintSettings
from smtpguard.sources.dkim import DkimSettings
from smtpguard.sources.rdns import RdnsSettings

# RFC 5321 §4.5.3.2.7: the server waits at least 5 minutes for a command.
DEFAULT_IDLE_TIMEOUT = 300.0
# Gmail's and Microsoft 365's published inbound limit is 35 MB (decimal);
# the issue asks for 35 MB.
DEFAULT_MAX_MESSAGE_SIZE = 35_000_000
# RFC 5321 §4.5.3.1.8: a server must accept at least 100 recipients.
DEFAULT_MAX_RECIPIENTS = 100
# Postfix's smtpd_hard_error_limit: a client making 20 errors is not an MTA.
DEFAULT_MAX_ERRORS = 20
# The grace period for sessions in DATA when stopping.
DEFAULT_GRACE_PERIOD = 30.0
# Postfix's smtp_connect_timeout.
DEFAULT_UPSTREAM_CONNECT_TIMEOUT = 30.0
# Postfix's smtpd_proxy_timeout: how long a before-queue proxy waits for
# its MTA's reply to one command.
DEFAULT_UPSTREAM_TIMEOUT = 100.0
# Idle upstream connections kept for reuse, and how long. Postfix's
# connection cache keeps a connection for smtp_connection_cache_time_limit
# (2 s) between deliveries; a front end sees its next client within
# milliseconds under load, and an idle loopback connection costs nothing,
# so it keeps them a little longer.
DEFAULT_UPSTREAM_POOL = 32
DEFAULT_UPSTREAM_IDLE = 10.0
# A PROXY v1/v2 header must arrive promptly (aiosmtpd warns below 3 s).
DEFAULT_PROXY_TIMEOUT = 5.0
# The screen (smtpguard/screen.py). postscreen_greet_wait is 6 s: long
# enough that a bot that does not wait for the greeting shows itself,
# short enough for real MTAs (they wait 5 minutes, RFC 5321 §4.5.3.2.1).
DEFAULT_PREGREET_WAIT = 6.0
# postscreen_greet_ttl: a client that passed is not made to wait for a day.
DEFAULT_PREGREET_PASS_TTL = 86400.0
# Postfix's smtpd_client_connection_count_limit is 50; a real MTA opens a
# handful at once (Postfix's default_destination_concurrency_limit is 20),
# so 20 refuses no MTA (the number).
DEFAULT_PER_IP_SESSIONS = 20
# smtpd_client_connection_rate_limit: 0 (off) in Postfix too; the right
# number depends on the site's biggest senders.
DEFAULT_PER_IP_RATE = 0
# Postfix's default_process_limit is 100 smtpd processes; an asyncio
# session costs far less, so one process holds 1,000 (the number).
DEFAULT_MAX_SESSIONS = 1000
# Postfix's smtpd_recipient_overshoot_limit: recipients beyond
# max_recipients get 452 4.5.3 and are not client errors until this many.
DEFAULT_RECIPIENT_OVERSHOOT = 1000
# Postfix's smtpd_junk_command_limit: NOOP, RSET, VRFY and HELP after this
# many (counted until a message is delivered) each count as an error, so a
# client cannot hold a session with them forever.
DEFAULT_JUNK_COMMANDS = 100
# RFC 5321 §4.5.3.2.5-6: 3 minutes per data block and 10 minutes for the
# terminating dot; Postfix's smtpd_timeout applies per read. The DATA timer
# restarts whenever bytes arrive, so only a stalled transfer is cut.
DEFAULT_DATA_TIMEOUT = 600.0
# A duration beyond a week is a typo, not a setting (nan and inf are refused too).
MAX_DURATION = 7 * 86400.0
# RFC 5321 §4.5.3.1.7: a server accepts messages of at least 64K octets.
MIN_MESSAGE_SIZE = 65_536

UPSTREAM_TLS = ("none", "opportunistic", "required")
# ESMTP extensions mirrored from the MTA to clients when the MTA offers them
# (a front must not take features away from the MTA behind it).
UPSTREAM_EXTENSIONS = ("SMTPUTF8", "DSN", "8BITMIME")
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
URL_PLACEHOLDERS = ("code", "ip", "helo", "sender", "rcpt", "session")
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclass(frozen=True, slots=True)
class ServerSettings:
    listen: tuple[tuple[str, int], ...] = (("0.0.0.0", 25),)
    hostname: str = ""
    domains: tuple[str, ...] = ()
    resolution_url: str = ""
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_recipients: int = DEFAULT_MAX_RECIPIENTS
    tls_cert: str = ""
    tls_key: str = ""
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    data_timeout: float = DEFAULT_DATA_TIMEOUT
    max_errors: int = DEFAULT_MAX_ERRORS
    grace_period: float = DEFAULT_GRACE_PERIOD
    proxy_protocol: bool = False
    proxy_timeout: float = DEFAULT_PROXY_TIMEOUT
    # Who may send a PROXY header: required with proxy_protocol, since a
    # header from anyone else would let any client claim any address.
    proxy_trusted: tuple[Network, ...] = ()
    # One process by default; `workers = N` runs N processes on the same
    # addresses (SO_REUSEPORT), one per core being the usual choice.
    workers: int = 1

    @property
    def served(self) -> DomainSet:
        return _served(self.domains)


@functools.lru_cache(maxsize=8)
def _served(domains: tuple[str, ...]) -> DomainSet:
    """The served domains, parsed once per configuration (read at every RCPT)."""
    return DomainSet.parse(domains)


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    host: str = ""
    port: int = 0
    tls: str = "none"  # the MTA normally sits on the same host or LAN
    xclient: bool = False
    # XFORWARD (Postfix XFORWARD_README) is its own choice: XCLIENT no longer
    # turns it on as a side effect.
    xforward: bool = False
    # What may be mirrored; `extensions = ["DSN"]` narrows the set.
    extensions: tuple[str, ...] = UPSTREAM_EXTENSIONS
    connect_timeout: float = DEFAULT_UPSTREAM_CONNECT_TIMEOUT
    timeout: float = DEFAULT_UPSTREAM_TIMEOUT
    pool_size: int = DEFAULT_UPSTREAM_POOL
    idle_time: float = DEFAULT_UPSTREAM_IDLE


@dataclass(frozen=True, slots=True)
class PregreetSettings:
    """[pregreet]: the early-talker test of the screen (postscreen's pregreet test)."""

    wait: float = DEFAULT_PREGREET_WAIT          # "0s" switches the test off
    pass_ttl: float = DEFAULT_PREGREET_PASS_TTL


@dataclass(frozen=True, slots=True)
class LimitsSettings:
    """[limits]: per-client and per-process session limits of the screen."""

    per_ip_sessions: int = DEFAULT_PER_IP_SESSIONS   # concurrent, IPv6 per /64; 0 = off
    per_ip_rate: int = DEFAULT_PER_IP_RATE           # new sessions per minute; 0 = off
    max_sessions: int = DEFAULT_MAX_SESSIONS         # whole process; 0 = off
    recipient_overshoot: int = DEFAULT_RECIPIENT_OVERSHOOT  # 452s for recipients over the limit not counted as errors
    junk_commands: int = DEFAULT_JUNK_COMMANDS      # NOOP/RSET/VRFY/HELP before each counts as an error; 0 = off
    # Networks exempt from the limits and the pregreet wait (a partner's
    # relays, your own hosts, monitoring). None by default, as postscreen.
    exempt: tuple[Network, ...] = ()


@dataclass(frozen=True, slots=True)
class LogSettings:
    format: str = "text"
    level: str = "info"


@dataclass(frozen=True, slots=True)
class Config:
    """Every setting, each area's own dataclass; built once, never mutated."""

    server: ServerSettings = field(default_factory=ServerSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    log: LogSettings = field(default_factory=LogSettings)
    dns: DnsSettings = field(default_factory=DnsSettings)
    geo: GeoSettings = field(default_factory=GeoSettings)
    fingerprint: FingerprintSettings = field(default_factory=FingerprintSettings)
    dkim: DkimSettings = field(default_factory=DkimSettings)   # issue 14: authserv_id, limits
    rdns: RdnsSettings = field(default_factory=RdnsSettings)
    dnsbl: DnsblSettings = field(default_factory=DnsblSettings)
    graylist: GraylistSettings = field(default_factory=GraylistSettings)
    state: StateSettings = field(default_factory=StateSettings)
    policy: Policy = field(default_factory=Policy)
    path: str = ""
    pregreet: PregreetSettings = field(default_factory=PregreetSettings)
    limits: LimitsSettings = field(default_factory=LimitsSettings)
    http: HttpSettings = field(default_factory=HttpSettings)   # issue 12: page, metrics, health
    # [state] url was written (file, flag or environment): the screen's pass
    # cache and rate counters then live there, else in the process.
    state_given: bool = False
    # The fact sources (sources/registry.py) the policy was checked against
    # and the services run; the settings of a source without a field above
    # (a newly added one), by its config area (`area()` reads either).
    registry: Registry = field(default=REGISTRY, compare=False, repr=False)
    source_settings: Mapping[str, Any] = field(default_factory=dict)

    def area(self, name: str) -> Any:
        """A source's settings by its config area ([geo] -> GeoSettings)."""
        if name in _FIELDS:
            return getattr(self, name)
        return self.source_settings.get(name)


# Config's fields: a source's area with a field of its own is stored there.
_FIELDS = frozenset(f.name for f in fields(Config))


# --- value parsers: each takes (key, value) and returns the typed value ---

def parse_hostport(key: str, value: Any, default_port: int | None = None) -> tuple[str, int]:
    """`HOST:PORT`, `[v6]:PORT`, or a bare host when a default port exists."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(key, f"expected HOST:PORT, got {value!r}")
    text = value.strip()
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d+))?", text)
    if m:
        host, port_text = m.group(1), m.group(2)
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(key, f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, None
        elif ":" in host:
            raise ConfigError(key, f"write IPv6 addresses in brackets, as [::1]:2525, got {value!r}")
    if not host:
        raise ConfigError(key, f"expected HOST:PORT, got {value!r}")
    if port_text is None:
        if default_port is None:
            raise ConfigError(key, f"expected HOST:PORT, got {value!r} (no port)")
        return host, default_port
    port = int(port_text) if port_text.isdigit() else -1
    if not 0 <= port <= 65535:
        raise ConfigError(key, f"port must be 0-65535, got {port_text!r}")
    return host, port


def _duration(key: str, value: Any) -> float:
    try:
        seconds = parse_duration(value)
    except (ValueError, TypeError) as e:
        raise ConfigError(key, str(e)) from None
    if seconds != seconds or seconds > MAX_DURATION:  # nan, inf, or absurd
        raise ConfigError(key, f"expected a duration of at most 7d, got {value!r}")
    return seconds


def _positive_duration(key: str, value: Any, minimum: float = 0.1) -> float:
    """A timeout: zero would cut every session at once."""
    seconds = _duration(key, value)
    if seconds < minimum:
        raise ConfigError(key, f"expected a duration of at least {minimum:g}s, got {value!r}")
    return seconds


def _size(key: str, value: Any) -> int:
    try:
        return parse_size(value)
    except (ValueError, TypeError) as e:
        raise ConfigError(key, str(e)) from None


def _int(key: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(key, f"expected a whole number ≥ {minimum}, got {value!r}")
    return value


# More workers than MAX_WORKERS_PER_CPU per core only adds memory and
# context switches (each is a whole process with its own pools and caches):
# beyond it, a typo (workers = 40 for 4) is reported instead of forking.
MAX_WORKERS_PER_CPU = 4


def _workers(key: str, value: Any) -> int:
    n = _int(key, value, 1)
    cap = MAX_WORKERS_PER_CPU * (os.cpu_count() or 1)
    if n > cap:
        raise ConfigError(key, f"{n} workers on {os.cpu_count() or 1} CPUs; at most {cap} "
                               f"({MAX_WORKERS_PER_CPU} per CPU)")
    return n


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ConfigError(key, f"expected true or false, got {value!r}")


def _choice(key: str, value: Any, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value.lower() not in allowed:
        raise ConfigError(key, f"expected one of {', '.join(allowed)}, got {value!r}")
    return value.lower()


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"expected a string, got {value!r}")
    return value


def _networks(key: str, value: Any) -> tuple[Network, ...]:
    """Networks written as `192.0.2.0/24`, `2001:db8::/32` or a single address."""
    items: list[Any] = []
    for item in _list(key, value):
        if isinstance(item, str):  # a flag may carry several, comma-separated
            items.extend(x.strip() for x in item.split(",") if x.strip())
        else:
            items.append(item)
    out: list[Network] = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(_str(key, item).strip()))
        except ValueError:
            raise ConfigError(key, f"{item!r} is not a network like 192.0.2.0/24 or 2001:db8::/32 "
                                   "(no host bits after the prefix)") from None
    return tuple(out)


def _list(key: str, value: Any) -> list[Any]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise ConfigError(key, f"expected a list, got {value!r}")
    return value


_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def _domain(key: str, value: Any) -> str:
    text = _str(key, value).strip()
    # U-labels are kept in their A-label form (RFC 5890): both spellings match.
    name = (domain_key(text.lstrip(".")) or "\x00") if not text.isascii() else normalise_domain(text).lstrip(".")
    if not name or len(name) > 253 or not all(_LABEL.match(label) for label in name.split(".")):
        raise ConfigError(key, f"{text!r} is not a domain name (use .example.com for subdomains)")
    return ("." if text.startswith(".") else "") + name


def _host_name(key: str, value: Any) -> str:
    """This host's name (banner, EHLO, Received): one name, no leading dot."""
    text = _str(key, value).strip()
    try:
        if text.startswith("."):
            raise ConfigError(key, "")
        return _domain(key, text)
    except ConfigError:
        raise ConfigError(key, f"{text!r} is not a host name such as mx.example.com") from None


def _served_domain(key: str, value: Any) -> str:
    """A domain we accept mail for: never a public suffix (`com`, `co.uk`), which would make an open relay."""
    name = _domain(key, value)
    bare = name.lstrip(".")
    if "." not in bare or _is_public_suffix(bare):
        raise ConfigError(key, f"{name!r} is a top-level domain or public suffix, not a domain of yours")
    return name


def _is_public_suffix(name: str) -> bool:
    from publicsuffixlist import PublicSuffixList

    return bool(PublicSuffixList().is_public(name))


def _size_at_least(key: str, value: Any, minimum: int) -> int:
    size = _size(key, value)
    if size < minimum:
        raise ConfigError(key, f"expected at least {minimum} bytes (0 does not mean unlimited), got {value!r}")
    return size


def _url_template(key: str, value: Any) -> str:
    text = _str(key, value)
    if re.search(r"[\x00-\x20\x7f-\uffff]", text):
        # The URL goes into every refusal on the wire: CR/LF would split the
        # reply (a forged second line), spaces would cut the URL.
        raise ConfigError(key, "the URL must be printable ASCII without spaces or control characters; "
                               "percent-encode anything else")
    for name in re.findall(r"\{([^}]*)\}", text):
        if name not in URL_PLACEHOLDERS:
            raise ConfigError(key, f"unknown placeholder {{{name}}}; allowed: "
                              + " ".join("{" + p + "}" for p in URL_PLACEHOLDERS))
    if text and not re.match(r"^https?://", text):
        raise ConfigError(key, f"expected an http:// or https:// URL, got {text!r}")
    return text


# key -> parser, per table: the tables that code, tests and docs read alike.
Parser = Callable[[str, Any], Any]
SERVER_KEYS: dict[str, Parser] = {
    "listen": lambda k, v: tuple(parse_hostport(f"{k}", x) for x in _list(k, v)),
    "hostname": _host_name,
    "domains": lambda k, v: tuple(_served_domain(k, x) for x in _list(k, v)),
    "resolution_url": _url_template,
    "max_message_size": lambda k, v: _size_at_least(k, v, MIN_MESSAGE_SIZE),
    "max_recipients": lambda k, v: _int(k, v, 1),
    "tls_cert": _str,
    "tls_key": _str,
    "idle_timeout": _positive_duration,
    "data_timeout": _positive_duration,
    "max_errors": lambda k, v: _int(k, v, 1),
    "grace_period": _duration,
    "proxy_protocol": _bool,
    "proxy_timeout": _positive_duration,
    "proxy_trusted": _networks,
    "workers": lambda k, v: _workers(k, v),
}
UPSTREAM_KEYS: dict[str, Parser] = {
    "address": lambda k, v: parse_hostport(k, v, default_port=25),
    "tls": lambda k, v: _choice(k, v, UPSTREAM_TLS),
    "xclient": _bool,
    "xforward": _bool,
    "extensions": lambda k, v: tuple(_choice(k, x, tuple(e.lower() for e in UPSTREAM_EXTENSIONS)).upper()
                                     for x in _list(k, v)),
    "connect_timeout": _positive_duration,
    "timeout": _positive_duration,
    "pool_size": lambda k, v: _int(k, v, 0),
    "idle_time": _duration,
}
PREGREET_KEYS: dict[str, Parser] = {
    "wait": _duration,
    "pass_ttl": lambda k, v: _positive_duration(k, v, 60.0),
}
LIMITS_KEYS: dict[str, Parser] = {
    "per_ip_sessions": lambda k, v: _int(k, v, 0),
    "per_ip_rate": lambda k, v: _int(k, v, 0),
    "max_sessions": lambda k, v: _int(k, v, 0),
    "recipient_overshoot": lambda k, v: _int(k, v, 0),
    "junk_commands": lambda k, v: _int(k, v, 0),
    "exempt": _networks,
}
LOG_KEYS: dict[str, Parser] = {
    "format": lambda k, v: _choice(k, v, LOG_FORMATS),
    "level": lambda k, v: _choice(k, v, LOG_LEVELS),
}
# Tables read by the other areas' own `from_mapping` (each fact source's
# table comes from the registry: Registry.areas()); listed so that an
# unknown top-level table is an error.
OTHER_TABLES = ("dns", "state", "policy", "lists", "rule", "http")

# flag dest -> (table, key): every flag has a key in the file.
FLAG_KEYS: dict[str, tuple[str, str]] = {
    "listen": ("server", "listen"),
    "upstream": ("upstream", "address"),
    "domain": ("server", "domains"),
    "hostname": ("server", "hostname"),
    "resolution_url": ("server", "resolution_url"),
    "max_message_size": ("server", "max_message_size"),
    "max_recipients": ("server", "max_recipients"),
    "workers": ("server", "workers"),
    "tls_cert": ("server", "tls_cert"),
    "tls_key": ("server", "tls_key"),
    "dns_server": ("dns", "servers"),
    "log_format": ("log", "format"),
    "log_level": ("log", "level"),
    "state": ("state", "url"),
    "zones": ("geo", "zones"),
    "allow_country": ("geo", "allow"),
    "proxy_trusted": ("server", "proxy_trusted"),
    "pregreet_wait": ("pregreet", "wait"),
    "per_ip_sessions": ("limits", "per_ip_sessions"),
    "per_ip_rate": ("limits", "per_ip_rate"),
    "max_sessions": ("limits", "max_sessions"),
    "recipient_overshoot": ("limits", "recipient_overshoot"),
    "junk_commands": ("limits", "junk_commands"),
    "limits_exempt": ("limits", "exempt"),
    "http": ("http", "listen"),
    "xclient": ("upstream", "xclient"),
    "xforward": ("upstream", "xforward"),
}


def read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("--config", f"no such file: {path}") from None
    except PermissionError:
        raise ConfigError("--config", f"cannot read {path}: permission denied") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("--config", f"{path} is not valid TOML: {e}") from None
    except UnicodeDecodeError:
        raise ConfigError("--config", f"{path} is not a text file (TOML is UTF-8)") from None
    except IsADirectoryError:
        raise ConfigError("--config", f"{path} is a directory, not a file") from None


def merge_flags(doc: dict[str, Any], flags: Mapping[str, Any]) -> dict[str, str]:
    """Write the given flags into the document; return key -> flag name for error messages."""
    origin: dict[str, str] = {}
    for dest, (table, key) in FLAG_KEYS.items():
        value = flags.get(dest)
        if value is None or value == []:
            continue
        if dest == "allow_country" and isinstance(value, str):
            value = [c.strip() for c in value.split(",") if c.strip()]
        section = doc.setdefault(table, {})
        if not isinstance(section, dict):
            raise ConfigError(table, "expected a table")
        section[key] = value
        origin[f"{table}.{key}"] = "--" + dest.replace("_", "-")
    return origin


def _section(doc: Mapping[str, Any], table: str, keys: Mapping[str, Parser],
             origin: Mapping[str, str]) -> dict[str, Any]:
    raw = _table(doc, table)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{table}.{key}"
        parser = keys.get(key)
        if parser is None:
            raise ConfigError(name, f"unknown key; known keys in [{table}]: {', '.join(keys)}")
        out[key] = parser(origin.get(name, name), value)
    return out


def _machine_fqdn() -> str:
    # Start-up only, never in a session (STYLE.md §7).
    name = socket.getfqdn()
    return name if "." in name else socket.gethostname()


def build(doc: dict[str, Any], flags: Mapping[str, Any] | None = None, path: str = "",
          registry: Registry = REGISTRY) -> Config:
    """Validate a TOML document (with flags merged in) into a Config.

    `registry`: the fact sources whose tables are read and whose facts the
    rules may name (a test or an embedding program passes one with more)."""
    origin = merge_flags(doc, flags or {})
    known = {"server", "upstream", "log", "pregreet", "limits", *OTHER_TABLES,
             *(s.spec.area for s in registry.areas())}
    for table in doc:
        if table not in known:
            raise ConfigError(table, f"unknown table; known: {', '.join(sorted(known))}")
    server = _section(doc, "server", SERVER_KEYS, origin)
    upstream = _section(doc, "upstream", UPSTREAM_KEYS, origin)
    log = _section(doc, "log", LOG_KEYS, origin)
    pregreet = _section(doc, "pregreet", PREGREET_KEYS, origin)
    limits = _section(doc, "limits", LIMITS_KEYS, origin)
    if server.get("proxy_protocol") and not server.get("proxy_trusted"):
        raise ConfigError(origin.get("server.proxy_trusted", "server.proxy_trusted"),
                          "required when proxy_protocol is on: the networks of your load balancers "
                          "(flag --proxy-trusted); a PROXY header from anyone else would let any "
                          "client claim any address")
    try:
        areas = _areas(doc, registry)
        areas["http"] = HttpSettings.from_mapping(_table(doc, "http"), areas["policy"])
    except ConfigError as e:
        # A value that came from a flag is reported under the flag's name.
        flag = origin.get(e.key)
        if flag is None:
            raise
        raise ConfigError(flag, e.message) from None

    if not areas["geo"].enabled:
        # Issue 11 item 7: without country data every client's country is
        # `unknown`, so a rule on it would refuse or pass everyone alike.
        for rule in areas["policy"].rules:
            if "country" in rule.facts:
                key = "geo.allow" if areas["geo"].allow else "geo.deny" if areas["geo"].deny else f'rule "{rule.name}".when.country'
                raise ConfigError(origin.get(key, key), "a rule on country needs country data: "
                                  "set [geo] zones (ipdeny-style *.zone files, flag --zones) or mmdb")
    if "address" not in upstream:
        raise ConfigError("--upstream", "the real MTA's HOST:PORT is required (flag --upstream or [upstream] address)")
    host, port = upstream.pop("address")
    if not server.get("domains"):
        raise ConfigError("--domain", "at least one served domain is required (flag --domain or [server] domains); "
                          "smtpguard is never an open relay")
    if bool(server.get("tls_cert")) != bool(server.get("tls_key")):
        raise ConfigError("--tls-cert" if server.get("tls_key") else "--tls-key",
                          "STARTTLS needs both --tls-cert and --tls-key")
    for key in ("tls_cert", "tls_key"):
        if server.get(key):
            try:
                open(server[key], "rb").close()
            except OSError as e:
                raise ConfigError(origin.get(f"server.{key}", f"server.{key}"),
                                  f"cannot read {server[key]}: {e.strerror}") from None
    if server.get("tls_cert"):
        check_tls_files(server["tls_cert"], server["tls_key"], origin.get("server.tls_cert", "server.tls_cert"))
    if not server.get("hostname"):
        # it goes on the wire (banner, EHLO, Received): validated like a configured one
        machine = _machine_fqdn()
        try:
            server["hostname"] = _host_name("server.hostname", machine)
        except ConfigError:
            raise ConfigError("server.hostname", f"this machine's name {machine!r} is not a host name "
                                                 "such as mx.example.com: set this key") from None
    return Config(
        server=ServerSettings(**server),
        upstream=UpstreamSettings(host=host, port=port, **upstream),
        log=LogSettings(**log),
        pregreet=PregreetSettings(**pregreet),
        limits=LimitsSettings(**limits),
        state_given="url" in _table(doc, "state"),
        path=path,
        **areas,
    )


def check_tls_files(cert: str, key: str, name: str = "server.tls_cert") -> None:
    """Load the certificate and key as STARTTLS will: a garbage file or a key
    that does not match is a start-up (or reload) error, never a dropped session."""
    import ssl

    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        ctx.load_cert_chain(cert, key)
    except (ssl.SSLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or str(e)
        raise ConfigError(name, f"cannot use {cert} with {key} for STARTTLS: {reason}") from None


def _table(doc: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, dict):
        raise ConfigError(name, "expected a table")
    return value


def _areas(doc: Mapping[str, Any], registry: Registry = REGISTRY) -> dict[str, Any]:
    """The other areas' settings, each validated by its own code: every fact
    source's table by its read_settings (the registry), then the policy,
    checked against the registry's facts."""
    areas: dict[str, Any] = {"dns": DnsSettings.from_mapping(_table(doc, "dns"))}
    extra: dict[str, Any] = {}
    for source in registry.areas():
        area = source.spec.area
        settings = source.read_settings(doc.get(area)) if source.read_settings else None
        (areas if area in _FIELDS else extra)[area] = settings
    geo = areas["geo"]
    implicit = geo_rules(geo.allow, geo.deny, geo.unknown, facts=registry.table) if (geo.allow or geo.deny) else ()
    areas["state"] = StateSettings.from_mapping(_table(doc, "state"))
    areas["policy"] = parse_policy(doc, implicit, facts=registry.table)
    areas["registry"] = registry
    areas["source_settings"] = extra
    return areas


def load(path: str | None, flags: Mapping[str, Any] | None = None, registry: Registry = REGISTRY) -> Config:
    doc = read_toml(path) if path else {}
    return build(doc, flags, path or "", registry)
