"""Several processes on the same addresses: `server.workers = N`.

Each worker is a whole smtpguard (listeners with SO_REUSEPORT, its own
upstream pool, resolver cache and store connection); the kernel spreads
connections across them. Nothing else is shared, so a worker is added as a
process is (DESIGN.md, scaling out). The supervisor forwards SIGTERM, SIGINT
and SIGHUP, and restarts a worker that dies, as Postfix's master does with
its services — unless it dies at once, which means it cannot run at all.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from smtpguard.config import Config
from smtpguard.observe import log

# A worker that exits within this many seconds of its start is not
# restarted: it would fail the same way again (a port taken, say).
EARLY_EXIT = 5.0
# Restarts are spaced by at least this much: a crash loop must not spin.
RESTART_PAUSE = 1.0


def supervise(config: Config, flags: dict[str, Any]) -> int:
    from smtpguard.commands.serve import serve_one

    children: dict[int, float] = {}  # pid -> start time
    stopping = False

    def spawn() -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_DFL)
            code = 1
            try:
                code = serve_one(config, flags)
            except BaseException:  # never return into the supervisor's loop
                log.event("worker.crashed", 50, exc_info=True, pid=os.getpid())
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        children[pid] = time.monotonic()
        log.event("worker.started", pid=pid)

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for _ in range(config.server.workers):
        spawn()

    status = 0
    while children:
        try:
            pid, raw = os.wait()
        except ChildProcessError:
            break
        started = children.pop(pid, None)
        if started is None:
            continue
        code = os.waitstatus_to_exitcode(raw)
        if stopping:
            continue
        log.event("worker.exited", 40, pid=pid, code=code)
        if time.monotonic() - started < EARLY_EXIT:
            # It cannot run: stop the others and report it.
            status = code or 1
            forward(signal.SIGTERM, None)
            continue
        time.sleep(RESTART_PAUSE)  # a pause between restarts, not synchronisation
        spawn()
    return status
