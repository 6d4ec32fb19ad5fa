"""DistributedDataParallel on gloo: 2 ranks x m micro-batches equals one process with 2m."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tinymodels import make_batch, make_model
from torch.nn.functional import cross_entropy

import msam

M, RHO, WORLD = 2, 0.1, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = make_model("conv_gn")
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        x, y = make_batch("conv_gn", batch=16)
        xs, ys = x.chunk(WORLD)[rank], y.chunk(WORLD)[rank]
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        msam.backward(ddp, cross_entropy, xs, ys, rho=RHO, micro_batches=M)
        opt.step()
        torch.save({"params": [p.detach() for p in model.parameters()]}, f"{out}/rank{rank}.pt")
    finally:
        # Both ranks leave together: tearing gloo down while the peer still talks aborts.
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_ddp_equals_single_process_with_2m_micro_batches(tmp_path):
    mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn"
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


def _worker_counts(rank: int, port: int, out: str) -> None:
    """Count gradient all-reduces DDP launches: exactly the final gradient's buckets, once."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = make_model("mlp")
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1000)
        hooks = []
        ddp.register_comm_hook(None, _counting_hook(hooks))
        x, y = make_batch("mlp", batch=16)
        msam.backward(
            ddp, cross_entropy, x.chunk(2)[rank], y.chunk(2)[rank], rho=RHO, micro_batches=4
        )
        torch.save(len(hooks), f"{out}/count{rank}.pt")
    finally:
        # Both ranks leave together: tearing gloo down while the peer still talks aborts.
        dist.barrier()
        dist.destroy_process_group()


def _counting_hook(log):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        log.append(bucket.index())
        return allreduce_hook(state, bucket)

    return hook


@pytest.mark.timeout(120)
def test_ddp_all_reduces_once(tmp_path):
    mp.start_processes(
        _worker_counts, args=(_free_port(), str(tmp_path)), nprocs=WORLD, start_method="spawn"
    )
    for r in range(WORLD):
        assert torch.load(tmp_path / f"count{r}.pt") == 1  # one bucket, reduced once
