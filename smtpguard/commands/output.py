"""Where a command's output goes: `--out FILE`, or standard output."""

from __future__ import annotations

import sys

from smtpguard.errors import ConfigError


def write_output(body: str, out: str | None, encoding: str = "utf-8") -> None:
    """Write `body` to the file named by `--out`, or to standard output; an
    unwritable file is a ConfigError naming `--out` (one line, exit 2)."""
    if out:
        try:
            with open(out, "w", encoding=encoding) as f:
                f.write(body)
        except OSError as e:
            raise ConfigError("--out", f"cannot write {out}: {e.strerror}") from None
    else:
        sys.stdout.write(body)
        sys.stdout.flush()
