"""The `country` fact: where the client's address is, by the local country table.

Decides:
    the client's country: an ISO 3166-1 alpha-2 code, "local" (loopback,
    private, link-local or CGNAT space that no zone lists) or "unknown". It
    never decides to refuse: the policy turns `[geo] allow`/`deny` into rules.
Inputs:
    the client's IP address and the GeoDB loaded at start (or on reload).
Output:
    GeoFact(country, status): status OK for a code or "local"; NONE when no
    zone and no database lists the address (country "unknown"); UNKNOWN when
    no country data is loaded or the address cannot be read (country
    "unknown" too, so a rule on `country` sees one value either way).
Failure modes:
    a lookup cannot time out; a lookup that fails (a .mmdb damaged after
    start) is country "unknown", status UNKNOWN and a `geo.error` line, never
    an exception in the session (issue 19 item 8). Loading errors, a damaged
    search tree included, are ConfigErrors raised by GeoDB.open at start.
Defaults and why:
    `unknown = "deny"`: geoblocking is default-deny (issue 3: a business that
    trades with three countries wants mail from those three), and an address
    that no registry data places is not among them. `strict = false`: one bad
    line in a downloaded list should not stop the mail service; it is logged
    with file:line. Zones win over mmdb (see adapters/zones.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Mapping

from smtpguard.adapters.dns import RateLimitedLog
from smtpguard.adapters.zones import GeoDB
from smtpguard.core.facts import NONE, OK, UNKNOWN, FactValue
from smtpguard.core.geo import LOCAL, is_country_code, parse_address
from smtpguard.core.geo import UNKNOWN as UNKNOWN_COUNTRY
from smtpguard.core.settings import reject_unknown_keys
from smtpguard.errors import ConfigError
from smtpguard.core.facts import FactSpec, Kind, SourceSpec
from smtpguard.sources import Context, table

# The source's declaration (sources/registry.py; docs/adding-a-fact.md):
# settings GeoSettings from [geo] (read_settings), entry point gather_facts.
SOURCE = SourceSpec(
    name="geo",
    stage="connect",
    area="geo",
    facts=(
        FactSpec("country", Kind.TEXT),   # ISO 3166 alpha-2, "local" or "unknown"
    ),
)

# `unknown` setting: what the policy does with a client no data places.
UNKNOWN_ACTIONS: tuple[str, ...] = ("deny", "allow")

# geo.error lines: at most one a minute, with the count held back (a damaged
# database would otherwise write one per client).
_ERRORS = RateLimitedLog()
# Pseudo-codes a rule may name besides country codes.
PSEUDO_COUNTRIES: tuple[str, ...] = (LOCAL,)


@dataclass(frozen=True, slots=True)
class GeoFact:
    """The country of one client."""

    country: str    # "US", "local" or "unknown"
    status: str     # OK, NONE or UNKNOWN (smtpguard.core.facts)

    def as_facts(self) -> dict[str, FactValue]:
        return {"country": self.country}


def gather(client_ip: str, geodb: GeoDB | None) -> GeoFact:
    """The client's country. Sync: it is a table lookup of a few microseconds."""
    if geodb is None:
        return GeoFact(UNKNOWN_COUNTRY, UNKNOWN)
    try:
        country = geodb.country(client_ip)
    except Exception as exc:  # a source's failure is `unknown` and a log line, never a dead session
        _ERRORS.event("geo.error", "geo", logging.ERROR, ip=client_ip, error=str(exc)[:300])
        return GeoFact(UNKNOWN_COUNTRY, UNKNOWN)
    if country != UNKNOWN_COUNTRY:
        return GeoFact(country, OK)
    # "unknown" from a loaded table: the address is valid and nothing lists
    # it (NONE), unless the address itself could not be read (UNKNOWN).
    try:
        parse_address(client_ip)
    except ValueError:
        return GeoFact(UNKNOWN_COUNTRY, UNKNOWN)
    return GeoFact(UNKNOWN_COUNTRY, NONE)


@dataclass(frozen=True, slots=True)
class GeoSettings:
    """`[geo]`: where country data comes from and the default-deny shorthand."""

    zones: tuple[str, ...] = ()      # none: geoblocking is opt-in
    mmdb: str = ""                   # none: zone files are the documented source
    allow: tuple[str, ...] = ()      # empty: no allow-list (every country may connect)
    deny: tuple[str, ...] = ()       # empty: no deny-list
    unknown: str = "deny"            # default-deny, see the module docstring
    strict: bool = False             # a bad zone line is a warning, see the module docstring
    cache: str = ""                  # empty: beside the zones, else the user's cache dir

    @property
    def enabled(self) -> bool:
        """True when some country data is configured."""
        return bool(self.zones or self.mmdb)

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any], prefix: str = "geo") -> GeoSettings:
        """Validate a `[geo]` TOML table; ConfigError names `prefix.key`."""
        known = {"zones", "mmdb", "allow", "deny", "unknown", "strict", "cache"}
        reject_unknown_keys(table, prefix, sorted(known), wording="unknown setting; known")
        zones = _paths(table.get("zones", ()), f"{prefix}.zones")
        mmdb = _text(table.get("mmdb", ""), f"{prefix}.mmdb")
        cache = _text(table.get("cache", ""), f"{prefix}.cache")
        allow = _codes(table.get("allow", ()), f"{prefix}.allow")
        deny = _codes(table.get("deny", ()), f"{prefix}.deny")
        if allow and deny:
            raise ConfigError(f"{prefix}.allow", f"set {prefix}.allow (allow these, refuse the rest) or"
                              f" {prefix}.deny (refuse these, allow the rest), not both")
        unknown = table.get("unknown", "deny")
        if not isinstance(unknown, str) or unknown.lower() not in UNKNOWN_ACTIONS:
            raise ConfigError(f"{prefix}.unknown", f"{unknown!r} is not allowed; use \"deny\" or \"allow\"")
        strict = table.get("strict", False)
        if not isinstance(strict, bool):
            raise ConfigError(f"{prefix}.strict", f"{strict!r} is not true or false")
        if (allow or deny) and not (zones or mmdb):
            key = "allow" if allow else "deny"
            raise ConfigError(f"{prefix}.{key}", f"needs country data: set {prefix}.zones"
                              f" (a directory of .zone files) or {prefix}.mmdb")
        return cls(zones=zones, mmdb=mmdb, allow=allow, deny=deny,
                   unknown=unknown.lower(), strict=strict, cache=cache)


def _text(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"{value!r} is not a path string")
    return value


def _paths(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise ConfigError(key, f"{value!r} is not a directory or a list of directories")


def _codes(value: Any, key: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigError(key, f"{value!r} is not a list of country codes like [\"US\", \"CA\"]")
    out: list[str] = []
    for code in value:
        if isinstance(code, str) and code.lower() in PSEUDO_COUNTRIES:
            norm = code.lower()
        elif isinstance(code, str) and is_country_code(code):
            norm = code.upper()
        else:
            shown = f'"{code}"' if isinstance(code, str) else repr(code)
            raise ConfigError(key, f"{shown} is not an ISO 3166-1 alpha-2 country code")
        if norm not in out:
            out.append(norm)
    return tuple(out)


# --- the registry's entry points (smtpguard/sources/__init__.py) -------------

def read_settings(raw: Any) -> GeoSettings:
    """`[geo]` from the TOML document (None when absent)."""
    return GeoSettings.from_mapping(table(raw, "geo"))


async def gather_facts(ctx: Context) -> GeoFact | None:
    """The client's country; nothing without country data (a rule on
    country is then a config error, so no rule waits for it)."""
    if ctx.geodb is None:
        return None
    return gather(ctx.client.ip, ctx.geodb)
