"""The sweep engine: ``msam sweep`` (launch and supervise) and ``msam worker`` (join).

A sweep runs stages in order: ``tune`` (one Optuna study per optimizer, equal budgets, workers
sharing the storage), then ``final`` and ``leaderboard`` when their modules exist
(``sweeps.finals.run_finals``, ``sweeps.results.leaderboard.run_leaderboard``), so later stages plug in
without touching the engine. Rerunning the same command resumes: finished trials stay, trials of
vanished workers are failed and redone, and every study ends with exactly its budget of finished
trials. SGD vs SAM (Foret et al., 2021) vs mSAM (Behdin et al., 2023) is the comparison served.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import socket
import statistics
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from msam.config import first_difference
from msam.errors import UserError
from sweeps.engine.launch import Slot, WorkerPool, plan_slots, worker_threads
from sweeps.engine.signals import Interrupted, InterruptGuard
from sweeps.studies import ensure_studies, load_study, make_stale_callback, reap_lost_trials
from sweeps.engine.worker import Worker
from sweeps.engine.live import LiveView, best_table, snapshot
from sweeps.spec import SweepSpec
from sweeps.storage import StorageRef, open_storage, resolve_storage

__all__ = [
    "STAGES",
    "Stage",
    "check_same_sweep",
    "run_sweep",
    "run_worker",
    "tune",
    "write_spec",
]

SPEC_FILE = "spec.yaml"
#: Settings a rerun may change without starting another sweep: a larger or smaller budget, the
#: final stage, tracking, and where data and device live on this machine. Anything else (the
#: model, the data, the search space, the sampler...) would mix two sweeps in one run folder.
RERUN_MAY_CHANGE = (
    "budget.trials",
    "final",
    "base.tracking",
    "base.data.root",
    "base.train.device",
)
#: At launch, a RUNNING trial whose worker never named itself is lost after this many seconds.
LAUNCH_OWNERLESS_GRACE_S = 30


@dataclass(frozen=True)
class Stage:
    """A step of ``msam sweep``; ``stages`` lists the ``--stage`` values that run it."""

    name: str
    stages: tuple[str, ...]
    run: Callable[[SweepSpec, argparse.Namespace, Any], int]


def _optional(module: str, attr: str) -> Callable[..., Any] | None:
    """``module.attr`` when that module exists (later stages are written separately)."""
    try:
        loaded = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module == exc.name or module.startswith(exc.name + ".")):
            return None
        raise
    return getattr(loaded, attr, None)


def _exit_code(result: Any) -> int:
    """A stage may return an exit status, or records (a list) meaning success."""
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _accepted(fn: Callable[..., Any], **optional: Any) -> dict[str, Any]:
    """The keyword arguments ``fn`` takes, so stages written separately can grow their own."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return optional
    return {key: value for key, value in optional.items() if key in params}


def _stage_tune(spec: SweepSpec, args: argparse.Namespace, storage: Any) -> int:
    return tune(spec, args, storage)


def _stage_final(spec: SweepSpec, args: argparse.Namespace, storage: Any) -> int:
    finals = _optional("sweeps.finals.run", "run_finals")
    if finals is None or spec.final.seeds == 0:
        return 0
    with InterruptGuard() as guard:  # Ctrl-C / SIGTERM: the running final keeps its checkpoint
        try:
            with guard.raising():
                result = finals(spec, args, storage)
        except Interrupted as exc:
            print("interrupted: the final stage stopped; rerun to resume it", flush=True)
            return exc.exit_code
    if isinstance(result, list) and any(getattr(r, "outcome", "") == "failed" for r in result):
        args.finals_failed = True  # the leaderboard still runs; the sweep then exits 1
    return _exit_code(result)


def _stage_leaderboard(spec: SweepSpec, args: argparse.Namespace, storage: Any) -> int:
    board = _optional("sweeps.results.leaderboard", "run_leaderboard")
    if board is None:
        return 0
    ref: StorageRef | None = getattr(args, "storage_ref", None)
    extra = _accepted(
        board, spec=spec, storage_url=ref.shown if ref is not None else None, wandb=True
    )
    return _exit_code(board(Path(args.out), storage, **extra))


STAGES: tuple[Stage, ...] = (
    Stage("tune", ("all", "tune"), _stage_tune),
    Stage("final", ("all", "final"), _stage_final),
    Stage("leaderboard", ("all", "final"), _stage_leaderboard),
)


def _check_tunable(spec: SweepSpec) -> None:
    if not spec.base.data.val_fraction:
        raise UserError(
            "base.data.val_fraction is 0: tuning needs a validation split to score trials "
            "(e.g. 0.1); the test set is kept for the final runs"
        )


def _open(args: argparse.Namespace, spec: SweepSpec) -> tuple[StorageRef, Any]:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    _check_tunable(spec)
    ref = resolve_storage(args.storage, Path(args.out))
    return ref, open_storage(ref, heartbeat_stale_trial_callback=make_stale_callback())


def check_same_sweep(spec: SweepSpec, out: Path) -> None:
    """Refuse (exit 2, nothing touched) to run into a folder that holds another sweep.

    Rerunning the same command resumes; a spec that differs beyond :data:`RERUN_MAY_CHANGE`
    is another sweep, and its trials must not join the studies of the one already there.
    """
    from sweeps.spec import load_sweep_spec

    path = Path(out) / SPEC_FILE
    if not path.is_file():
        return
    try:
        before = load_sweep_spec(path).to_dict()
    except UserError as exc:
        raise UserError(
            f"{path} cannot be read ({exc}); move it away only if {out} holds no sweep of yours"
        ) from None
    found = first_difference(before, spec.to_dict(), ignore=RERUN_MAY_CHANGE)
    if found is not None:
        key, old, new = found
        raise UserError(
            f"{out} holds sweep '{before.get('name')}' launched with {key} = {old!r}, not "
            f"{new!r}; rerun with the same spec to resume it, or choose another --out"
        )


def run_sweep(spec: SweepSpec, args: argparse.Namespace) -> int:
    """``msam sweep``: open (and check) the storage, then run the requested stages in order."""
    args.out = Path(args.out)
    check_same_sweep(spec, args.out)
    ref, storage = _open(args, spec)
    args.storage_ref = ref
    stage = getattr(args, "stage", "all") or "all"
    for step in STAGES:
        if stage in step.stages:
            code = step.run(spec, args, storage)
            if code:
                return code
    if getattr(args, "finals_failed", False):
        print("some final runs failed; rerun the same command to retry them", flush=True)
        return 1
    return 0


def write_spec(spec: SweepSpec, out: Path) -> Path:
    """``<out>/spec.yaml``: the resolved spec as launched (workers read this very file)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / SPEC_FILE
    path.write_text(yaml.safe_dump(spec.to_dict(), sort_keys=False))
    return path


def tune(spec: SweepSpec, args: argparse.Namespace, storage: Any) -> int:
    """The tuning stage: studies, workers, live view, and the best trial per optimizer."""
    out = Path(args.out)
    ref: StorageRef = getattr(args, "storage_ref", None) or resolve_storage(args.storage, out)
    spec_path = write_spec(spec, out)
    ensure_studies(spec, storage)
    for opt in spec.optimizers:  # trials left RUNNING by a sweep that died
        reap_lost_trials(load_study(spec, opt, storage), ownerless_grace_s=LAUNCH_OWNERLESS_GRACE_S)
    slots = plan_slots(args.workers, args.gpus, args.per_gpu)
    view_storage = open_storage(ref)
    print(
        f"sweep {spec.name}: {len(spec.optimizers)} optimizers x {spec.budget.trials} trials, "
        f"{len(slots)} worker(s), storage {ref.shown}, run folder {out}",
        flush=True,
    )
    if len(slots) == 1 and slots[0].gpu is None:
        _set_threads()
        code = _tune_in_process(spec, storage, view_storage, out)
    else:
        code = _tune_with_pool(spec, storage, view_storage, out, slots, spec_path, ref)
    counts = snapshot(spec, storage)
    from rich.console import Console

    console = Console()
    console.print(best_table(spec.name, counts))
    overhead = _overhead_line(spec, storage)
    if overhead:
        print(overhead, flush=True)
    if code == 0 and any(not c.done for c in counts):
        print(
            "some studies did not reach their budget; rerun the same command to resume", flush=True
        )
        return 1
    return code


def _tune_in_process(spec: SweepSpec, storage: Any, view_storage: Any, out: Path) -> int:
    with LiveView(spec, view_storage) as view, InterruptGuard() as guard:
        try:
            return Worker(spec, storage, out, index=0, guard=guard, say=view.say).run()
        except Interrupted as exc:
            view.say("interrupted: running trials failed as 'interrupted'; rerun to resume")
            return exc.exit_code
        except KeyboardInterrupt:
            return 130


def _tune_with_pool(
    spec: SweepSpec,
    storage: Any,
    view_storage: Any,
    out: Path,
    slots: list[Slot],
    spec_path: Path,
    ref: StorageRef,
) -> int:
    pool = WorkerPool(slots, spec_path, ref.arg, out)
    with LiveView(spec, view_storage) as view, InterruptGuard(on_signal=pool.stop) as guard:
        pool.start()
        codes = pool.wait(tick=lambda: None)
        for opt in spec.optimizers:  # trials of workers that were killed
            reap_lost_trials(load_study(spec, opt, storage))
        if guard.signum is not None:
            view.say("interrupted: running trials failed as 'interrupted'; rerun to resume")
            return guard.exit_code or 130
        for index, code in codes.items():
            if code != 0:  # the others carried on; tune() judges by the studies' budgets
                view.say(
                    f"worker {index} exited with status {code}; see {pool.log_path(Slot(index))}"
                )
    return 0


def _overhead_line(spec: SweepSpec, storage: Any) -> str | None:
    """Mean time per trial spent outside training (sampling, storage, W&B)."""
    rows = []
    for opt in spec.optimizers:
        for trial in load_study(spec, opt, storage).get_trials(deepcopy=False):
            seconds = trial.user_attrs.get("seconds")
            if isinstance(seconds, dict) and "overhead" in seconds:
                rows.append(seconds)
    if not rows:
        return None
    overhead = [r["overhead"] for r in rows]
    train = statistics.mean(r["train"] for r in rows)
    return (
        "sweep overhead per trial (sampling, storage, W&B): "
        f"mean {statistics.mean(overhead):.3f} s, median {statistics.median(overhead):.3f} s, "
        f"max {max(overhead):.3f} s; "
        f"training {train:.2f} s per trial; {len(rows)} trials"
    )


def _set_threads() -> None:
    import torch

    torch.set_num_threads(worker_threads())


def _default_worker_index() -> int:
    """A worker started by hand gets a seed offset of its own (host and pid), not 0."""
    return 1000 + zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode()) % 1_000_000


def run_worker(spec: SweepSpec, args: argparse.Namespace) -> int:
    """``msam worker``: run trials of a sweep's studies until every study has its budget."""
    args.out = Path(args.out)
    check_same_sweep(spec, args.out)
    _, storage = _open(args, spec)
    _set_threads()
    index = getattr(args, "worker_index", None)
    index = _default_worker_index() if index is None else index
    ensure_studies(spec, storage)
    with InterruptGuard() as guard:
        try:
            worker = Worker(
                spec,
                storage,
                args.out,
                index=index,
                guard=guard,
                say=lambda m: print(m, flush=True),
            )
            return worker.run()
        except Interrupted as exc:
            print("interrupted: running trial failed as 'interrupted'", flush=True)
            return exc.exit_code
        except KeyboardInterrupt:
            return 130
