"""DistributedDataParallel: 2 ranks x m micro-batches equal one process with 2m, and the final
gradient is all-reduced once.

The two-rank runs spawn gloo processes (5-10 s each on two busy cores). One stays in the default
run; counting DDP's all-reduces on two ranks is marked slow, covered fast by a DDP-like wrapper
that shows every backward but the last runs under ``no_sync`` (so DDP all-reduces once) with the
unwrapped gradient. The trainer's rank set-up is checked with torchrun's environment and a
stand-in process group; the trainer under a real ``torchrun`` is
tests/msam/test_trainer.py::test_torchrun_ddp_on_gloo (slow).
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers.ddp import RHO, WORLD, M, count_worker, free_port, step_worker
from helpers.tinymodels import make_batch, make_model
from torch import nn
from torch.nn.functional import cross_entropy

import msam
import msam.trainer


class SyncRecorder(nn.Module):
    """DDP's interface without a process group: ``no_sync()`` and a log, per backward pass, of
    whether it would have all-reduced."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.syncing = True
        self.log: list[bool] = []
        first = next(module.parameters())
        first.register_hook(lambda grad: self.log.append(self.syncing))

    @contextlib.contextmanager
    def no_sync(self):
        self.syncing = False
        try:
            yield
        finally:
            self.syncing = True

    def forward(self, x):
        return self.module(x)


@pytest.mark.parametrize("rho", [0.0, RHO])
def test_only_the_last_backward_would_all_reduce(rho):
    model = make_model("mlp")
    reference = copy.deepcopy(model)
    x, y = make_batch("mlp", batch=16)
    wrapped = SyncRecorder(model)
    msam.backward(wrapped, cross_entropy, x, y, rho=rho, micro_batches=4)
    msam.backward(reference, cross_entropy, x, y, rho=rho, micro_batches=4)
    assert wrapped.log[-1] is True and not any(wrapped.log[:-1]), wrapped.log
    assert len(wrapped.log) == (4 if rho == 0 else 8)  # m passes, or 2m with the ascent steps
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_trainer_joins_a_process_group_only_under_torchrun(monkeypatch):
    joined: list[str] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: joined.append(backend))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert msam.trainer._distributed(torch.device("cpu")) is None
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert msam.trainer._distributed(torch.device("cpu")) is None
    assert joined == []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    info = msam.trainer._distributed(torch.device("cpu"))
    assert info == {"rank": 1, "world": 2, "device": torch.device("cpu")}
    assert joined == ["gloo"]  # CPUs: gloo, and the device stays the CPU


@pytest.mark.timeout(180)
def test_ddp_equals_single_process_with_2m_micro_batches(tmp_path):
    mp.start_processes(
        step_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn"
    )
    model = make_model("conv_gn")
    reference = copy.deepcopy(model)
    x, y = make_batch("conv_gn", batch=16)
    msam.backward(reference, cross_entropy, x, y, rho=RHO, micro_batches=M * WORLD)
    torch.optim.SGD(reference.parameters(), lr=0.1).step()
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for r in results:
        for p, q in zip(r["params"], reference.parameters(), strict=True):
            torch.testing.assert_close(p, q.detach(), rtol=1e-10, atol=1e-12)
    # Both ranks hold identical weights: the final gradient was all-reduced.
    for p, q in zip(results[0]["params"], results[1]["params"], strict=True):
        assert torch.equal(p, q)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ddp_all_reduces_once(tmp_path):
    mp.start_processes(
        count_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn"
    )
    for r in range(WORLD):
        assert torch.load(tmp_path / f"count{r}.pt") == 1  # one bucket, reduced once
