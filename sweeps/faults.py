"""What a failing trial or final run leaves behind: its reason (out of memory, or the error in
one line), and the memory it held given back before the next run starts."""

from __future__ import annotations

import gc

__all__ = ["OUT_OF_MEMORY", "failure_reason", "is_out_of_memory", "one_line", "release_memory"]

#: The reason of a run that ran out of memory (CUDA's OutOfMemoryError, or the host's).
OUT_OF_MEMORY = "out of memory"


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or an allocator saying it ran out."""
    import torch

    if isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text
    )


def release_memory() -> None:
    """Free what a failed run held: its frames (cycles through the traceback) and, on a GPU,
    the blocks PyTorch's caching allocator keeps for reuse."""
    gc.collect()
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, at most 500 characters: a reason users can read."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:500] if text else type(exc).__name__


def failure_reason(exc: BaseException) -> str:
    """The reason a failed trial or final records: ``out of memory``, else ``error: <one line>``."""
    return OUT_OF_MEMORY if is_out_of_memory(exc) else f"error: {one_line(exc)}"
