"""Ctrl-C and SIGTERM for sweep processes: stop training at once, but never mid storage write.

The first SIGINT/SIGTERM raises :class:`Interrupted` only inside :meth:`InterruptGuard.raising`
(the training itself); elsewhere it is recorded and acted on at the next :meth:`check`, so the
journal or database never sees half an update. Later signals are ignored while the process
cleans up (fails its trial as ``interrupted``, finishes its W&B run). Exit status 128 + signal:
130 for SIGINT, 143 for SIGTERM.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["InterruptGuard", "Interrupted"]


class Interrupted(BaseException):
    """Raised where the process may stop; a BaseException so ``except Exception`` lets it pass."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class InterruptGuard:
    """Installs SIGINT/SIGTERM handlers for its lifetime (main thread only; a no-op elsewhere)."""

    def __init__(self, on_signal: Callable[[int], None] | None = None) -> None:
        self.signum: int | None = None
        self.on_signal = on_signal
        self._raising = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @property
    def exit_code(self) -> int | None:
        return None if self.signum is None else 128 + self.signum

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            return  # already stopping: let the clean-up finish
        self.signum = signum
        if self.on_signal is not None:
            self.on_signal(signum)
        if self._raising:
            raise Interrupted(signum)

    def check(self) -> None:
        """Raise :class:`Interrupted` if a signal arrived (call at safe points)."""
        if self.signum is not None:
            raise Interrupted(self.signum)

    @contextlib.contextmanager
    def shielded(self) -> Iterator[None]:
        """Inside ``raising``, a block a signal must not cut in two (starting or finishing a W&B
        run): the signal waits for the block's end, then raises there."""
        saved, self._raising = self._raising, 0
        try:
            yield
        finally:
            self._raising = saved
        if saved:
            self.check()

    @contextlib.contextmanager
    def raising(self) -> Iterator[None]:
        """Inside this block a signal raises at once (training can be stopped mid-epoch)."""
        self.check()
        self._raising += 1
        try:
            yield
        finally:
            self._raising -= 1
