"""`smtpguard zones update|info`: fetch country zone files; show what loads.

update: downloads ipdeny's aggregated IPv4 and IPv6 lists for the countries
into DEST and replaces the old set atomically; on any failure the old set
stays and the exit code is 1 with one line saying why.
info: loads the configured country data as the server would (building the
compiled cache if it is stale) and prints networks, countries, load time,
cache state and warnings; `--lookup IP` prints the country of addresses.

Exit codes: 0 done, 1 the update failed, 2 bad input (flags, or zone data refused by --strict).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from smtpguard.adapters.zone_update import (
    DEFAULT_IPV4_URL,
    DEFAULT_IPV6_URL,
    DEFAULT_TIMEOUT,
    ZoneUpdateError,
    existing_countries,
    update_zones,
)
from smtpguard.adapters.zones import GeoDB, GeoLookupError
from smtpguard.core.geo import is_country_code
from smtpguard.core.units import parse_duration
from smtpguard.errors import ConfigError
from smtpguard.sources.geo import GeoSettings

# Settings keys as the `info` flags spell them, for error lines.
_FLAG_FOR_KEY = {"geo.zones": "--zones", "geo.mmdb": "--mmdb", "geo.cache": "--cache"}


def add_parser(subparsers: Any) -> None:
    """Add `zones` with its `update` and `info` subcommands."""
    parser = subparsers.add_parser(
        "zones", help="download and inspect country zone files (geoblocking data)",
        description="Country zone files for [geo]: download them from ipdeny.com"
                    " (or a mirror) and show what the server would load.")
    sub = parser.add_subparsers(dest="zones_command", metavar="{update,info}", required=True)

    up = sub.add_parser(
        "update", help="download zone files and replace the set atomically",
        description="Download one IPv4 and one IPv6 list per country into DEST"
                    " (DEST/ipv4/<cc>-aggregated.zone, DEST/ipv6/<cc>-aggregated.zone)."
                    " Every line of every file is validated; an HTTP error, a timeout,"
                    " an empty list or an HTML page fails the update and leaves the old"
                    " set untouched. DEST is replaced whole: keep your own zone files"
                    " in another directory (geo.zones takes a list).",
        epilog="example: smtpguard zones update --dest /var/lib/smtpguard/zones --countries us,ca,mx")
    up.add_argument("--dest", required=True, metavar="DIR",
                    help="directory that receives the set (created if missing; its parent must exist)")
    up.add_argument("--countries", metavar="CC,CC,...",
                    help="ISO 3166-1 alpha-2 codes, comma-separated (default: the countries"
                         " already in DEST)")
    up.add_argument("--base-url", default=DEFAULT_IPV4_URL, metavar="URL",
                    help="IPv4 list URL, {cc} standing for the lower-case code"
                         f" (default: {DEFAULT_IPV4_URL})")
    up.add_argument("--ipv6-base-url", default=DEFAULT_IPV6_URL, metavar="URL",
                    help=f"IPv6 list URL, {{cc}} as above (default: {DEFAULT_IPV6_URL})")
    up.add_argument("--no-ipv6", action="store_true",
                    help="fetch IPv4 lists only (for a country with no IPv6 list)")
    up.add_argument("--timeout", default=f"{DEFAULT_TIMEOUT:g}s", metavar="DURATION",
                    help="longest the whole update may take, like 30s or 2m (default: %(default)s)")
    up.set_defaults(func=run)

    info = sub.add_parser(
        "info", help="load country data as the server would and print statistics",
        description="Load zone files (and an .mmdb) as `smtpguard serve` does, building the"
                    " compiled cache if it is stale, and print networks, countries, load time,"
                    " cache state and every malformed line with file:line.")
    info.add_argument("--zones", action="append", default=[], metavar="DIR",
                      help="directory of .zone files (searched at any depth); repeat for several")
    info.add_argument("--mmdb", default="", metavar="FILE",
                      help="a MaxMind-format country database (GeoLite2-Country, DB-IP Lite)")
    info.add_argument("--cache", default="", metavar="PATH",
                      help="compiled cache file (default: beside the zones, else ~/.cache/smtpguard)")
    info.add_argument("--strict", action="store_true",
                      help="fail on any malformed zone line, as geo.strict = true does")
    info.add_argument("--lookup", action="append", default=[], metavar="IP",
                      help="also print the country of this address; repeat for several")
    info.set_defaults(func=run)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    command = getattr(args, "zones_command", None)
    if command == "update":
        return _run_update(args)
    if command == "info":
        return _run_info(args)
    print("zones: name a subcommand: update or info", file=sys.stderr)
    return 2


def _run_update(args: argparse.Namespace) -> int:
    try:
        timeout = parse_duration(args.timeout)
    except ValueError as exc:
        print(f"--timeout: {exc}", file=sys.stderr)
        return 2
    if timeout <= 0:
        print("--timeout: must be more than 0", file=sys.stderr)
        return 2
    if args.countries:
        codes = [c.strip() for c in args.countries.split(",") if c.strip()]
        bad = [c for c in codes if not is_country_code(c)]
        if bad or not codes:
            shown = f'"{bad[0]}" is not' if bad else "no code given; expected"
            print(f"--countries: {shown} an ISO 3166-1 alpha-2 country code (like us,ca,mx)",
                  file=sys.stderr)
            return 2
    else:
        codes = list(existing_countries(args.dest))
        if not codes:
            print(f"--countries: {args.dest} has no zone files yet; name the countries"
                  " (like --countries us,ca,mx)", file=sys.stderr)
            return 2
    for flag, url in (("--base-url", args.base_url), ("--ipv6-base-url", args.ipv6_base_url)):
        if not url.startswith(("http://", "https://")):
            print(f"{flag}: {url!r} is not an http:// or https:// URL", file=sys.stderr)
            return 2
    try:
        result = update_zones(args.dest, codes, ipv4_url=args.base_url,
                              ipv6_url=None if args.no_ipv6 else args.ipv6_base_url,
                              timeout=timeout)
    except ZoneUpdateError as exc:
        print(f"zones update failed, {args.dest} left unchanged: {exc}", file=sys.stderr)
        return 1
    print(result.line())
    return 0


def _run_info(args: argparse.Namespace) -> int:
    if not args.zones and not args.mmdb:
        print("--zones: name a directory of .zone files (or --mmdb FILE)", file=sys.stderr)
        return 2
    # The statistics below list every warning; keep the logging module's
    # last-resort handler from printing each one a second time.
    logging.getLogger("smtpguard.geo").addHandler(logging.NullHandler())
    settings = GeoSettings(zones=tuple(args.zones), mmdb=args.mmdb, strict=args.strict,
                           cache=args.cache)
    try:
        db = GeoDB.open(settings)
    except ConfigError as exc:
        print(f"{_FLAG_FOR_KEY.get(exc.key, exc.key)}: {exc.message}", file=sys.stderr)
        return 2
    try:
        for line in db.stats.lines():
            print(line)
        for ip in args.lookup:
            try:
                print(f"{ip}: {db.country(ip)}")
            except GeoLookupError as exc:
                print(f"--mmdb: {exc}", file=sys.stderr)
                return 2
    finally:
        db.close()
    return 0
