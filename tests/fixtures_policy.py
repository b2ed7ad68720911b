"""The shipped policy for tests and benchmarks, read from its one source.

`examples/smtpguard.toml` is what `make run` and the README ship; its
[policy], [lists] and [[rule]] tables are the default policy. The tests
that run "the shipped rules" read them here instead of a copy (the core
kept one until issue 16; the core does no file I/O).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "smtpguard.toml"
# The tables that make up a policy (core.rules.parse_policy reads these).
POLICY_TABLES = ("policy", "lists", "rule")


def default_rules_toml(path: Path = EXAMPLE) -> str:
    """The policy part of the example configuration as TOML text: from its
    `[policy]` header to the end of the file, so that it can be appended to
    another configuration. Raises ValueError when that part is not exactly
    the example's policy tables (a section after the rules, or a rule
    before [policy]), so the tests never run a truncated policy."""
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == "[policy]"]
    if len(starts) != 1:
        raise ValueError(f"{path}: expected one [policy] header, found {len(starts)}")
    part = "".join(lines[starts[0]:])
    whole = tomllib.loads(text)
    mine = tomllib.loads(part)
    expected = {k: whole[k] for k in POLICY_TABLES if k in whole}
    if mine != expected:
        raise ValueError(f"{path}: the text from [policy] on holds {sorted(mine)}, not exactly "
                         f"the policy tables {sorted(expected)}: keep [policy], [lists] and "
                         "[[rule]] together at the end of the file")
    return part
