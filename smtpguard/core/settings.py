"""Shared checks for the settings tables every `from_mapping` reads.

Decides: whether a TOML table holds only the keys its reader knows, and
  whether a duration setting is one within its bounds.
Inputs: the table, the dotted name it was read under (`dns`, `graylist`,
  `dnsbl[2]`), the known keys in the order the message lists them, and the
  message's wording (each reader keeps the wording its users already see).
Output: nothing; a ConfigError naming `prefix.key` for the first unknown key,
  listing the known ones.
Failure modes: only that ConfigError (one line, exit 2 at start).
Defaults and why: the wording "unknown key; allowed", the one most readers
  used before this helper (issue 16).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from smtpguard.core.units import parse_duration
from smtpguard.errors import ConfigError


def reject_unknown_keys(table: Mapping[str, Any], prefix: str, known: Iterable[str], *,
                        wording: str = "unknown key; allowed") -> None:
    """ConfigError(`prefix.key`, "<wording>: a, b, c") for the first key of
    `table` not in `known`; the known keys are listed in the order given."""
    names = tuple(known)
    for key in table:
        if key not in names:
            raise ConfigError(f"{prefix}.{key}", f"{wording}: {', '.join(names)}")


def bounded_duration(table: Mapping[str, Any], key: str, prefix: str, maximum: float, default: float) -> float:
    """`table[key]` as seconds ("5s", "2m", a number), more than 0 and at
    most `maximum`; `default` when the key is absent. ConfigError names
    `prefix.key` otherwise."""
    if key not in table:
        return default
    try:
        seconds = parse_duration(table[key])
    except ValueError as exc:
        raise ConfigError(f"{prefix}.{key}", str(exc)) from None
    if not 0 < seconds <= maximum:
        raise ConfigError(f"{prefix}.{key}", f"must be more than 0 and at most {maximum:g}s, got {table[key]!r}")
    return seconds
