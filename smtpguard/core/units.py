"""Durations and sizes as an admin writes them: `30s`, `5m`, `2h`, `35d`, `35MB`.

Pure: strings in, numbers out; a bad value raises ValueError with a message
that the caller wraps into a ConfigError naming the key.
"""

from __future__ import annotations

import re

# Unit tables (STYLE.md §2): code, tests and docs read the same mapping.
DURATION_UNITS: dict[str, float] = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
# Decimal units, as Postfix's message_size_limit and most MTAs document sizes;
# the binary forms are accepted too.
SIZE_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gib": 1024**3,
}

_NUMBER_UNIT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_duration(value: str | int | float) -> float:
    """Seconds from `300`, `30s`, `5m`, `2h`, `35d` or `1w`."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 300, 30s, 5m, 2h or 35d, got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"a duration cannot be negative, got {value!r}")
        return float(value)
    m = _NUMBER_UNIT.match(value)
    if not m or m.group(2).lower() not in DURATION_UNITS:
        raise ValueError(f"expected a duration like 300, 30s, 5m, 2h or 35d, got {value!r}")
    return float(m.group(1)) * DURATION_UNITS[m.group(2).lower()]


def parse_size(value: str | int) -> int:
    """Bytes from `1048576`, `512KB`, `35MB` or `1GiB`."""
    if isinstance(value, bool):
        raise ValueError(f"expected a size like 36700160 or 35MB, got {value!r}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"a size cannot be negative, got {value!r}")
        return value
    m = _NUMBER_UNIT.match(value)
    if not m or m.group(2).lower() not in SIZE_UNITS:
        raise ValueError(f"expected a size like 36700160 or 35MB, got {value!r}")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2).lower()])
