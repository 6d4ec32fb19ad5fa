"""``msam sweep SPEC`` (launch a sweep) and ``msam worker SPEC`` (join one from another machine)."""

from __future__ import annotations

import argparse
import os
import warnings

from msam.errors import UserError
from sweeps.cli._common import add_set_option, preflight
from sweeps.engine.launch import STORAGE_ENV
from sweeps.run import STAGES


def register(subparsers: argparse._SubParsersAction) -> None:
    sweep = subparsers.add_parser(
        "sweep",
        help="tune SGD, SAM and mSAM with equal budgets, then re-run the best over seeds",
        description="Run a sweep spec: Optuna studies per optimizer, final runs, leaderboard.",
    )
    sweep.add_argument("spec", metavar="SPEC", help="sweep spec YAML")
    add_set_option(sweep)
    sweep.add_argument("--out", metavar="DIR", help="run folder (default: runs/<name>)")
    workers = sweep.add_mutually_exclusive_group()
    workers.add_argument("--workers", type=int, metavar="N", help="parallel worker processes")
    workers.add_argument("--gpus", metavar="0,1,...", help="one worker group per listed GPU")
    sweep.add_argument("--per-gpu", type=int, metavar="K", help="workers per GPU (with --gpus)")
    sweep.add_argument(
        "--storage",
        metavar="URL",
        help=f"Optuna storage (default: ${STORAGE_ENV}, which keeps a password out of the process "
        "list, else <out>/optuna.journal)",
    )
    sweep.add_argument("--stage", choices=STAGES, default="all", help="which stages to run")
    sweep.set_defaults(func=run_sweep)

    worker = subparsers.add_parser(
        "worker",
        help="add a worker to a running sweep (shared storage)",
        description="Join a sweep whose studies live in shared storage, e.g. from another machine.",
    )
    worker.add_argument("spec", metavar="SPEC", help="the sweep's spec YAML")
    add_set_option(worker)
    worker.add_argument(
        "--storage",
        metavar="URL",
        help=f"the sweep's storage (default: ${STORAGE_ENV}, which keeps a password out of the "
        "process list)",
    )
    worker.add_argument("--out", metavar="DIR", help="run folder (default: runs/<name>)")
    # The launcher numbers its workers so each seeds its sampler differently (seed + index).
    worker.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    worker.set_defaults(func=run_worker)


def _load_spec(args: argparse.Namespace):
    """The validated spec, with its model, data and device checked before any work."""
    from sweeps.spec import load_sweep_spec

    spec = load_sweep_spec(args.spec, args.sets)
    preflight(spec.base)
    return spec


def parse_gpus(text: str) -> tuple[int, ...]:
    """``"0,1"`` -> ``(0, 1)``; anything else is a UserError."""
    try:
        gpus = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        gpus = []
    if not gpus or min(gpus) < 0 or len(set(gpus)) != len(gpus):
        raise UserError(f"--gpus {text!r}: expected distinct GPU indices such as 0,1")
    return tuple(gpus)


def _slots(args: argparse.Namespace, storage: str | None):
    """The worker slots ``--workers`` / ``--gpus --per-gpu`` ask for, checked."""
    from sweeps.run import plan_slots

    if args.workers is not None and args.workers < 1:
        raise UserError(f"--workers must be >= 1 (got {args.workers})")
    if args.per_gpu is not None and args.gpus is None:
        raise UserError("--per-gpu needs --gpus")
    if args.per_gpu is not None and args.per_gpu < 1:
        raise UserError(f"--per-gpu must be >= 1 (got {args.per_gpu})")
    gpus = parse_gpus(args.gpus) if args.gpus is not None else None
    if gpus is not None:
        _check_gpus(args.gpus, gpus)
    slots = plan_slots(args.workers, gpus, args.per_gpu)
    parallel = len(slots) > 1 or gpus is not None
    if parallel and storage and storage.startswith("sqlite"):
        raise UserError(
            "--storage sqlite cannot take several writers ('database is locked'); "
            "use the default journal file or a postgresql:// URL"
        )
    _warn_oversubscribed(len(slots), gpus)
    return slots


def _check_gpus(text: str, gpus: tuple[int, ...]) -> None:
    """``--gpus`` names CUDA devices this machine has (as ``CUDA_VISIBLE_DEVICES`` shows them)."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UserError(
            f"--gpus {text}: this machine has no CUDA GPU that torch can use; "
            "use --workers N for CPU workers"
        )
    missing = [g for g in gpus if g >= count]
    if missing:
        raise UserError(
            f"--gpus {text}: no GPU {', '.join(map(str, missing))} on this machine "
            f"({count} CUDA GPU(s): 0-{count - 1})"
        )


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _warn_oversubscribed(workers: int, gpus: tuple[int, ...] | None) -> None:
    """One line when the workers' torch threads outnumber the CPU cores: every trial then runs
    slower (and its timings mean less), yet the sweep is still correct, so it runs."""
    from sweeps.engine.launch import worker_threads

    threads, cores = worker_threads(), _cpu_cores()
    if workers * threads <= cores:
        return
    what = f"{workers} worker(s)" + ("" if threads == 1 else f" x {threads} torch threads")
    fewer = "a smaller --per-gpu" if gpus is not None else "fewer workers"
    warnings.warn(
        f"{what} on {cores} CPU core(s): they share the cores, so every trial runs slower and "
        f"its timings mean less; {fewer} would finish about as soon",
        RuntimeWarning,
        stacklevel=2,
    )


def _sweep_storage(args: argparse.Namespace) -> str | None:
    """``--storage``, else ``$MSAM_STORAGE`` (said on one line, as the variable may be set for
    another sweep), else None: the run folder's journal."""
    if args.storage is not None:
        return args.storage
    return os.environ.get(STORAGE_ENV) or None


def run_sweep(args: argparse.Namespace) -> int:
    from sweeps.engine import run_sweep as engine_run_sweep
    from sweeps.run import SweepRun
    from sweeps.tracking import own_service

    storage = _sweep_storage(args)
    slots = _slots(args, storage)
    spec = _load_spec(args)
    run = SweepRun.create(spec, args.out, storage, slots=slots, stage=args.stage)
    if args.storage is None and storage is not None:
        print(f"storage from ${STORAGE_ENV}: {run.storage.shown} (--storage overrides it)")
    own_service()  # its workers share the launcher's W&B service, never a parent's
    return engine_run_sweep(run)


def _worker_storage(args: argparse.Namespace) -> str:
    """``--storage``, else ``$MSAM_STORAGE``: how the launcher hands its workers a URL that may
    hold a password, since every user of a machine can read a process's command line."""
    if args.storage is not None:
        return args.storage
    storage = os.environ.get(STORAGE_ENV)
    if not storage:
        raise UserError(
            "msam worker: the following arguments are required: --storage URL "
            f"(or {STORAGE_ENV} in the environment)"
        )
    return storage


def run_worker(args: argparse.Namespace) -> int:
    from sweeps.engine import run_worker as engine_run_worker
    from sweeps.run import SweepRun

    storage = _worker_storage(args)
    spec = _load_spec(args)
    run = SweepRun.create(spec, args.out, storage, worker_index=args.worker_index)
    return engine_run_worker(run)
