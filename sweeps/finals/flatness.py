"""Flatness of a trained model, measured alike in the final stage and the claims benchmark.

Every model is measured on one fixed, unaugmented sample of its final training set (train +
validation), the same for every run of a sweep, with ``msam.flatness.flatness_report``: the top
Hessian eigenvalue (Lanczos, with a convergence flag), the Hessian trace (Hutchinson, deflated by
the Lanczos vectors) and SAM's sharpness ``L(w + eps) - L(w)`` at radius rho (Foret et al.,
2021). How hard to look is the spec's ``final.flatness`` section (:class:`sweeps.spec.Flatness`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from sweeps.spec import Flatness, SweepSpec

__all__ = ["FlatnessSettings", "flatness_rho", "flatness_sample", "measure_flatness"]


@dataclass(frozen=True)
class FlatnessSettings:
    """``final.flatness`` as the measurement uses it; the defaults are the spec's."""

    images: int = Flatness().images  # fixed, unaugmented training images (0 = no flatness)
    batch_size: int = Flatness().batch_size  # images per Hessian-vector-product batch
    iters: int = Flatness().iters  # at most this many Lanczos steps for the top eigenvalue
    tol: float = Flatness().tol  # Lanczos stops once the eigenvalue is certified to this (relative)
    samples: int = Flatness().samples  # Rademacher probes of Hutchinson's trace estimate
    radii: tuple[float, ...] = tuple(Flatness().radii)  # common radii of sharpness, every final
    seed: int = Flatness().seed  # picks the images and the probes; the same for every run

    @classmethod
    def from_spec(cls, spec: SweepSpec) -> FlatnessSettings:
        section = spec.final.flatness
        return cls(
            images=section.images,
            batch_size=section.batch_size,
            iters=section.iters,
            tol=section.tol,
            samples=section.samples,
            radii=tuple(section.radii),
            seed=section.seed,
        )

    @property
    def enabled(self) -> bool:
        return self.images > 0

    def record(self) -> dict[str, Any]:
        """The settings as a final's summary.json records them (lists, not tuples), so that a
        rerun can tell whether a final was measured with these."""
        return {**asdict(self), "radii": list(self.radii)}


def flatness_rho(spec: SweepSpec, cfg: Any) -> float:
    """Radius of SAM sharpness in the final stage: the run's own rho; for SGD (no rho of its own)
    the spec's ``base.optim.rho``."""
    if cfg.optim.name == "sgd" or cfg.optim.rho == 0:
        return float(spec.base.optim.rho)
    return float(cfg.optim.rho)


def flatness_sample(cfg: Any, settings: FlatnessSettings) -> list[tuple[Any, Any]]:
    """The fixed sample every model is measured on: ``settings.images`` images of the final
    training set (train + validation), chosen by ``settings.seed``, never augmented.

    It depends only on the data config and the settings, so all runs of a sweep share it.
    """
    import torch

    from msam.data import DeviceLoader, build_data
    from msam.flatness import fixed_sample

    data = build_data(
        cfg.data.dataset,
        root=cfg.data.root,
        val_fraction=cfg.data.val_fraction,
        subset=cfg.data.subset,
        augment=False,
        batch_size=1,
        seed=settings.seed,
        split_seed=cfg.data.split_seed,
        device="cpu",
        final=True,
        synthetic=cfg.data.synthetic.model_dump() if cfg.data.synthetic else None,
        img_size=cfg.data.img_size,
    )
    train = data.train
    if isinstance(train, DeviceLoader):
        gen = torch.Generator().manual_seed(settings.seed)
        n = min(settings.images, train.num_samples)
        idx = torch.randperm(train.num_samples, generator=gen)[:n].sort().values
        view = DeviceLoader(
            train.images[idx],
            train.labels[idx],
            settings.batch_size,
            mean=data.info.mean,
            std=data.info.std,
        )
        return list(view)
    return fixed_sample(train, settings.images, settings.seed, batch_size=settings.batch_size)


def measure_flatness(
    model: Any,
    batches: Sequence[Any],
    *,
    rho: float,
    adaptive: bool,
    settings: FlatnessSettings,
) -> dict[str, Any]:
    """``msam.flatness.flatness_report`` of one model on ``batches``, with the settings used and
    the seconds it took."""
    from torch import nn

    from msam.flatness import flatness_report

    start = time.perf_counter()
    report = flatness_report(
        model,
        nn.CrossEntropyLoss(),
        batches,
        rho=rho,
        iters=settings.iters,
        tol=settings.tol,
        radii=settings.radii,
        samples=settings.samples,
        seed=settings.seed,
        adaptive=adaptive,
    )
    report["iters"] = settings.iters
    report["samples"] = settings.samples
    report["settings"] = settings.record()  # a rerun with other settings measures again
    report["seconds"] = time.perf_counter() - start
    return report
