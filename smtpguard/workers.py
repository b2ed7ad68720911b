"""Several processes on the same addresses: `server.workers = N`.

Decides: when a worker is started, restarted or given up on, and which
config a worker runs.
Inputs: the config loaded at start, the command-line flags, the signals
SIGTERM, SIGINT and SIGHUP sent to the supervisor.
Output: N worker processes, each a whole smtpguard (listeners with
SO_REUSEPORT, its own upstream pool, resolver cache and store connection);
the kernel spreads connections across them. The supervisor's exit code.
Failure modes: a worker of the first generation that exits by itself
within EARLY_EXIT cannot run at all (a port taken, say): the supervisor stops the
others and exits with its code. A worker that dies later is restarted, as
Postfix's master does with its services, with the latest config that
loaded (a SIGHUP re-reads the file in the supervisor too; a broken file
keeps the previous one); a restarted worker that exits early is restarted
again after a growing pause, never taken for "cannot run". A fresh worker
holds SIGHUP until its loop handles it, so a reload sent while it starts is
applied once it listens, never fatal. Workers die with the supervisor
(PR_SET_PDEATHSIG on Linux): a SIGKILLed supervisor leaves no worker
serving an old config.
Defaults and why: EARLY_EXIT 5 s (start-up with the whole world's zones
takes a few seconds; an exit before that is a start-up failure);
RESTART_PAUSE 1 s doubling to 30 s (a crash loop must not spin).
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys
import time
from typing import Any

from smtpguard.config import Config, load
from smtpguard.errors import ConfigError
from smtpguard.observe import log

# A worker of the first generation that exits within this many seconds of
# its start is not restarted: it would fail the same way again.
EARLY_EXIT = 5.0
# Restarts are spaced by at least this much, doubled while restarted
# workers keep exiting early, up to MAX_RESTART_PAUSE.
RESTART_PAUSE = 1.0
MAX_RESTART_PAUSE = 30.0
# prctl(2) option: the signal a process receives when its parent dies.
PR_SET_PDEATHSIG = 1

# A SIGHUP received by a worker before its event loop handles signals.
_pending_hup = False


def _note_hup(_signum: int, _frame: Any) -> None:
    global _pending_hup
    _pending_hup = True


def serve_one(config: Config, flags: dict[str, Any], services: Any = None, *, worker: bool = False) -> int:
    """One process serving until SIGTERM/SIGINT: the exit code.

    `worker`: one of our own workers, which shares its listening sockets with
    its siblings (server.py probes the addresses only in a lone process or
    in the supervisor)."""
    from smtpguard.services import build_services

    try:
        if services is None:
            services = build_services(config, flags)
        services.own_workers = worker
        asyncio.run(_serve(config, services))
    except OSError as e:
        # e.g. the port needs privileges: one line, not a traceback
        log.event("listen.error", 40, error=str(e))
        print(f"smtpguard: cannot listen: {e}", file=sys.stderr)
        return 1
    return 0


async def _serve(config: Config, services: Any) -> None:
    from smtpguard.server import serve

    loop = asyncio.get_running_loop()
    ready: asyncio.Future[Any] = loop.create_future()
    task = loop.create_task(serve(config, services, ready))
    await asyncio.wait({task, ready}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done() and not task.done():
        from smtpguard.services import startup_warnings

        # Issue 11 item 7 (e.g. a banner saying `vm`): once listening, so that
        # a config error stays the one line it is.
        for name, note in startup_warnings(services.config):
            log.event(name, 30, note=note)
    global _pending_hup
    if ready.done() and not task.done() and _pending_hup:
        # a reload asked for while this worker started: its handler is in place now
        _pending_hup = False
        os.kill(os.getpid(), signal.SIGHUP)
    await task


def _die_with_parent(parent: int) -> None:
    """The worker gets SIGTERM (a graceful stop) when the supervisor dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the workers outlive a killed supervisor
        pass
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(0)


def supervise(config: Config, flags: dict[str, Any]) -> int:
    children: dict[int, tuple[float, bool]] = {}  # pid -> (start time, restarted)
    stopping = False
    latest = config  # the latest config that loaded: restarted workers run it
    pause = RESTART_PAUSE
    me = os.getpid()

    def spawn(restarted: bool) -> None:
        # SIGHUP is held across the fork: the child installs its own handler
        # before it can receive one.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            pid = os.fork()
            if pid == 0:  # the worker
                code = 1
                try:
                    for sig in (signal.SIGTERM, signal.SIGINT):
                        signal.signal(sig, signal.SIG_DFL)
                    signal.signal(signal.SIGHUP, _note_hup)
                    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
                    _die_with_parent(me)
                    code = serve_one(latest, flags, worker=True)
                except BaseException:  # never return into the supervisor's loop
                    log.event("worker.crashed", 50, exc_info=True, pid=os.getpid())
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
        finally:
            if os.getpid() == me:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        children[pid] = (time.monotonic(), restarted)
        log.event("worker.started", pid=pid, restarted=restarted)

    def forward(signum: int, _frame: Any) -> None:
        nonlocal stopping, latest
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        elif signum == signal.SIGHUP and latest.path:
            try:
                latest = load(latest.path, flags)
            except ConfigError as e:
                log.event("reload.failed", 40, pid=me, error=str(e), note="workers restarted later keep the previous config")
            else:
                log.setup(latest.log.format, latest.log.level)
        for pid in list(children):
            try:
                os.kill(pid, signal.SIGTERM if signum == signal.SIGINT else signum)
            except ProcessLookupError:
                pass

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for _ in range(config.server.workers):
        spawn(False)

    status = 0
    while children:
        try:
            pid, raw = os.wait()
        except ChildProcessError:
            break
        entry = children.pop(pid, None)
        if entry is None:
            continue
        started, restarted = entry
        code = os.waitstatus_to_exitcode(raw)
        if stopping:
            continue
        log.event("worker.exited", 40, pid=pid, code=code)
        early = time.monotonic() - started < EARLY_EXIT
        if early and not restarted and code >= 0:
            # A worker of the first generation that exited on its own cannot run
            # (one killed by a signal did not fail): stop the others, report it.
            status = code or 1
            forward(signal.SIGTERM, None)
            continue
        pause = min(pause * 2, MAX_RESTART_PAUSE) if early else RESTART_PAUSE
        time.sleep(pause)  # a pause between restarts, not synchronisation
        if not stopping:
            spawn(True)
    return status
