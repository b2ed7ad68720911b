"""Structured, greppable logs: one line per decision, one summary per connection.

Every line has a fixed event name (`connect`, `reject`, `graylist.defer`,
`relay.accepted`, `close`, ...) and the session id; `--log-format json`
gives one JSON object per line. Client-supplied strings are truncated and
escaped before they are logged (STYLE.md §8), so a client can neither forge
a log line nor flood the log.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, Callable, TextIO

LOGGER = logging.getLogger("smtpguard")
# A client-supplied value longer than this is cut: HELO names and addresses
# are at most 255 and 256 octets (RFC 5321 §4.5.3.1), so anything longer is
# an attack on the log.
MAX_VALUE = 256

_UNSAFE = re.compile(r"[\x00-\x1f\x7f\"\\]")


def _escaped(m: "re.Match[str]") -> str:
    c = m.group()
    return "\\" + c if c in "\"\\" else "\\x%02x" % ord(c)


def escape(value: str, limit: int = MAX_VALUE) -> str:
    """Control characters as \\xNN, quotes as \\" and backslashes as \\\\ (as
    in a quoted string: readable, and no two values escape alike); bounded length."""
    if len(value) > limit:
        value = value[:limit] + "…"
    return _UNSAFE.sub(_escaped, value)


# Libraries whose log lines go through our formatters too: their messages
# carry client bytes (aiosmtpd logs unrecognised commands as received).
LIBRARY_LOGGERS = ("mail.log", "asyncio", "aiosmtplib", "aiosmtpd")


def _event_and_fields(record: logging.LogRecord) -> tuple[str, dict[str, Any]]:
    """Our records carry `fields`; a library's record is one escaped `message` field."""
    fields = getattr(record, "fields", None)
    if fields is None:
        return record.name, {"message": record.getMessage()}
    return record.getMessage(), fields


_STAMP: list[Any] = [None, ""]   # the second and its UTC time stamp


def _stamp(created: float) -> str:
    """`2026-11-29T20:30:00Z`, formatted once per second (a relayed message logs twice)."""
    second = int(created)
    if _STAMP[0] != second:
        _STAMP[0], _STAMP[1] = second, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))
    return str(_STAMP[1])


class TextFormatter(logging.Formatter):
    """`2026-11-29T20:30:00Z info connect session=… ip=… key=value`"""

    def format(self, record: logging.LogRecord) -> str:
        name, fields = _event_and_fields(record)
        parts = [_stamp(record.created), record.levelname.lower(), name]
        for key, value in fields.items():
            if value is None or value == "":
                continue
            text = escape(value) if isinstance(value, str) else escape(str(value))
            if not text or " " in text or "=" in text or '"' in text:
                text = f'"{text}"'
            parts.append(f"{key}={text}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per line; strings bounded but not otherwise changed (JSON escapes them)."""

    def format(self, record: logging.LogRecord) -> str:
        name, fields = _event_and_fields(record)
        obj: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "event": name,
        }
        for key, value in fields.items():
            if isinstance(value, str) and len(value) > MAX_VALUE:
                value = value[:MAX_VALUE] + "…"
            obj[key] = value
        if record.exc_info:
            obj["traceback"] = self.formatException(record.exc_info)
        return json.dumps(obj, default=str, ensure_ascii=False)


def setup(fmt: str = "text", level: str = "info", stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    LOGGER.handlers[:] = [handler]
    LOGGER.setLevel(level.upper())
    LOGGER.propagate = False
    # What no line of ours shows is not gathered for each record: the
    # caller's file and line, the thread, the process (the logging HOWTO's
    # "Optimization" section); a relayed message logs two lines at info.
    logging._srcfile = None  # type: ignore[attr-defined]
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    # aiosmtpd logs every command at INFO under "mail.log": our own lines
    # say what matters, so keep its chatter out unless debugging. Library
    # lines go through the same formatter (escaped, one JSON object per
    # line), never raw to stderr.
    for name in LIBRARY_LOGGERS:
        lib = logging.getLogger(name)
        lib.handlers[:] = [handler]
        lib.propagate = False
    logging.getLogger("mail.log").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


# Subscribers see every event, whatever the log level: observe/metrics.py
# counts from them (issue 12). A subscriber gets the name and the fields,
# never a formatted line; one that raises is logged and the session goes on.
_SUBSCRIBERS: list[Callable[[str, dict[str, Any]], None]] = []


def subscribe(fn: Callable[[str, dict[str, Any]], None]) -> None:
    if fn not in _SUBSCRIBERS:
        _SUBSCRIBERS.append(fn)


def unsubscribe(fn: Callable[[str, dict[str, Any]], None]) -> None:
    if fn in _SUBSCRIBERS:
        _SUBSCRIBERS.remove(fn)


def _notify(name: str, fields: dict[str, Any]) -> None:
    for fn in tuple(_SUBSCRIBERS):
        try:
            fn(name, fields)
        except Exception:  # a counting bug must never reach a client's session
            LOGGER.error("subscriber.error", extra={"fields": {"event": name}}, exc_info=True)


def event(name: str, level: int = logging.INFO, exc_info: bool = False, **fields: Any) -> None:
    """Log one event; cheap when the level is off (and no subscriber listens)."""
    if _SUBSCRIBERS:
        _notify(name, fields)
    if LOGGER.isEnabledFor(level):
        LOGGER.log(level, name, extra={"fields": fields}, exc_info=exc_info)
