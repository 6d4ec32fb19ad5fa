"""Files cut short: a torn journal tail (a writer stopped mid-write) loses no earlier trial and
does not poison later writes; a dead trial's truncated or corrupt checkpoint is ignored with a
warning and its retry starts over; a checkpoint of another config is never resumed."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
from helpers.sweep import check_exact, finished_states, rerun
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from msam.trainer import run_train
from sweeps.engine.lifecycle import ensure_studies
from sweeps.spec import load_sweep_spec
from sweeps.storage import open_storage, repair_journal, resolve_storage
from sweeps.studies import open_study

RECORD = b'{"op_code":0,"worker_id":"w","study_name":"s","directions":[1]}\n'


@pytest.mark.parametrize(
    ("tail", "kept"),
    [
        (b"", 2),  # whole: untouched
        (b'{"op_code":5,"worker_id":"w","trial_id":1,"us', 2),  # cut mid-record
        (b'{"op_code":5,"worker_id":"w","trial_id":1,"us\n', 2),  # cut, then a newline
        (b"\x00\x00\x00\x00", 2),  # a block of zeros after a crash
    ],
)
def test_repair_journal_keeps_every_complete_record(tmp_path, tail, kept):
    path = tmp_path / "optuna.journal"
    path.write_bytes(RECORD * 2 + tail)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert repair_journal(path) == len(tail)
    assert path.read_bytes() == RECORD * kept
    (aside,) = tmp_path.glob("optuna.journal.torn-*") if tail else [None]
    if tail:
        assert aside.read_bytes() == tail and "torn record" in str(caught[0].message)
    else:
        assert not caught


def test_a_torn_journal_tail_loses_no_earlier_trial(
    tmp_path, write_spec, read_trials, recwarn, env
):
    optimizers = ["sgd", "sam"]
    spec = write_spec(optimizers=optimizers, budget={"trials": 2}, base={"train": {"epochs": 1}})
    out = tmp_path / "run"
    # In a process of its own: the writer of a torn record is gone, as a killed worker would be
    # (the cut record is the last trial's ending, so that trial is then lost and redone).
    command = [sys.executable, "-m", "sweeps.cli", "sweep", str(spec), "--out", str(out)]
    done = subprocess.run([*command, "--stage", "tune"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    journal = out / "optuna.journal"
    data = journal.read_bytes()
    last = data.rstrip(b"\n").rfind(b"\n") + 1
    journal.write_bytes(data[: last + (len(data) - last) // 2])  # the last record cut in half
    # what the torn journal still holds, read as Optuna reads it (no repair)
    torn = read_trials(JournalStorage(JournalFileBackend(str(journal))), "tiny", optimizers)
    kept = {(o, t.number): t for o, ts in torn.items() for t in ts if t.state in finished_states()}
    assert len(kept) >= 3  # the cut took one record, so at most one trial's ending

    assert rerun(spec, out, "--workers", "2") == 0  # writes go on after the torn record
    assert any("torn record" in str(w.message) for w in recwarn)
    after = read_trials(journal, "tiny", optimizers)  # and the journal reads back whole
    check_exact(after, 2)
    for (opt, number), trial in kept.items():
        again = after[opt][number]
        assert (again.state, again.value, again.params) == (trial.state, trial.value, trial.params)
    assert len(list(out.glob("optuna.journal.torn-*"))) == 1


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other config"])
def test_a_dead_trials_bad_checkpoint_is_not_resumed(
    tmp_path, write_spec, read_trials, recwarn, damage
):
    """The retry of a dead trial finds its checkpoint damaged (or from another config): it warns
    and trains from the first epoch, never from the bad file."""
    spec_path = write_spec(optimizers=["sgd"], budget={"trials": 1})
    spec = load_sweep_spec(spec_path)
    out = tmp_path / "run"
    dead_dir = out / "trials" / "sgd" / "7"
    cfg = spec.train_config("sgd", {"lr": 0.1 if damage != "other config" else 0.2})
    run_train(cfg, out_dir=dead_dir, verbose=False, evaluate_test=False, epochs=1)
    checkpoint = dead_dir / "checkpoint.pt"
    if damage == "truncated":
        checkpoint.write_bytes(checkpoint.read_bytes()[: checkpoint.stat().st_size // 2])
    elif damage == "garbage":
        checkpoint.write_bytes(b"\x80\x04not a checkpoint")
    storage = open_storage(resolve_storage(None, out))
    ensure_studies(spec, storage)
    study = open_study(storage, spec.name, "sgd")
    (baseline,) = study.get_trials(deepcopy=False)
    study._storage.set_trial_state_values(baseline._trial_id, TrialState.FAIL)  # it "died"
    study.enqueue_trial(
        {"lr": 0.1}, user_attrs={"origin": "retry", "retry_of": 0, "resume_from": str(dead_dir)}
    )

    assert rerun(spec_path, out) == 0
    expected = "written for another config" if damage == "other config" else "unreadable"
    assert any(expected in str(w.message) for w in recwarn)
    (redo,) = [t for t in read_trials(out / "optuna.journal", "tiny", ["sgd"])["sgd"] if t.number]
    assert redo.state in finished_states() and "resumed" not in redo.user_attrs
    history = (out / redo.user_attrs["trial_dir"] / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in history] == [1, 2]  # from the first epoch
