"""Tiny float64 models and batches shared by the gradient tests (exact checks in milliseconds)."""

from __future__ import annotations

import torch
from torch import nn


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 10), nn.Tanh(), nn.Linear(10, 3))


def conv_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


def conv_gn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )


MODELS = {"mlp": mlp, "conv_bn": conv_bn, "conv_gn": conv_gn}


def make_batch(kind: str, batch: int = 16, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 12) if kind == "mlp" else (batch, 3, 2, 2)
    x = torch.randn(shape, generator=g, dtype=dtype)
    y = torch.randint(0, 3, (batch,), generator=g)
    return x, y


def make_model(kind: str, seed: int = 0, dtype=torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return MODELS[kind]().to(dtype).train()
