"""Worker processes of one machine: one per CPU slot or per GPU slot, each its own ``msam worker``.

A worker is ``python -m sweeps.cli worker <out>/spec.yaml --out ... --worker-index k`` with
``CUDA_VISIBLE_DEVICES`` set to its GPU, so the launcher and a worker started by hand on another
machine run the same code. The storage travels in ``MSAM_STORAGE``, not on the command line: a
process's command line is readable by every user of the machine (``/proc/<pid>/cmdline``), and a
database URL may hold a password. Output goes to ``<out>/logs/worker-<k>.log``; the launcher's
terminal shows the live view. Ctrl-C or SIGTERM reach every worker, which fail their running
trials as ``interrupted`` and exit; a worker that does not within ``STOP_TIMEOUT_S`` is killed.

A worker whose trial was timed out (it made no progress: stopped with SIGSTOP, or hung) would keep
the launcher waiting for ever. Once every other worker has ended, the pool stops it (SIGTERM and
SIGCONT, so a stopped one can finish its W&B run; SIGKILL after ``HUNG_STOP_S``) and says so in
:attr:`WorkerPool.stopped_hung`. Its trial was already failed and redone: nothing is lost.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sweeps.layout import RunFolder
from sweeps.run import Slot

__all__ = ["STORAGE_ENV", "WorkerPool", "worker_threads"]

#: Seconds workers get to fail their trials and finish their W&B runs after a stop signal.
STOP_TIMEOUT_S = 60
#: Seconds between the watchdog's looks at the studies while the pool waits.
WATCH_S = 5.0
#: Seconds a hung worker gets to end after SIGTERM before it is killed.
HUNG_STOP_S = 10.0
#: Environment variable giving a spawned worker its torch CPU thread count.
THREADS_ENV = "MSAM_WORKER_THREADS"
#: Environment variable giving ``msam sweep`` and ``msam worker`` their storage when
#: ``--storage`` is absent (a password in it stays out of the process list).
STORAGE_ENV = "MSAM_STORAGE"


def worker_threads() -> int:
    """torch CPU threads per worker: ``MSAM_WORKER_THREADS``, else 1.

    Parallelism comes from workers: small models gain little from intra-op threads, and threads
    of several workers (or of other jobs) competing for the same cores slow training severalfold.
    """
    try:
        return max(1, int(os.environ.get(THREADS_ENV, "1")))
    except ValueError:
        return 1


class WorkerPool:
    """Starts the workers, watches them, and stops them on a signal."""

    def __init__(self, slots: Sequence[Slot], folder: RunFolder, storage_arg: str) -> None:
        self.slots = list(slots)
        self.folder = folder
        self.spec_path = folder.spec
        self.storage_arg = storage_arg
        self.out = folder.root
        self.procs: dict[int, subprocess.Popen] = {}
        self.exit_codes: dict[int, int] = {}
        #: Workers stopped because they hung, by index: which trial of theirs timed out.
        self.stopped_hung: dict[int, str] = {}
        self._hung: dict[int, str] = {}
        self._hung_stop_sent: dict[int, float] = {}
        self._stop_sent: float | None = None

    def log_path(self, slot: Slot) -> Path:
        return self.folder.worker_log(slot.index)

    def start(self) -> None:
        threads = worker_threads()
        self.folder.logs.mkdir(parents=True, exist_ok=True)
        for slot in self.slots:
            if self._stop_sent is not None:  # stopped while starting: start no more
                break
            env = dict(
                os.environ,
                PYTHONUNBUFFERED="1",
                **{THREADS_ENV: str(threads), STORAGE_ENV: self.storage_arg},
            )
            if slot.gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = str(slot.gpu)
            command = [
                sys.executable,
                "-m",
                "sweeps.cli",
                "worker",
                str(self.spec_path),
                "--out",
                str(self.out),
                "--worker-index",
                str(slot.index),
            ]
            with open(self.log_path(slot), "ab") as log:
                self.procs[slot.index] = subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
                )

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs.values()]

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Ask every running worker to stop (they fail their trials as interrupted)."""
        if self._stop_sent is None:
            self._stop_sent = time.monotonic()
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)

    def wait(
        self,
        tick: Callable[[], Any],
        poll_s: float = 0.5,
        watch: Callable[[], Mapping[int, str]] | None = None,
    ) -> dict[int, int]:
        """Wait for every worker, calling ``tick`` between looks; their exit codes by index.

        ``watch`` (every :data:`WATCH_S` seconds) reaps the studies' trials and returns the
        workers that hang, ``{pid: which trial timed out}``; those are stopped once every other
        worker has ended (:meth:`_stop_hung`).
        """
        next_watch = time.monotonic()
        while True:
            for index, proc in self.procs.items():
                code = proc.poll()
                if code is not None and index not in self.exit_codes:
                    self.exit_codes[index] = code
            if len(self.exit_codes) == len(self.procs):
                return self.exit_codes
            if self._stop_sent is not None and time.monotonic() - self._stop_sent > STOP_TIMEOUT_S:
                for proc in self.procs.values():
                    if proc.poll() is None:
                        proc.kill()
            if watch is not None and time.monotonic() >= next_watch:
                next_watch = time.monotonic() + WATCH_S
                try:
                    by_pid = watch()
                except Exception:  # the storage is away a while: the workers carry on, look later
                    by_pid = None
                if by_pid is not None:
                    index_of = {proc.pid: index for index, proc in self.procs.items()}
                    self._hung = {index_of[p]: why for p, why in by_pid.items() if p in index_of}
            self._stop_hung()
            tick()
            time.sleep(poll_s)

    def _stop_hung(self) -> None:
        """Stop the hung workers once every worker still running hangs (the others have ended,
        so nothing is left for them to do): SIGTERM and SIGCONT, SIGKILL after HUNG_STOP_S."""
        running = [i for i in self.procs if i not in self.exit_codes]
        stopping = self._hung_stop_sent
        if not running or any(i not in self._hung and i not in stopping for i in running):
            return
        now = time.monotonic()
        for index in running:
            proc = self.procs[index]
            if index not in stopping:
                stopping[index] = now
                self.stopped_hung[index] = self._hung[index]
                for signum in (signal.SIGTERM, signal.SIGCONT):
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(signum)
            elif now - stopping[index] > HUNG_STOP_S and proc.poll() is None:
                proc.kill()
