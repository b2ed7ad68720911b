"""The log lines' own form: time stamps and what a record carries."""

from __future__ import annotations

import io
import logging
import time

from smtpguard.observe import log


def test_text_lines_carry_the_utc_second_of_their_event() -> None:
    # the stamp is formatted once per second (issue 15); it must stay that second's
    stream = io.StringIO()
    log.setup("text", "info", stream)
    try:
        for created in (1_700_000_000.2, 1_700_000_000.9, 1_700_000_061.0):
            record = logging.LogRecord("smtpguard", logging.INFO, "", 0, "close", None, None)
            record.created = created
            record.fields = {"session": "s1"}   # type: ignore[attr-defined]
            log.LOGGER.handle(record)
    finally:
        log.setup("text", "warning")
    lines = stream.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == [
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) for t in (1_700_000_000, 1_700_000_000, 1_700_000_061)]
    assert lines[0].endswith("info close session=s1")


def test_records_do_not_gather_what_no_line_shows() -> None:
    # the logging HOWTO's optimisations, set by setup: no caller lookup, no thread or process names
    log.setup("text", "info", io.StringIO())
    try:
        assert logging._srcfile is None   # type: ignore[attr-defined]
        assert not (logging.logThreads or logging.logProcesses or logging.logMultiprocessing)
    finally:
        log.setup("text", "warning")
