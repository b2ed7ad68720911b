"""One spelling for the graylist feature (issue 16): `graylist` in modules,
identifiers, log events, reason codes, texts and docs.

What is left with the other spelling is named here, and nothing else:
- `postgrey`, the program whose defaults we cite;
- spamd's greytrapping / greytrap / GREYTRAP, on a line that names spamd;
- the store's key prefix `grey:` (core/graylist.KEY_PREFIX), the format of
  the data in existing stores.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("smtpguard", "tests", "bench", "examples", "scripts", "docs", "README.md")
SUFFIXES = {".py", ".toml", ".md", ".sh", ".txt", ".cfg", ".ini", ".html", ".snippet", ".cf"}

_ALLOWED = re.compile(r"postgrey|grey:", re.IGNORECASE)
_SPAMD_TRAP = re.compile(r"greytrap\w*", re.IGNORECASE)
_GREY = re.compile(r"grey", re.IGNORECASE)


def offending(line: str) -> bool:
    """True when a line spells the graylist feature the other way."""
    rest = _ALLOWED.sub("", line)
    if "spamd" in rest.lower():
        rest = _SPAMD_TRAP.sub("", rest)
    return bool(_GREY.search(rest))


def files() -> list[Path]:
    out: list[Path] = []
    for name in SCANNED:
        top = ROOT / name
        if top.is_file():
            out.append(top)
        elif top.is_dir():
            out.extend(p for p in sorted(top.rglob("*"))
                       if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts)
    return [p for p in out if p.resolve() != Path(__file__).resolve()]


def test_the_checker_tells_the_spellings_apart() -> None:
    assert offending('event("grey.defer")')
    assert offending('"GREY": (451, "4.7.1", "greylisted, try again later")')
    assert offending("from smtpguard.core import greylist as g")
    assert offending("# greytrapping")                      # not spamd's: not allowed
    assert not offending("postgrey's --max-age (35 days)")
    assert not offending("# spamd's greytrap blacklist lifetime (GREYTRAP 24 h, spamd(8)).")
    assert not offending('KEY_PREFIX = "grey:"')
    assert not offending('event("graylist.defer")  # GRAYLIST')


def test_no_other_spelling_is_left() -> None:
    scanned = files()
    assert any(p.name == "graylist.py" for p in scanned)    # the scan reaches the modules
    bad = [f"{p.relative_to(ROOT)}:{n}: {line.strip()}"
           for p in scanned
           for n, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1)
           if offending(line)]
    assert bad == []


def test_no_file_is_named_the_other_way() -> None:
    names = [str(p.relative_to(ROOT)) for name in SCANNED if (ROOT / name).is_dir()
             for p in (ROOT / name).rglob("*") if "__pycache__" not in p.parts and "grey" in p.name.lower()]
    assert names == []
