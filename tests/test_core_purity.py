"""smtpguard/core/ stays pure (STYLE.md §1): no I/O, no clock, stdlib only.

Walks every import (module level and inside functions) of every
`smtpguard/core/*.py` with `ast` and fails on a module outside ALLOWED.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "smtpguard" / "core"

# Pure standard-library modules the core may import: no sockets, files,
# processes, clocks or event loops. A package entry covers its submodules
# (collections.abc); a dotted entry covers only itself (urllib.parse quotes
# strings; urllib.request would fetch).
ALLOWED: tuple[str, ...] = (
    "__future__",
    "array",
    "bisect",
    "collections",
    "dataclasses",
    "enum",
    "functools",
    "hashlib",
    "ipaddress",
    "itertools",
    "json",
    "math",
    "re",
    "string",
    "struct",
    "typing",
    "unicodedata",       # address.py: NFC for UTF-8 addresses (RFC 6530)
    "idna",              # address.py: IDNA 2008 A-labels, a pure computation
    "urllib.parse",      # reply.py: URL-encoding the resolution link
    "smtpguard.core",    # each other
    "smtpguard.errors",  # ConfigError for validation
)

# Calls that import around the walk.
FORBIDDEN_CALLS = ("__import__", "exec", "eval", "open")


def allowed(module: str) -> bool:
    return any(module == entry or module.startswith(entry + ".") for entry in ALLOWED)


def violations(source: str, package: str = "smtpguard.core") -> list[str]:
    """Every import or call in `source` that the core must not make."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [f"import {a.name}" for a in node.names if not allowed(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # Relative: resolve against the package (level 1 = core itself).
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(parts + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from smtpguard import errors` imports the submodule errors.
            if not allowed(module) and not all(allowed(f"{module}.{a.name}") for a in node.names):
                found.append(f"from {'.' * node.level}{node.module or ''} import ...")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in FORBIDDEN_CALLS):
            found.append(f"{node.func.id}()")
    return found


CHECKER_CASES = [
    ("import asyncio", ["import asyncio"]),
    ("import socket", ["import socket"]),
    ("from time import time", ["from time import ..."]),
    ("import os.path", ["import os.path"]),
    ("import urllib.request", ["import urllib.request"]),
    ("def f():\n    import sqlite3\n", ["import sqlite3"]),
    ("x = __import__('redis')", ["__import__()"]),
    ("data = open('/etc/passwd').read()", ["open()"]),
    ("from collections.abc import Mapping", []),
    ("from urllib.parse import quote", []),
    ("from . import facts", []),
    ("from .units import parse_duration", []),
    ("from .. import errors", []),
    ("from .. import session", ["from .. import ..."]),
    ("from smtpguard.core.geo import is_country_code", []),
    ("from smtpguard.errors import ConfigError", []),
    ("from smtpguard.adapters import dns", ["from smtpguard.adapters import ..."]),
]


@pytest.mark.parametrize("source, expected", CHECKER_CASES, ids=[
    "asyncio is refused",
    "sockets are refused",
    "the clock is refused",
    "the file system is refused",
    "urllib.request is refused though urllib.parse is allowed",
    "an import hidden inside a function is found",
    "a dynamic __import__ is found",
    "opening a file is found",
    "collections.abc is allowed",
    "urllib.parse is allowed",
    "a relative import of a core module is allowed",
    "a relative import of a core submodule is allowed",
    "the errors module is allowed",
    "a relative import of the session is refused",
    "the geo module is allowed for country codes",
    "ConfigError is allowed",
    "the adapters are refused",
])
def test_checker_catches_what_it_must(source: str, expected: list[str]) -> None:
    assert violations(source) == expected


CORE_FILES = sorted(CORE.glob("*.py"))


def test_the_core_has_modules_to_check() -> None:
    assert any(p.name == "policy.py" for p in CORE_FILES)


@pytest.mark.parametrize("path", CORE_FILES,
                         ids=[f"core/{p.name} imports only the pure stdlib" for p in CORE_FILES])
def test_core_module_is_pure(path: Path) -> None:
    assert violations(path.read_text(encoding="utf-8")) == []
