"""Rank processes for the DistributedDataParallel tests (gloo, CPU). They live here, not in a
test module, so that ``spawn`` can import them by name in every rank."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
from torch.nn.functional import cross_entropy

import msam
from helpers.tinymodels import make_batch, make_model

#: micro-batches per rank, SAM radius, ranks
M, RHO, WORLD = 2, 0.1, 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)


def _leave() -> None:
    # Both ranks leave together: tearing gloo down while the peer still talks aborts.
    dist.barrier()
    dist.destroy_process_group()


def step_worker(rank: int, port: int, out: str) -> None:
    """One mSAM step on this rank's half of the batch; saves the parameters it ends with."""
    _join(rank, port)
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
        _leave()


def count_worker(rank: int, port: int, out: str) -> None:
    """Count gradient all-reduces DDP launches: exactly the final gradient's buckets, once."""
    _join(rank, port)
    try:
        model = make_model("mlp")
        ddp = torch.nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1000)
        hooks: list[int] = []
        ddp.register_comm_hook(None, _counting_hook(hooks))
        x, y = make_batch("mlp", batch=16)
        msam.backward(
            ddp, cross_entropy, x.chunk(2)[rank], y.chunk(2)[rank], rho=RHO, micro_batches=4
        )
        torch.save(len(hooks), f"{out}/count{rank}.pt")
    finally:
        _leave()


def _counting_hook(log):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(state, bucket):
        log.append(bucket.index())
        return allreduce_hook(state, bucket)

    return hook
