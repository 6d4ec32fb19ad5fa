"""The files a training run writes, and how: each replaced atomically, so a run killed mid-write
leaves the previous version (or none), never half a file that a resume or a reader would trip on.

A full disk is no exception: a write refused for want of space (ENOSPC, or a quota) removes its
temporary file or cuts an appended line back, and raises :class:`DiskFullError`, which the command
line reports in one line with exit status 2, like any error only the user can fix.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from msam.errors import UserError

__all__ = [
    "CHECKPOINT",
    "DISK_FULL",
    "ERROR",
    "METRICS",
    "SUMMARY",
    "DiskFullError",
    "append_text",
    "atomic_write",
    "disk_full_as_error",
    "is_disk_full",
    "read_json",
    "write_json",
]

#: Names inside a training run's folder (``msam train --out DIR``, a trial's, a final's).
CHECKPOINT = "checkpoint.pt"  # model, optimizer, scheduler and RNG state after the last epoch
METRICS = "metrics.jsonl"  # one JSON object per epoch
SUMMARY = "summary.json"  # the outcome: status, val/test accuracy, cost, versions
ERROR = "error.txt"  # the traceback of a run that raised

#: The reason recorded for a run that failed because its disk was full.
DISK_FULL = "disk full"

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class DiskFullError(UserError, OSError):
    """No space left on the device for a run's file. An OSError (``errno`` ENOSPC) for code that
    handles failed writes, and a UserError for the command line: one line, exit status 2."""

    def __init__(self, path: str | os.PathLike[str], detail: str = "") -> None:
        super().__init__(
            f"{DISK_FULL}: no space left on the device for {os.fspath(path)}{detail}; "
            "free some space, then rerun to resume"
        )
        self.errno = errno.ENOSPC
        self.filename = os.fspath(path)

    def __str__(self) -> str:  # the message alone, not OSError's "[Errno 28] ..." form
        return str(self.args[0])


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a write refused for want of space (ENOSPC, or a disk quota)."""
    return isinstance(exc, OSError) and exc.errno in _NO_SPACE


@contextlib.contextmanager
def disk_full_as_error(path: str | os.PathLike[str] | None = None) -> Iterator[None]:
    """Raise a write refused for want of space in this block as :class:`DiskFullError`, naming
    ``path`` (by default the file the write was refused for)."""
    try:
        yield
    except OSError as exc:
        if not is_disk_full(exc) or isinstance(exc, DiskFullError):
            raise
        raise DiskFullError(path if path is not None else exc.filename or "a file") from exc


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and ``os.replace``.

    A write that fails (a full disk, an interruption) removes the temporary file and leaves
    ``path`` as it was; a full disk raises :class:`DiskFullError`.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with disk_full_as_error(path):
            if isinstance(data, bytes):
                tmp.write_bytes(data)
            else:
                tmp.write_text(data, encoding="utf-8")
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return path


def append_text(path: str | os.PathLike[str], text: str) -> Path:
    """Append ``text`` (whole lines) to ``path``; a write that fails cuts the file back to where
    it was, so a full disk never leaves half a line for readers to trip on."""
    path = Path(path)
    data = text.encode("utf-8")
    with disk_full_as_error(path), open(path, "ab", buffering=0) as fh:
        start = fh.seek(0, os.SEEK_END)
        try:
            done = 0
            while done < len(data):
                done += fh.write(data[done:])
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fh.fileno(), start)
            raise
    return path


def write_json(path: str | os.PathLike[str], data: Mapping[str, Any]) -> Path:
    """``data`` as indented JSON, atomically."""
    return atomic_write(path, json.dumps(data, indent=2) + "\n")


def read_json(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """A JSON object, or None when missing or unreadable (a run killed mid-write)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
