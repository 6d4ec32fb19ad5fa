"""The trainer's one extension point: callbacks see each epoch's metrics and may ask to stop.

The sweep engine plugs Optuna pruning and W&B logging in here, which keeps ``msam`` free of both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class Callback:
    """Override what you need; every hook is optional."""

    def on_train_start(self, config: Mapping[str, Any], info: Mapping[str, Any]) -> None:
        """Before the first epoch (or the first resumed one). ``info``: device, parameters, ..."""

    def on_resume(self, history: Sequence[Mapping[str, Any]]) -> None:
        """Right after ``on_train_start`` when the run continues from a checkpoint: the metrics
        of the epochs done before, so trackers and pruners see the whole run."""

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, Any]) -> bool | str | None:
        """After each epoch. Return True (or a reason string) to stop training early."""
        return None

    def on_train_end(self, summary: Mapping[str, Any]) -> None:
        """Once at the end, whatever the outcome (complete, stopped, diverged, failed)."""


class CallbackList(Callback):
    """Fans each hook out to several callbacks; the first stop request wins."""

    def __init__(self, callbacks: Sequence[Callback] = ()) -> None:
        self.callbacks = list(callbacks)

    def on_train_start(self, config: Mapping[str, Any], info: Mapping[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_train_start(config, info)

    def on_resume(self, history: Sequence[Mapping[str, Any]]) -> None:
        for cb in self.callbacks:
            cb.on_resume(history)

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, Any]) -> bool | str | None:
        stop: bool | str | None = None
        for cb in self.callbacks:
            answer = cb.on_epoch_end(epoch, metrics)
            if answer and not stop:
                stop = answer
        return stop

    def on_train_end(self, summary: Mapping[str, Any]) -> None:
        for cb in self.callbacks:
            cb.on_train_end(summary)
