"""The sweep engine: ``msam sweep`` (launch and supervise) and ``msam worker`` (join).

A sweep runs its stages in order: ``tune`` (one Optuna study per optimizer, equal budgets, workers
sharing the storage), ``final`` (the best configurations over paired seeds, ``sweeps.finals``),
then ``publish`` (leaderboard, report, tuned defaults, ``sweeps.results.publish``). Rerunning the
same command resumes: finished trials stay, trials of vanished workers are failed and redone, and
every study ends with exactly its budget of finished trials. SGD vs SAM (Foret et al., 2021) vs
mSAM (Behdin et al., 2023) is the comparison served.
"""

from __future__ import annotations

import os
import socket
import statistics
import warnings
import zlib
from pathlib import Path
from typing import Any

import yaml

from msam.config import first_difference
from msam.errors import UserError
from msam.files import atomic_write, read_json, write_json
from sweeps.engine.folder_lock import launcher_lock
from sweeps.engine.launch import WorkerPool, worker_threads
from sweeps.engine.lifecycle import (
    ensure_studies,
    hung_workers,
    make_stale_callback,
    reap_lost_trials,
    trial_timeout_s,
)
from sweeps.engine.live import LiveView, best_table, snapshot
from sweeps.engine.signals import Interrupted, InterruptGuard
from sweeps.engine.worker import Worker
from sweeps.finals import run_finals
from sweeps.layout import RunFolder
from sweeps.results import publish
from sweeps.results.read import load_sweep
from sweeps.run import SweepRun
from sweeps.spec import SweepSpec, load_sweep_spec
from sweeps.storage import open_storage
from sweeps.studies import open_study

__all__ = [
    "RERUN_MAY_CHANGE",
    "check_same_studies",
    "check_same_sweep",
    "run_sweep",
    "run_worker",
    "tune",
    "write_spec",
]

#: Settings a rerun may change without starting another sweep: a larger or smaller budget, how
#: long a trial may go without progress, the final stage, tracking, and where data and device
#: live on this machine. Anything else (the model, the data, the search space, the sampler...)
#: would mix two sweeps in one run folder. Specs recorded before ``budget.trial_timeout``
#: existed lack it, and still rerun.
RERUN_MAY_CHANGE = (
    "budget.trials",
    "budget.trial_timeout",
    "final",
    "base.tracking",
    "base.data.root",
    "base.train.device",
)
#: At launch, a RUNNING trial whose worker never named itself is lost after this many seconds.
LAUNCH_OWNERLESS_GRACE_S = 30


def _refuse_another_spec(
    recorded: dict[str, Any], spec: SweepSpec, holder: str, advice: str
) -> None:
    """UserError naming the first key beyond :data:`RERUN_MAY_CHANGE` where ``spec`` differs
    from the ``recorded`` one."""
    found = first_difference(recorded, spec.to_dict(), ignore=RERUN_MAY_CHANGE)
    if found is not None:
        key, old, new = found
        raise UserError(f"{holder} launched with {key} = {old!r}, not {new!r}; {advice}")


def check_same_sweep(spec: SweepSpec, folder: RunFolder) -> None:
    """Refuse (exit 2, nothing touched) to run into a folder that holds another sweep.

    Rerunning the same command resumes; a spec that differs beyond :data:`RERUN_MAY_CHANGE`
    is another sweep, and its trials must not join the studies of the one already there.
    """
    path = folder.spec
    if not path.is_file():
        return
    try:
        before = load_sweep_spec(path).to_dict()
    except UserError as exc:
        raise UserError(
            f"{path} cannot be read ({exc}); move it away only if {folder.root} holds no sweep "
            "of yours"
        ) from None
    _refuse_another_spec(
        before,
        spec,
        f"{folder.root} holds sweep '{before.get('name')}'",
        "rerun with the same spec to resume it, or choose another --out",
    )


def check_same_storage(run: SweepRun) -> None:
    """Refuse (exit 2) a launcher naming another storage than the one the run folder's studies
    live in (``storage.json``): with ``MSAM_STORAGE`` set for another sweep, or a forgotten
    ``--storage``, a rerun would start its studies afresh elsewhere instead of resuming."""
    recorded = read_json(run.folder.storage_record)
    if not recorded or "kind" not in recorded:
        return
    own_journal = run.folder.journal.resolve()

    def where(kind: str, shown: str) -> str:
        if kind != "journal":
            return shown
        path = Path(shown).resolve()
        return "the run folder's journal" if path == own_journal else str(path)

    before = where(str(recorded["kind"]), str(recorded.get("shown", "")))
    now = where(run.storage.kind, run.storage.shown)
    moved = recorded["kind"] == "journal" and now == "the run folder's journal"  # copied folder
    if before != now and not moved:
        raise UserError(
            f"{run.out}: this sweep's studies live in {before}, but this command names {now}; "
            "pass the same --storage (or unset MSAM_STORAGE) to resume it, or choose another --out"
        )


def check_same_studies(run: SweepRun, storage: Any) -> None:
    """Refuse (exit 2, nothing touched) a launcher or worker whose spec differs, beyond
    :data:`RERUN_MAY_CHANGE`, from the spec that created the sweep's studies in ``storage``:
    its trials would train another model or search another space inside the same studies.
    Studies made before the spec was recorded are not checked."""
    spec = run.spec
    for optimizer in spec.optimizers:
        study = open_study(storage, spec.name, optimizer)
        recorded = study.user_attrs.get("spec") if study is not None else None
        if not isinstance(recorded, dict):
            continue
        _refuse_another_spec(
            recorded,
            spec,
            f"study {study.study_name} in {run.storage.shown} belongs to a sweep",
            "join it with that sweep's spec.yaml",
        )


def _open(run: SweepRun) -> Any:
    """Check the run folder and the spec, then open the storage (errors exit 2 before work)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    check_same_sweep(run.spec, run.folder)
    if not run.spec.base.data.val_fraction:
        raise UserError(
            "base.data.val_fraction is 0: tuning needs a validation split to score trials "
            "(e.g. 0.1); the test set is kept for the final runs"
        )
    storage = open_storage(run.storage, heartbeat_stale_trial_callback=make_stale_callback())
    check_same_studies(run, storage)
    return storage


def run_sweep(run: SweepRun) -> int:
    """``msam sweep``: open (and check) the storage, hold the run folder (one launcher at a
    time; ``msam worker`` may still join), then run the requested stages in order."""
    check_same_storage(run)
    storage = _open(run)
    with launcher_lock(run.folder):
        return _run_stages(run, storage)


def _warn_tuning_incomplete(run: SweepRun, storage: Any) -> None:
    """``--stage final`` before every study has its budget: the finals use the best so far."""
    short = [c for c in snapshot(run.spec, storage) if not c.done]
    if short:
        which = ", ".join(f"{c.optimizer} {c.finished}/{c.budget}" for c in short)
        warnings.warn(
            f"tuning is not complete ({which} trials finished): the finals use the best trials "
            "so far, and a later rerun that finds better ones replaces them",
            stacklevel=2,
        )


def _run_stages(run: SweepRun, storage: Any) -> int:
    if run.stage == "final":
        _warn_tuning_incomplete(run, storage)
    if run.stage in ("all", "tune"):
        code = tune(run, storage)
        if code:
            return code
    if run.stage == "tune":
        return 0
    failed = 0
    if run.spec.final.seeds > 0:
        # Ctrl-C / SIGTERM: the running final keeps its checkpoint for the rerun.
        with InterruptGuard() as guard:
            try:
                with guard.raising():
                    failed = len(run_finals(run, storage).failed)
            except Interrupted as exc:
                print("interrupted: the final stage stopped; rerun to resume it", flush=True)
                return exc.exit_code
    results = load_sweep(run.out, storage, spec=run.spec, storage_url=run.storage.shown)
    publish(results, wandb=True)
    if failed:
        print("some final runs failed; rerun the same command to retry them", flush=True)
        return 1
    return 0


def write_spec(spec: SweepSpec, folder: RunFolder) -> None:
    """``<out>/spec.yaml``: the resolved spec as launched (workers read this very file)."""
    folder.root.mkdir(parents=True, exist_ok=True)
    atomic_write(folder.spec, yaml.safe_dump(spec.to_dict(), sort_keys=False))


def tune(run: SweepRun, storage: Any) -> int:
    """The tuning stage: studies, workers, live view, and the best trial per optimizer."""
    spec = run.spec
    write_spec(spec, run.folder)
    write_json(run.folder.storage_record, {"kind": run.storage.kind, "shown": run.storage.shown})
    ensure_studies(spec, storage)
    for opt in spec.optimizers:  # trials left RUNNING by a sweep that died, or hung
        study = open_study(storage, spec.name, opt)
        timeout_s = trial_timeout_s(spec, study)
        reap_lost_trials(study, ownerless_grace_s=LAUNCH_OWNERLESS_GRACE_S, timeout_s=timeout_s)
    view_storage = open_storage(run.storage)
    print(
        f"sweep {spec.name}: {len(spec.optimizers)} optimizers x {spec.budget.trials} trials, "
        f"{len(run.slots)} worker(s), storage {run.storage.shown}, run folder {run.out}",
        flush=True,
    )
    if run.in_process:
        _set_threads()
        code = _tune_in_process(spec, storage, view_storage, run.out)
    else:
        code = _tune_with_pool(run, storage, view_storage)
    counts = snapshot(spec, storage)
    from rich.console import Console

    Console().print(best_table(spec.name, counts))
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


def _reap(spec: SweepSpec, studies: list[Any]) -> dict[int, str]:
    """Fail and redo the trials of workers that died or hung (the workers do it too, but all of
    them may hang); the hung workers of this machine, ``{pid: which trial timed out}``."""
    for study in studies:
        reap_lost_trials(study, timeout_s=trial_timeout_s(spec, study))
    return hung_workers(studies)


def _tune_with_pool(run: SweepRun, storage: Any, view_storage: Any) -> int:
    pool = WorkerPool(run.slots, run.folder, run.storage.arg)
    studies = [open_study(storage, run.spec.name, opt) for opt in run.spec.optimizers]
    with LiveView(run.spec, view_storage) as view, InterruptGuard(on_signal=pool.stop) as guard:
        pool.start()
        codes = pool.wait(tick=lambda: None, watch=lambda: _reap(run.spec, studies))
        _reap(run.spec, studies)  # trials of workers that were killed
        if guard.signum is not None:
            view.say("interrupted: running trials failed as 'interrupted'; rerun to resume")
            return guard.exit_code or 130
        for index, code in codes.items():
            log = run.folder.worker_log(index)
            if index in pool.stopped_hung:  # its trial was redone by another worker
                why = pool.stopped_hung[index]
                view.say(f"worker {index} hung ({why}); stopped it (status {code}); see {log}")
            elif code != 0:  # the others carried on; tune() judges by the studies' budgets
                view.say(f"worker {index} exited with status {code}; see {log}")
    return 0


def _overhead_line(spec: SweepSpec, storage: Any) -> str | None:
    """Mean time per trial spent outside training (sampling, storage, W&B)."""
    rows = []
    for opt in spec.optimizers:
        for trial in open_study(storage, spec.name, opt).get_trials(deepcopy=False):
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


def run_worker(run: SweepRun) -> int:
    """``msam worker``: run trials of a sweep's studies until every study has its budget."""
    storage = _open(run)
    _set_threads()
    index = _default_worker_index() if run.worker_index is None else run.worker_index
    ensure_studies(run.spec, storage)
    with InterruptGuard() as guard:
        try:
            worker = Worker(
                run.spec,
                storage,
                run.out,
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
