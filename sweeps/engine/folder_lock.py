"""One launcher per run folder: ``msam sweep`` holds ``<out>/.launcher.lock`` while it runs.

Two launchers on one folder would both run every final, in the same folders at the same time.
The lock is an ``flock`` on the file, so the kernel drops it when its process dies however it
dies (a stale lock of a dead launcher is simply taken); the file says who holds it, for the
message the second launcher exits with. ``msam worker`` processes do not take it: they may join
a running sweep at any time. (``flock`` is local to one machine and not reliable over NFS: two
launchers of one folder on two machines are not told apart, as the README says.)
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import os
import socket
from collections.abc import Iterator

from msam.errors import UserError
from sweeps.layout import RunFolder

__all__ = ["launcher_lock"]


def _holder(path: os.PathLike[str]) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            who = json.loads(fh.read() or "{}")
        return f"pid {who['pid']} on {who['host']}, since {who['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


@contextlib.contextmanager
def launcher_lock(folder: RunFolder) -> Iterator[None]:
    """Hold the run folder for this launcher; a UserError (exit 2) if another one holds it."""
    path = folder.launcher_lock
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(
                f"{folder.root}: another msam sweep runs on this run folder ({_holder(path)}); "
                f"wait for it, or add workers with `msam worker {folder.spec}` and its --storage"
            ) from None
        since = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        who = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(who) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the lock
