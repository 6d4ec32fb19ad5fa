"""Where a sweep's Optuna studies live: a journal file by default, PostgreSQL or Redis to share.

The default is Optuna's ``JournalStorage`` on ``<out>/optuna.journal`` (file locks make it safe for
several processes on one machine, not over NFS). ``--storage postgresql://...`` gives an
``RDBStorage`` with heartbeats, so trials of a worker that vanished on another machine are failed
and retried; ``--storage redis://...`` a journal on a Redis server. Every URL is checked before any
work starts: an unreachable one is a one-line :class:`~msam.errors.UserError`. Passwords never
reach a message (:func:`mask_url`).

A record cut short (a writer killed mid-append, a full disk) must not cost the journal: Optuna's
file backend would glue the next record onto the torn one and then fail on that line for good.
:class:`JournalFile` starts every append on a fresh line and reads past a damaged line (with one
warning), recovering a complete record glued behind a torn one; :func:`repair_journal` also moves
a torn tail aside when a sweep opens its journal.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import random
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
    "JournalFile",  # noqa: F822 (made on first use: see __getattr__)
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
#: Tries to open a database whose Optuna schema other processes may be creating at the same time.
SCHEMA_ATTEMPTS = 4

_RDB_SCHEMES = ("postgresql", "postgres", "mysql", "sqlite")
_REDIS_SCHEMES = ("redis", "rediss")
# What follows the scheme up to the last "@" is the user and password: SQLAlchemy allows "/" and ":"
# in a password, an unescaped "@" makes the URL malformed (libpq then takes the rest for the host
# and prints it), and hiding too much of a malformed URL is better than showing part of a secret.
_SCHEME = r"[A-Za-z][\w+.-]*://"
_WHOLE_URL = re.compile(rf"^(?P<scheme>{_SCHEME})(?P<auth>.*)@", re.DOTALL)
_URL_IN_TEXT = re.compile(rf"(?<![\w+.-])(?P<scheme>{_SCHEME})(?P<auth>[^\s'\"]*)@")
_QUERY_PASSWORD = re.compile(r"(?<=[?&]password=)[^&#\s'\"]*")  # libpq and redis-py take it too
#: Where a URL's parser splits a piece of a password that holds an "@".
_URL_DELIMITERS = re.compile(r"[/:?#@]")


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


def mask_url(text: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``, for a URL or
    for every URL in a message.

    The secret is whatever follows the user's ``:`` up to the last ``@``; when the user part
    itself holds an ``@`` (``postgresql://u@x:pw@host``, ``postgresql://p@ss@host``) it all is.
    """

    def hide(match: re.Match[str]) -> str:
        return match.group("scheme") + _hide_auth(match.group("auth")) + "@"

    text = _WHOLE_URL.sub(hide, text, count=1)
    return _QUERY_PASSWORD.sub("***", _URL_IN_TEXT.sub(hide, text))


def _hide_auth(auth: str) -> str:
    user, colon, _ = auth.partition(":")
    if "@" in user:
        return "***"
    return f"{user}:***" if colon else auth


def _secret_of(url: str) -> str | None:
    """The part of ``url`` that :func:`mask_url` hides (None when it hides nothing)."""
    match = _WHOLE_URL.match(url)
    if match is None:
        return None
    auth = match.group("auth")
    user, colon, password = auth.partition(":")
    if "@" in user:
        return auth
    return password if colon and password else None


def _secret_pieces(secret: str) -> list[str]:
    """What of a secret holding an ``@`` a parser may print as a host, database or port: the
    part after each ``@`` and the pieces of it between URL delimiters (longest first)."""
    pieces = set()
    for at, char in enumerate(secret):
        if char == "@":
            rest = secret[at + 1 :]
            pieces.add(rest)
            pieces.update(_URL_DELIMITERS.split(rest))
    pieces.discard("")
    return sorted(pieces, key=len, reverse=True)


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
        _check_redis_db(storage)
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


def _check_redis_db(url: str) -> None:
    """redis-py reads ``redis://host/abc`` as database 0 without a word: refuse a database that
    is not a number, so a sweep never writes into another database than the one named."""
    from urllib.parse import parse_qs, urlsplit

    scheme, _, rest = url.partition("://")
    try:  # what follows the last "@": a password (which may hold "/") never reaches a message
        parts = urlsplit(f"{scheme}://{rest.rpartition('@')[2]}")
    except ValueError as exc:
        raise UserError(f"--storage {mask_url(url)}: not a valid URL ({exc})") from None
    given = [parts.path.strip("/")] if parts.path.strip("/") else []
    given += parse_qs(parts.query).get("db", [])
    for db in given:
        if not db.isascii() or not db.isdigit():
            raise UserError(
                f"--storage {mask_url(url)}: the Redis database must be a number "
                f"(got {db!r}); use e.g. redis://host:6379/0"
            )


def open_storage(ref: StorageRef, *, heartbeat_stale_trial_callback: Any = None) -> Any:
    """An Optuna storage for ``ref``, reachable now; otherwise a one-line UserError.

    ``heartbeat_stale_trial_callback`` (RDB only) runs for each trial whose worker stopped beating;
    the engine passes one that re-enqueues the trial's parameters.
    """
    import optuna

    if ref.kind == "journal":
        path = Path(ref.arg)
        _check_journal_path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            repair_journal(path)
            backend = _journal_file_class()(str(path))
        except OSError as exc:
            raise UserError(f"--storage {path}: cannot open the journal file ({exc})") from None
        return optuna.storages.JournalStorage(backend)
    if ref.kind == "redis":
        return _open_redis(ref)
    return _open_rdb(ref, heartbeat_stale_trial_callback)


#: Bytes read from a journal's end to look for a torn last record (records are far smaller).
_TAIL_BYTES = 1 << 20


#: Where a journal record starts: Optuna writes ``{"op_code":...`` first in every record.
_RECORD_START = b'{"op_code"'
_DECODER = json.JSONDecoder()


def _records(line: bytes) -> tuple[list[dict[str, Any]], bool]:
    """The complete journal records on one line, and whether the line is exactly one record.

    A line is one record as Optuna writes it; a torn record gives none; a torn prefix followed
    by a whole record (glued on by a writer that did not end the torn line) gives that record
    back, and so does every record that lost its newline.
    """
    try:
        record = json.loads(line)
    except ValueError:
        return _salvage(line), False
    if isinstance(record, dict) and "op_code" in record:
        return [record], True
    return [], False


def _salvage(line: bytes) -> list[dict[str, Any]]:
    """Every whole record on a damaged line, tried from each place a record may start."""
    text = line.decode("utf-8", errors="replace")
    start = _RECORD_START.decode()
    found: list[dict[str, Any]] = []
    at = 0 if text.startswith("{") else text.find(start)
    while at >= 0:
        try:
            record, end = _DECODER.raw_decode(text, at)
        except ValueError:
            at = text.find(start, at + 1)
            continue
        if isinstance(record, dict) and "op_code" in record:
            found.append(record)
            at = text.find(start, end)
        else:
            at = text.find(start, at + 1)
    return found


def _is_record(line: bytes) -> bool:
    return bool(_records(line)[0])


def __getattr__(name: str) -> Any:
    # JournalFile subclasses an Optuna class: built on first use, so that importing this module
    # (every ``msam`` command does) needs no optuna, as on the GPU image.
    if name == "JournalFile":
        return _journal_file_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


#: Damaged journal lines already warned about in this process: (journal path, byte offset).
_WARNED: set[tuple[str, int]] = set()


@functools.cache
def _journal_file_class() -> type:
    from optuna.storages.journal import JournalFileBackend

    class JournalFile(JournalFileBackend):
        """Optuna's journal file backend, safe against a torn record anywhere in the file.

        ``append_logs`` (under the journal lock) first ends a line left unterminated by a writer
        that died mid-append, so a torn record never swallows the next one. ``read_logs`` skips
        a damaged line with one warning, keeps the complete records on it (:func:`_records`),
        and leaves an unterminated last line, which a live writer may still be writing, for the
        next read.

        Optuna's ``JournalStorage`` counts the records it is given and asks for the next one by
        that number, so a damaged line counts for nothing: record ``n`` is the ``n``-th complete
        record from the file's start, whoever reads it and from wherever. A read resumes just
        after the last line that gave a record, never after a damaged one, so cutting a torn
        tail off (:func:`repair_journal`) moves nobody's place.
        """

        def __init__(self, file_path: str, lock_obj: Any = None) -> None:
            super().__init__(file_path, lock_obj)
            #: record number -> (offset of the line holding it, records before it on that line)
            self._starts: dict[int, tuple[int, int]] = {0: (0, 0)}

        def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
            number = log_number_from  # Optuna asks for the record after the last one it read
            if number not in self._starts:
                number = max(n for n in self._starts if n <= log_number_from)
            offset, skip = self._starts[number]
            with open(self._file_path, "rb") as fh:
                size = os.fstat(fh.fileno()).st_size  # what is appended after this waits
                fh.seek(offset)
                while offset < size:
                    line = fh.readline()
                    end = offset + len(line)
                    if not line.endswith(b"\n") or end > size:
                        return  # still being written, or torn: the next read looks again
                    records, whole = _records(line)
                    if not whole:
                        self._warn(offset, line, len(records))
                    for index in range(skip, len(records)):
                        last = index == len(records) - 1
                        self._starts.setdefault(
                            number + 1, (end, 0) if last else (offset, index + 1)
                        )
                        if number >= log_number_from:
                            yield records[index]
                        number += 1
                    offset, skip = end, 0

        def append_logs(self, logs: list[dict[str, Any]]) -> None:
            data = "".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs)
            self._lock.acquire()
            try:
                with open(self._file_path, "a+b") as fh:
                    head = b""
                    if fh.seek(0, os.SEEK_END) > 0:
                        fh.seek(-1, os.SEEK_END)
                        if fh.read(1) != b"\n":  # a writer died mid-record: end its line
                            head = b"\n"
                    fh.write(head + data.encode("utf-8"))
                    fh.flush()
                    os.fsync(fh.fileno())
            finally:
                self._lock.release()

        def _warn(self, offset: int, line: bytes, kept: int) -> None:
            key = (os.path.realpath(self._file_path), offset)
            if key in _WARNED or not line.strip():
                return
            _WARNED.add(key)  # once per damaged line and process, however many readers
            what = (
                f"recovered the {kept} complete record(s) glued onto it"
                if kept
                else "skipped it, every complete record is kept"
            )
            warnings.warn(
                f"{self._file_path}: a torn record at byte {offset} (a writer stopped mid-write); "
                + what,
                RuntimeWarning,
                stacklevel=3,
            )

    JournalFile.__module__, JournalFile.__qualname__ = __name__, "JournalFile"  # for pickle
    return JournalFile


def _check_journal_path(path: Path) -> None:
    """Refuse a journal path that is a folder or a file of something else: the tolerant reader
    would skip its lines and the sweep would append records to it."""
    if path.is_dir():
        raise UserError(
            f"--storage {path}: is a folder, not a journal file; name a file such as "
            f"{path / JOURNAL_FILE}"
        )
    try:
        with open(path, "rb") as fh:
            head = fh.read(_TAIL_BYTES)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise UserError(f"--storage {path}: cannot open the journal file ({exc})") from None
    start = head.lstrip(b" \t\r\n\x00")
    if start and _RECORD_START not in head and not _RECORD_START.startswith(start):
        raise UserError(
            f"--storage {path}: exists and is not an Optuna journal (no journal record in it); "
            "name a new file or the sweep's optuna.journal"
        )


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
    attempt = 1
    try:
        while True:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return optuna.storages.RDBStorage(
                        _with_driver(ref.arg), engine_kwargs=engine_kwargs, **heartbeat_kwargs
                    )
            except Exception as exc:
                if attempt == SCHEMA_ATTEMPTS or not _lost_schema_race(exc):
                    raise
            # Another process is creating Optuna's tables in this fresh database at this very
            # moment; once it has, opening finds them and creates nothing.
            time.sleep(0.2 * attempt + random.random() * 0.2)
            attempt += 1
    except ImportError as exc:
        raise UserError(
            f"--storage {ref.shown}: a database driver is missing ({_one_line(exc, ref)})"
        ) from None
    except Exception as exc:  # SQLAlchemy wraps every connection problem differently
        raise UserError(
            f"--storage {ref.shown}: cannot reach the database ({_one_line(exc, ref)})"
        ) from None


def _lost_schema_race(exc: BaseException) -> bool:
    """Whether opening failed because another process created the same table, type or row of
    Optuna's schema first (PostgreSQL: unique_violation, duplicate_table, duplicate_object)."""
    from sqlalchemy.exc import DBAPIError, IntegrityError

    if isinstance(exc, IntegrityError):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    orig = exc.orig
    code = getattr(orig, "pgcode", None) or getattr(orig, "sqlstate", None)  # psycopg2 / 3
    return code in ("23505", "42P07", "42710") or "already exists" in str(orig)


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
    line = " ".join((text[0] if text else type(exc).__name__).split())
    secret = _secret_of(ref.arg)
    if secret:
        line = line.replace(secret, "***")
        for piece in _secret_pieces(secret):  # a whole word of the message, not a part of one
            line = re.sub(rf"(?<![\w%.+-]){re.escape(piece)}(?![\w%.+-])", "***", line)
    return mask_url(line)


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
