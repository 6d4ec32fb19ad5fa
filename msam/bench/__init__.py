"""Benchmarks of the update rules: the speed of SGD, SAM and mSAM (Behdin et al., 2023,
arXiv:2302.09693) per strategy, as a typed API (``msam bench speed`` is its command line).

    records = measure_speed(SpeedSettings(model="resnet10t", batch_size=128, device="cuda"))
    print_table(records); write_records("speed.json", records)

``settings`` and ``results`` import nothing heavy; ``measure_speed`` and ``machine_info`` load
torch on first use (PEP 562). Imports neither optuna nor wandb.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from msam._lazy import lazy_exports
from msam.bench.results import (
    COLUMNS,
    markdown_table,
    print_table,
    read_records,
    table_rows,
    write_records,
)
from msam.bench.settings import AMP_MODES, CHANNELS_LAST_MODES, SpeedSettings

if TYPE_CHECKING:
    from msam.bench.machine import machine_info
    from msam.bench.speed import measure_speed

__all__ = [
    "AMP_MODES",
    "CHANNELS_LAST_MODES",
    "COLUMNS",
    "SpeedSettings",
    "machine_info",
    "markdown_table",
    "measure_speed",
    "print_table",
    "read_records",
    "table_rows",
    "write_records",
]

_LAZY = {"machine_info": "msam.bench.machine", "measure_speed": "msam.bench.speed"}


__getattr__, __dir__ = lazy_exports(globals(), _LAZY)
