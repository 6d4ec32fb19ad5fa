"""What an offline W&B run logged, read back from its ``run-<id>.wandb`` file: the tests' way to
check a run's config, history, summary and exit code without W&B's servers (in offline mode the
run's ``files/`` folder lacks config and summary).

The file is W&B's transaction log: a LevelDB-style record log of protobuf ``Record`` messages
(``wandb.proto.wandb_internal_pb2``).
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sweeps.tracking import find_offline_runs

__all__ = ["OfflineRun", "find_offline_runs", "read_offline_run"]


@dataclass
class OfflineRun:
    """What a run logged, read back from its ``.wandb`` file."""

    path: Path
    run_id: str = ""
    project: str = ""
    entity: str = ""
    name: str = ""
    group: str = ""
    job_type: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None


# The .wandb file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of records, each
# with a 7-byte header (crc32c, length, type); a protobuf Record may span several blocks.
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _log_records(data: bytes) -> Iterator[bytes]:
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    if ident != b":W&B" or magic != 0xBEE1:
        raise ValueError("not a W&B transaction log")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        if pos + length > len(data):  # the writer is mid-record
            return
        chunk = data[pos : pos + length]
        pos += length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def _item_key(item: Any) -> str:
    return item.key or ".".join(item.nested_key)


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def read_offline_run(path: str | os.PathLike[str], wait_s: float = 10.0) -> OfflineRun:
    """Config, history, summary and metadata of an offline run folder (or its .wandb file).

    W&B's service writes the log a moment after ``finish()`` returns, so this waits up to
    ``wait_s`` for the run's exit record; a run that crashed has none and is read as it is.
    """
    path = Path(path)
    log_file = path if path.is_file() else next(iter(sorted(path.glob("run-*.wandb"))), None)
    if log_file is None:
        raise FileNotFoundError(f"{path}: no run-*.wandb file")
    deadline = time.monotonic() + wait_s
    while True:
        run = _parse_log(path, log_file.read_bytes())
        if run.exit_code is not None or time.monotonic() >= deadline:
            return run
        time.sleep(0.02)


def _parse_log(path: Path, data: bytes) -> OfflineRun:
    from wandb.proto import wandb_internal_pb2 as pb

    run = OfflineRun(path=path)
    for raw in _log_records(data):
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.run_id, run.project, run.entity = r.run_id, r.project, r.entity
            run.name, run.group, run.job_type = r.display_name, r.run_group, r.job_type
            run.tags = list(r.tags)
            for item in r.config.update:
                run.config[_item_key(item)] = _json(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[_item_key(item)] = _json(item.value_json)
            for item in record.config.remove:
                run.config.pop(_item_key(item), None)
        elif kind == "history":
            row = {_item_key(item): _json(item.value_json) for item in record.history.item}
            run.history.append(row)
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_item_key(item)] = _json(item.value_json)
            for item in record.summary.remove:
                run.summary.pop(_item_key(item), None)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    run.config.pop("_wandb", None)
    return run
