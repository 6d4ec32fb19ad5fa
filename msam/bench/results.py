"""A speed run's records: the JSON file beside a benchmark's ``.md`` and the tables printed from
it, with each row's ratio to SGD and to SAM as recorded (medians of the same run)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from msam.files import atomic_write

__all__ = [
    "COLUMNS",
    "markdown_table",
    "print_table",
    "read_records",
    "table_rows",
    "write_records",
]

#: xSAM: ratio to ``msam.backward(m=1)``; xplain: to SAM's two steps written the obvious way.
COLUMNS = ["optimizer", "m", "strategy", "ms/step median", "min-max", "img/s", "xSGD", "xSAM"]
COLUMNS += ["xplain", "peak MB"]


def _title(records: Sequence[dict[str, Any]]) -> str:
    head = records[0] if records else {}
    stem = f" small_input={head['small_input']}" if head.get("small_input") else ""
    return (
        f"{head.get('model')} {head.get('img_size')}px{stem} batch {head.get('batch_size')} "
        f"on {head.get('machine', {}).get('device_name')} amp={head.get('amp')}"
    )


def table_rows(records: Sequence[dict[str, Any]]) -> list[list[str]]:
    """One row of strings per record, in ``COLUMNS`` order; ratios as recorded (same run)."""
    rows = []
    for r in records:
        auto = r.get("auto_choice") and r["optimizer"] == "msam"
        name = r["strategy"] + (" (auto)" if auto else "")
        if r.get("skipped"):
            rows.append([r["optimizer"], str(r["micro_batches"]), name, "skipped: " + r["skipped"]])
            continue
        rows.append(
            [
                r["optimizer"],
                str(r["micro_batches"]),
                name,
                f"{r['step_ms_median']:.1f}",
                f"{r['step_ms_min']:.1f}-{r['step_ms_max']:.1f}",
                f"{r['images_per_s']:.0f}",
                f"{r['ratio_to_sgd']:.2f}" if r.get("ratio_to_sgd") else "-",
                f"{r['ratio_to_sam']:.2f}" if r.get("ratio_to_sam") else "-",
                f"{r['ratio_to_plain_sam']:.2f}" if r.get("ratio_to_plain_sam") else "-",
                "-" if r.get("peak_mem_mb") is None else f"{r['peak_mem_mb']:.0f}",
            ]
        )
    return rows


def markdown_table(records: Sequence[dict[str, Any]]) -> str:
    """The table as GitHub markdown, for the ``.md`` beside a results file."""
    lines = [f"**{_title(records)}**", "", "| " + " | ".join(COLUMNS) + " |"]
    lines.append("|" + "|".join(" --- " for _ in COLUMNS) + "|")
    for row in table_rows(records):
        lines.append("| " + " | ".join(row + [""] * (len(COLUMNS) - len(row))) + " |")
    return "\n".join(lines) + "\n"


def print_table(records: Sequence[dict[str, Any]], file: Any = None) -> None:
    """A table with each row's ratio to SGD and to SAM (rich if installed, else plain text)."""
    rows = table_rows(records)
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        out = file or sys.stdout
        print(_title(records), file=out)
        print(" | ".join(COLUMNS), file=out)
        for row in rows:
            print(" | ".join(row), file=out)
        return
    table = Table(title=_title(records))
    for c in COLUMNS:
        table.add_column(c, justify="left" if c in ("optimizer", "strategy") else "right")
    for row in rows:
        table.add_row(*row)
    console = Console(file=file)
    if not console.is_terminal:
        console = Console(file=file, width=140)
    console.print(table)


def write_records(path: str | Path, records: Sequence[dict[str, Any]]) -> Path:
    """The records as a JSON list (one object per configuration), folders created as needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(list(records), indent=1) + "\n")
    return path


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Records written by :func:`write_records` (or ``msam bench speed --json``)."""
    return json.loads(Path(path).read_text())
