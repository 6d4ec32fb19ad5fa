"""What one speed benchmark of SGD, SAM and mSAM measures (``msam bench speed``'s options).

A frozen, validated record, so the command line, a notebook and the GPU check all describe a run
the same way; imports nothing heavy, so the command line can read its defaults without torch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

__all__ = ["AMP_MODES", "CHANNELS_LAST_MODES", "SMALL_INPUT_MODES", "SpeedSettings", "defaults"]

#: Autocast dtypes: none = full precision.
AMP_MODES: tuple[str, ...] = ("bf16", "fp16", "none")
#: Memory format of the model and batch: auto = channels-last on CUDA only.
CHANNELS_LAST_MODES: tuple[str, ...] = ("auto", "on", "off")
#: ResNet stem: auto = msam's small-input stem (3x3, stride 1, no max-pool) below 64 px; off =
#: timm's default stem (7x7 stride 2 and a max-pool: 4x smaller feature maps).
SMALL_INPUT_MODES: tuple[str, ...] = ("auto", "on", "off")


@dataclass(frozen=True)
class SpeedSettings:
    """One speed benchmark: a timm model on a synthetic batch, SGD, SAM and mSAM for each m."""

    model: str  # timm model name or alias (vit_tiny, ...); built with random weights
    batch_size: int  # images per update (the mini-batch B)
    micro_batches: tuple[int, ...] = (1, 2, 4, 8)  # mSAM m values; each must divide batch_size
    img_size: int = 32  # image side (pixels)
    in_chans: int = 3  # image channels
    num_classes: int = 10  # classes of the synthetic labels
    steps: int = 10  # timed updates per configuration, interleaved round-robin
    warmup: int = 2  # untimed updates per configuration before timing (at least one runs)
    device: str = "cpu"  # cpu | cuda | cuda:N
    amp: str = "none"  # autocast dtype, one of AMP_MODES
    strategy: str = "all"  # mSAM strategies: all | auto | comma-separated names in msam.STRATEGIES
    rho: float = 0.05  # SAM radius: L2 length of the ascent step
    channels_last: str = "auto"  # one of CHANNELS_LAST_MODES
    small_input: str = "auto"  # one of SMALL_INPUT_MODES (the ResNet stem)
    threads: int | None = None  # torch CPU threads while measuring; None (or 0) = torch's
    memory: bool = True  # also measure peak memory (one extra step per configuration)
    seed: int = 0  # seed of the weights and of the synthetic batch

    def __post_init__(self) -> None:
        object.__setattr__(self, "micro_batches", tuple(self.micro_batches))
        bad = [m for m in self.micro_batches if m < 1 or self.batch_size % m]
        if bad:
            raise ValueError(f"micro-batches {bad} do not divide the batch size {self.batch_size}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {sorted(AMP_MODES)}, got {self.amp!r}")
        if self.small_input not in SMALL_INPUT_MODES:
            raise ValueError(
                f"small_input must be one of {list(SMALL_INPUT_MODES)}, got {self.small_input!r}"
            )
        if self.channels_last not in CHANNELS_LAST_MODES:
            raise ValueError(
                f"channels_last must be one of {list(CHANNELS_LAST_MODES)}, "
                f"got {self.channels_last!r}"
            )


def defaults() -> dict[str, Any]:
    """Each optional setting's default, by field name (for a command line's options)."""
    return {
        f.name: f.default for f in fields(SpeedSettings) if f.name not in ("model", "batch_size")
    }
