"""A loader for data sets that fit in device memory: uint8 images on the device, batches by index.

Batch order and augmentation come from a private ``torch.Generator`` seeded by (seed, epoch), drawn
once per epoch on the CPU: the same seed gives the same batches on any device and for every
optimizer (paired comparisons), and the global RNG (dropout, init) is never touched. Per batch the
work is one gather, the augmentation and the normalisation, all on the device, with no host copy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from msam.data._augment import crop_and_flip


def epoch_seed(seed: int, epoch: int, *extra: int) -> int:
    """A well-mixed 64-bit seed for (seed, epoch, ...): nearby seeds give unrelated streams."""
    words = [int(v) & 0xFFFF_FFFF_FFFF_FFFF for v in (seed, epoch, *extra)]
    return int(np.random.SeedSequence(words).generate_state(1, np.uint64)[0])


class DeviceLoader:
    """Iterates ``(x, y)`` batches of an in-memory split that lives on ``device``.

    ``x`` is float32 [B, C, H, W] normalised with ``mean``/``std`` (on the [0, 1] scale), ``y``
    int64 [B]. Call ``set_epoch(epoch)`` before each epoch: the order and the augmentation are a
    function of (seed, epoch) only. ``num_samples`` counts the examples in the split, including
    those a ``drop_last`` epoch leaves out.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        crop_pad: int = 0,
        flip: bool = False,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        seed: int = 0,
        device: str | torch.device = "cpu",
        channels_last: bool = False,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(
                f"images must be uint8 [N, C, H, W], got {images.dtype} {images.shape}"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"labels must be [N] with N={len(images)}, got {tuple(labels.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.num_samples = len(images)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.crop_pad = int(crop_pad)
        self.flip = flip
        self.seed = int(seed)
        self.channels_last = channels_last
        self.epoch = 0
        channels = images.shape[1]
        mean_t = torch.as_tensor(mean, dtype=torch.float32).expand(channels)
        std_t = torch.as_tensor(std, dtype=torch.float32).expand(channels)
        # x_norm = (x / 255 - mean) / std = x * scale - shift
        self._scale = (1.0 / (255.0 * std_t)).view(1, -1, 1, 1).to(self.device)
        self._shift = (mean_t / std_t).view(1, -1, 1, 1).to(self.device)

    @property
    def augment(self) -> bool:
        return self.crop_pad > 0 or self.flip

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iteration yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return -(-self.num_samples // self.batch_size)

    def epoch_order(self) -> torch.Tensor:
        """The CPU int64 indices of this epoch, in the order batches take them."""
        return self._plan()[0]

    def _plan(
        self,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        n = self.num_samples
        if not (self.shuffle or self.augment):
            return torch.arange(n), None, None, None
        gen = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(n, generator=gen) if self.shuffle else torch.arange(n)
        dy = dx = flips = None
        if self.crop_pad > 0:
            shifts = torch.randint(0, 2 * self.crop_pad + 1, (2, n), generator=gen)
            dy, dx = shifts[0], shifts[1]
        if self.flip:
            flips = torch.rand(n, generator=gen) < 0.5
        return order, dy, dx, flips

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order, dy, dx, flips = (
            None if t is None else t.to(self.device, non_blocking=True) for t in self._plan()
        )
        sequential = not self.shuffle
        b = self.batch_size
        for i in range(len(self)):
            window = slice(i * b, (i + 1) * b)
            if sequential:  # plain slices: no gather for evaluation
                x, y = self.images[window], self.labels[window]
            else:
                idx = order[window]
                x, y = self.images[idx], self.labels[idx]
            if self.augment:
                x = crop_and_flip(
                    x,
                    None if dy is None else dy[window],
                    None if dx is None else dx[window],
                    None if flips is None else flips[window],
                    self.crop_pad,
                )
            x = x.float().mul_(self._scale).sub_(self._shift)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y

    def __repr__(self) -> str:
        return (
            f"DeviceLoader(num_samples={self.num_samples}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, drop_last={self.drop_last}, crop_pad={self.crop_pad}, "
            f"flip={self.flip}, device={self.device})"
        )
