"""DistributedDataParallel on gloo: 2 ranks x m micro-batches equals one process with 2m.

The rank processes live in tests/helpers/ddp.py, so that ``spawn`` can import them by name."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.multiprocessing as mp
from helpers.ddp import RHO, WORLD, M, count_worker, free_port, step_worker
from helpers.tinymodels import make_batch, make_model
from torch.nn.functional import cross_entropy

import msam
import msam.trainer


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


@pytest.mark.timeout(180)
def test_ddp_all_reduces_once(tmp_path):
    mp.start_processes(
        count_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn"
    )
    for r in range(WORLD):
        assert torch.load(tmp_path / f"count{r}.pt") == 1  # one bucket, reduced once
