"""Where a sweep's Optuna studies live: a journal file by default, PostgreSQL or Redis to share.

The default is Optuna's ``JournalStorage`` on ``<out>/optuna.journal`` (file locks make it safe for
several processes on one machine, not over NFS). ``--storage postgresql://...`` gives an
``RDBStorage`` with heartbeats, so trials of a worker that vanished on another machine are failed
and retried; ``--storage redis://...`` a journal on a Redis server. Every URL is checked before any
work starts: an unreachable one is a one-line :class:`~msam.errors.UserError`. Passwords never
reach a message (:func:`mask_url`).

A journal whose last line was cut short (a writer killed mid-write, a full disk) reads fine in
Optuna, but the next append would glue a new record onto the torn one and make the whole journal
unreadable; :func:`repair_journal` moves a torn tail aside before anyone writes.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from msam.errors import UserError
from sweeps.layout import JOURNAL_FILE, RunFolder

__all__ = [
    "HEARTBEAT_GRACE_S",
    "HEARTBEAT_INTERVAL_S",
    "JOURNAL_FILE",
    "StorageRef",
    "heartbeat",
    "mask_url",
    "open_storage",
    "repair_journal",
    "resolve_storage",
]

#: Seconds between a running trial's heartbeats in an RDB storage.
HEARTBEAT_INTERVAL_S = 20
#: Seconds without a heartbeat after which another worker fails the trial and retries it.
HEARTBEAT_GRACE_S = 120
#: Seconds to wait for a database or Redis server before calling it unreachable.
CONNECT_TIMEOUT_S = 10

_RDB_SCHEMES = ("postgresql", "postgres", "mysql", "sqlite")
_REDIS_SCHEMES = ("redis", "rediss")
# The password runs to the last "@": SQLAlchemy allows "/" and ":" in it, and hiding too much of a
# malformed URL is better than showing part of a secret.
_PASSWORD = re.compile(r"^(?P<head>[A-Za-z][\w+.-]*://[^/:@]*:)(?P<password>.*)(?=@)")
_QUERY_PASSWORD = re.compile(r"(?<=[?&]password=)[^&#]*")  # libpq and redis-py accept this too


class StorageRef:
    """A storage as the user named it: ``kind`` journal | rdb | redis, plus how to reopen it.

    ``arg`` is what a worker process receives as ``--storage`` (a URL or the journal's path).
    """

    def __init__(self, kind: str, arg: str) -> None:
        self.kind = kind
        self.arg = arg

    @property
    def shown(self) -> str:
        """The storage for messages and logs, password masked."""
        return mask_url(self.arg)

    def __repr__(self) -> str:
        return f"StorageRef({self.kind!r}, {self.shown!r})"


def mask_url(url: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``."""
    return _QUERY_PASSWORD.sub("***", _PASSWORD.sub(lambda m: m.group("head") + "***", url))


def _scheme(text: str) -> str | None:
    match = re.match(r"^([A-Za-z][\w+.-]*)://", text)
    return match.group(1).split("+")[0].lower() if match else None


def resolve_storage(storage: str | None, out: Path) -> StorageRef:
    """Name the storage of a sweep: ``None`` is ``<out>/optuna.journal``; a URL or a path."""
    if not storage:
        return StorageRef("journal", str(RunFolder(out).journal))
    scheme = _scheme(storage)
    if scheme is None:
        return StorageRef("journal", str(Path(storage)))
    if scheme in _REDIS_SCHEMES:
        return StorageRef("redis", storage)
    if scheme in _RDB_SCHEMES:
        if scheme == "postgres":  # SQLAlchemy only knows the long name
            storage = "postgresql" + storage[len("postgres") :]
        return StorageRef("rdb", storage)
    if scheme == "file":
        return StorageRef("journal", storage[len("file://") :])
    raise UserError(
        f"--storage {mask_url(storage)}: unknown scheme '{scheme}://'; use a journal file path, "
        "postgresql://..., or redis://..."
    )


def open_storage(ref: StorageRef, *, heartbeat_stale_trial_callback: Any = None) -> Any:
    """An Optuna storage for ``ref``, reachable now; otherwise a one-line UserError.

    ``heartbeat_stale_trial_callback`` (RDB only) runs for each trial whose worker stopped beating;
    the engine passes one that re-enqueues the trial's parameters.
    """
    import optuna

    if ref.kind == "journal":
        from optuna.storages.journal import JournalFileBackend

        path = Path(ref.arg)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            repair_journal(path)
            backend = JournalFileBackend(str(path))
        except OSError as exc:
            raise UserError(f"--storage {path}: cannot open the journal file ({exc})") from None
        return optuna.storages.JournalStorage(backend)
    if ref.kind == "redis":
        return _open_redis(ref)
    return _open_rdb(ref, heartbeat_stale_trial_callback)


#: Bytes read from a journal's end to look for a torn last record (records are far smaller).
_TAIL_BYTES = 1 << 20


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def repair_journal(path: Path) -> int:
    """Cut a torn tail off a journal file; returns the bytes moved aside (0 when it was whole).

    Runs under the journal's own lock, so no live writer is mid-append. A tail is torn when it
    does not end in a newline or its last line is not a JSON record. The bytes removed are kept
    next to the journal (``optuna.journal.torn-<time>``); every complete record stays.
    """
    from optuna.storages.journal import JournalFileSymlinkLock

    if not path.is_file() or path.stat().st_size == 0:
        return 0
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()
    try:
        size = path.stat().st_size
        start = max(0, size - _TAIL_BYTES)
        with open(path, "rb") as fh:
            fh.seek(start)
            tail = fh.read()
        keep = len(tail)
        while keep > 0:
            body = tail[:keep]
            if not body.endswith(b"\n"):
                cut = body.rfind(b"\n") + 1  # drop the unterminated piece
            else:
                last = body.rfind(b"\n", 0, len(body) - 1) + 1
                if last == 0 and start > 0:
                    break  # the line starts before the tail read: too long to be torn
                if _is_record(body[last:]):
                    break
                cut = last  # a terminated line that is not a record: torn as well
            keep = cut
        torn = len(tail) - keep
        if torn == 0:
            return 0
        aside = path.with_name(f"{path.name}.torn-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        aside.write_bytes(tail[keep:])
        with open(path, "r+b") as fh:
            fh.truncate(start + keep)
            fh.flush()
            os.fsync(fh.fileno())
    finally:
        lock.release()
    warnings.warn(
        f"{path}: its last {torn} bytes were a torn record (a writer stopped mid-write); moved "
        f"them to {aside.name}, every complete record is kept",
        RuntimeWarning,
        stacklevel=2,
    )
    return torn


def _open_redis(ref: StorageRef) -> Any:
    import optuna
    from optuna.storages.journal import JournalRedisBackend

    try:
        import redis
    except ImportError:
        raise UserError(
            "--storage redis://... needs the redis package (pip install redis)"
        ) from None
    try:
        client = redis.Redis.from_url(ref.arg, socket_connect_timeout=CONNECT_TIMEOUT_S)
        client.ping()
        client.close()
    except (redis.RedisError, ValueError, OSError) as exc:
        raise UserError(
            f"--storage {ref.shown}: cannot reach Redis ({_one_line(exc, ref)})"
        ) from None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.JournalStorage(JournalRedisBackend(ref.arg))


def _open_rdb(ref: StorageRef, stale_callback: Any) -> Any:
    import optuna

    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if ref.arg.startswith("postgresql"):
        engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    heartbeat_kwargs: dict[str, Any] = {}
    if not ref.arg.startswith("sqlite"):
        heartbeat_kwargs = dict(
            heartbeat_interval=HEARTBEAT_INTERVAL_S,
            grace_period=HEARTBEAT_GRACE_S,
            heartbeat_stale_trial_callback=stale_callback,
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                _with_driver(ref.arg), engine_kwargs=engine_kwargs, **heartbeat_kwargs
            )
    except ImportError as exc:
        raise UserError(
            f"--storage {ref.shown}: a database driver is missing ({_one_line(exc, ref)})"
        ) from None
    except Exception as exc:  # SQLAlchemy wraps every connection problem differently
        raise UserError(
            f"--storage {ref.shown}: cannot reach the database ({_one_line(exc, ref)})"
        ) from None


def _with_driver(url: str) -> str:
    """``postgresql://`` with the PostgreSQL driver that is installed.

    SQLAlchemy 2.1 reads a bare ``postgresql://`` as psycopg 3; psycopg2 is the common one.
    """
    if not url.startswith("postgresql://"):
        return url
    for module, driver in (("psycopg", "psycopg"), ("psycopg2", "psycopg2")):
        if importlib.util.find_spec(module) is not None:
            return f"postgresql+{driver}://" + url[len("postgresql://") :]
    return url


def _one_line(exc: BaseException, ref: StorageRef) -> str:
    """The first line of an error, without SQLAlchemy's background link and without passwords."""
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    password = _PASSWORD.match(ref.arg)
    if password and password.group("password"):
        line = line.replace(password.group("password"), "***")
    return mask_url(" ".join(line.split()))


@contextlib.contextmanager
def heartbeat(storage: Any, trial_id: int) -> Iterator[None]:
    """Beat for a running trial while the block runs (RDB storages; a no-op for journals).

    Optuna beats only inside ``study.optimize``; the engine uses ask/tell, so it beats itself.
    """
    interval = getattr(storage, "get_heartbeat_interval", lambda: None)()
    if interval is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a missed beat is retried at the next one
                storage.record_heartbeat(trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)
