"""The sweep as it runs: per optimizer, finished / pruned / failed / running trials and the best
validation accuracy so far, read from the storage every second.

On a terminal it is a rich ``Live`` table; elsewhere (CI logs, ``nohup``) a plain line whenever
the counts changed, at most every ``plain_every_s`` seconds. The same table ends the tuning stage
(:func:`best_table`).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from sweeps.spec import SweepSpec
from sweeps.studies import StudyCounts, count_trials, open_study

__all__ = ["LiveView", "best_table", "progress_line", "progress_table", "snapshot"]


def snapshot(spec: SweepSpec, storage: Any) -> list[StudyCounts]:
    """Trial counts of every optimizer's study (empty counts for a study not created yet)."""
    counts = []
    for opt in spec.optimizers:
        study = open_study(storage, spec.name, opt)
        trials = study.get_trials(deepcopy=False) if study is not None else []
        counts.append(count_trials(trials, opt, spec.budget.trials))
    return counts


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _params(params: dict[str, Any] | None) -> str:
    if not params:
        return "-"
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def progress_table(name: str, counts: Sequence[StudyCounts], elapsed_s: float) -> Table:
    table = Table(title=f"sweep {name}  ({elapsed_s:.0f} s)", title_justify="left")
    for column in ("optimizer", "finished", "complete", "pruned", "failed", "running", "best val"):
        table.add_column(column, justify="left" if column == "optimizer" else "right")
    for c in counts:
        table.add_row(
            c.optimizer,
            f"{c.finished}/{c.budget}",
            str(c.complete),
            str(c.pruned),
            str(c.failed),
            str(c.running),
            _acc(c.best),
        )
    return table


def progress_line(counts: Sequence[StudyCounts], elapsed_s: float) -> str:
    parts = [
        f"{c.optimizer} {c.finished}/{c.budget} (pruned {c.pruned}, failed {c.failed}, "
        f"running {c.running}) best {_acc(c.best)}"
        for c in counts
    ]
    return f"[{elapsed_s:6.0f} s] " + " | ".join(parts)


def best_table(name: str, counts: Sequence[StudyCounts]) -> Table:
    """The best trial of each optimizer: what the tuning stage found."""
    table = Table(title=f"best trial per optimizer: {name}", title_justify="left")
    for column in ("optimizer", "trials", "best val acc", "trial", "parameters"):
        table.add_column(column, justify="right" if column in ("trials", "trial") else "left")
    ranked = sorted(counts, key=lambda c: -1.0 if c.best is None else c.best, reverse=True)
    for c in ranked:
        table.add_row(
            c.optimizer,
            f"{c.finished}/{c.budget}",
            _acc(c.best),
            "-" if c.best_number is None else str(c.best_number),
            _params(c.best_params),
        )
    return table


class LiveView:
    """Polls the storage in a background thread and shows the sweep's progress.

    Use as a context manager around the tuning stage; :meth:`say` prints a line above the table.
    """

    def __init__(
        self,
        spec: SweepSpec,
        storage: Any,
        *,
        interval_s: float = 1.0,
        plain_every_s: float = 30.0,
        console: Console | None = None,
    ) -> None:
        self.spec = spec
        self.storage = storage
        self.interval_s = interval_s
        self.plain_every_s = plain_every_s
        self.console = console or Console()
        self.live: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._start = time.monotonic()
        self._last_line = ""
        self._last_print = -float("inf")
        self.counts: list[StudyCounts] = []

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self._start

    def __enter__(self) -> LiveView:
        self._start = time.monotonic()
        if self.console.is_terminal:
            from rich.live import Live

            self.live = Live(console=self.console, refresh_per_second=4, transient=False)
            self.live.start()
        self.refresh()
        self._thread = threading.Thread(target=self._poll, name="live-view", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.refresh(force=True)
        if self.live is not None:
            self.live.stop()
            self.live = None

    def _poll(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.refresh()
            except Exception as exc:  # the view must never stop the sweep
                self.say(f"live view: {type(exc).__name__}: {exc}")

    def refresh(self, force: bool = False) -> None:
        self.counts = snapshot(self.spec, self.storage)
        if self.live is not None:
            self.live.update(progress_table(self.spec.name, self.counts, self.elapsed_s))
            return
        line = progress_line(self.counts, self.elapsed_s)
        changed = line.split("] ", 1)[1] != self._last_line
        due = time.monotonic() - self._last_print >= self.plain_every_s
        if force or (changed and due):
            print(line, flush=True)
            self._last_line = line.split("] ", 1)[1]
            self._last_print = time.monotonic()

    def say(self, message: str) -> None:
        if self.live is not None:
            self.live.console.print(message, markup=False, highlight=False)  # "[lr=0.1]" is text
        else:
            print(message, file=sys.stdout, flush=True)
