"""The files a training run writes, and how: each replaced atomically, so a run killed mid-write
leaves the previous version (or none), never half a file that a resume or a reader would trip on.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["CHECKPOINT", "ERROR", "METRICS", "SUMMARY", "atomic_write", "read_json", "write_json"]

#: Names inside a training run's folder (``msam train --out DIR``, a trial's, a final's).
CHECKPOINT = "checkpoint.pt"  # model, optimizer, scheduler and RNG state after the last epoch
METRICS = "metrics.jsonl"  # one JSON object per epoch
SUMMARY = "summary.json"  # the outcome: status, val/test accuracy, cost, versions
ERROR = "error.txt"  # the traceback of a run that raised


def atomic_write(path: str | os.PathLike[str], data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary sibling and ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(data, bytes):
        tmp.write_bytes(data)
    else:
        tmp.write_text(data, encoding="utf-8")
    os.replace(tmp, path)
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
