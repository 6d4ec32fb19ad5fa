"""A torn record in the middle of a journal: a writer killed mid-append (or a full disk) leaves a
record without its newline while other workers go on writing. The next append must not be glued
onto it, a line glued by a writer that does not know better (an older msam, a plain Optuna tool)
gives its complete record back, and every reader (a sweep that opened the journal before the
tear, ``msam leaderboard``, a rerun) reads every complete record, numbered the same way.
"""

from __future__ import annotations

import json
import warnings

import optuna
from helpers.sweep import check_exact, finished_states, rerun
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileSymlinkLock

from sweeps.storage import JournalFile, open_storage, repair_journal, resolve_storage

#: What a worker killed mid-append leaves: a record cut short, no newline.
TORN = b'{"op_code": 8, "worker_id": "dead-wor'
RECORD = {"op_code": 0, "worker_id": "w", "study_name": "s", "directions": [1]}


def line(record: dict) -> bytes:
    return json.dumps(record, separators=(",", ":")).encode() + b"\n"


def tear(journal) -> None:
    """Append a torn record under the journal's lock, as a writer that died mid-write would."""
    lock = JournalFileSymlinkLock(str(journal))
    lock.acquire()
    try:
        with open(journal, "ab") as fh:
            fh.write(TORN)
    finally:
        lock.release()


def finished(trials: dict) -> dict:
    return {
        (opt, t.number): (t.state, t.value, t.params)
        for opt, ts in trials.items()
        for t in ts
        if t.state in finished_states()
    }


def test_a_torn_record_mid_journal_loses_no_trial(tmp_path, write_spec, read_trials, msam_cli):
    optimizers = ["sgd", "sam"]
    spec = write_spec(optimizers=optimizers, budget={"trials": 1}, base={"train": {"epochs": 1}})
    out = tmp_path / "run"
    journal = out / "optuna.journal"
    assert rerun(spec, out) == 0
    before = finished(read_trials(journal, "tiny", optimizers))
    assert len(before) == 2

    # A worker that opened the journal before the tear goes on writing after it.
    live = open_storage(resolve_storage(str(journal), out))
    study = optuna.load_study(study_name="tiny/sgd", storage=live)
    tear(journal)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trial = study.ask()
        trial.set_user_attr("note", "written after the tear")
        study.tell(trial, 0.25)
    assert TORN + b"\n" in journal.read_bytes()  # the tear ended, not glued to the next record

    board = msam_cli("leaderboard", out)
    assert board.returncode == 0, board.stdout + board.stderr
    assert "Traceback" not in board.stderr
    assert rerun(spec, out, "--set", "budget.trials=2") == 0

    after = read_trials(journal, "tiny", optimizers)
    check_exact(after, 2)
    assert before.items() <= finished(after).items()  # every earlier trial as it was
    told = after["sgd"][trial.number]
    assert told.value == 0.25 and told.user_attrs["note"] == "written after the tear"
    # The worker that read across the tear numbers the records as a fresh reader does.
    fresh = open_storage(resolve_storage(str(journal), out))
    for opt in optimizers:
        name = f"tiny/{opt}"
        seen = optuna.load_study(study_name=name, storage=live).get_trials(deepcopy=False)
        again = optuna.load_study(study_name=name, storage=fresh).get_trials(deepcopy=False)
        assert [(t.number, t.state, t.params) for t in seen] == [
            (t.number, t.state, t.params) for t in again
        ]


def test_a_record_glued_onto_a_torn_one_is_recovered(tmp_path, recwarn):
    journal = tmp_path / "optuna.journal"
    storage = open_storage(resolve_storage(str(journal), tmp_path))
    study = optuna.create_study(study_name="s", storage=storage)
    for value in (0.1, 0.2):
        study.tell(study.ask(), value)
    # A writer that knows nothing of tears: its next record is glued onto the torn one.
    plain = JournalStorage(JournalFileBackend(str(journal)))
    glued = optuna.load_study(study_name="s", storage=plain)
    trial = glued.ask()
    tear(journal)
    glued.tell(trial, 0.3)
    assert TORN + b'{"op_code"' in journal.read_bytes()  # glued, on one line

    for reader in (storage, open_storage(resolve_storage(str(journal), tmp_path))):
        trials = optuna.load_study(study_name="s", storage=reader).get_trials()
        assert [(t.number, t.state, t.value) for t in trials] == [
            (0, optuna.trial.TrialState.COMPLETE, 0.1),
            (1, optuna.trial.TrialState.COMPLETE, 0.2),
            (2, optuna.trial.TrialState.COMPLETE, 0.3),
        ]
    assert any("torn record" in str(w.message) for w in recwarn)
    assert repair_journal(journal) == 0  # a line holding a complete record is not cut


def test_an_unfinished_last_line_waits_for_its_writer(tmp_path):
    """A reader never fails on, nor skips, a last line that is still being written."""
    journal = tmp_path / "optuna.journal"
    second = {**RECORD, "study_name": "t"}
    journal.write_bytes(line(RECORD) + line(second)[:20])
    backend = JournalFile(str(journal))
    assert list(backend.read_logs(0)) == [RECORD]
    with open(journal, "ab") as fh:
        fh.write(line(second)[20:])
    assert list(backend.read_logs(1)) == [second]


def test_damaged_lines_keep_the_numbers_of_later_records(tmp_path, recwarn):
    """Bad lines count for nothing: reading from record n (as Optuna does after each sync)
    gives what a reader from the start gives at position n."""
    records = [{**RECORD, "study_name": f"s{i}"} for i in range(5)]
    journal = tmp_path / "optuna.journal"
    journal.write_bytes(
        line(records[0])
        + TORN
        + b"\n"  # a torn record, ended by the next writer
        + b"\x00\x00\x00\n"  # zeros after a crash
        + line(records[1])
        + TORN
        + line(records[2])  # glued by a plain writer
        + line(records[3])[:-1]
        + line(records[4])  # a whole record whose newline was lost
    )
    assert list(JournalFile(str(journal)).read_logs(0)) == records
    backend = JournalFile(str(journal))
    read = [list(backend.read_logs(start)) for start in range(len(records) + 1)]
    assert read == [records[n:] for n in range(len(records) + 1)]
    # one warning for each damaged line, however often and by however many readers it is read
    torn = [str(w.message) for w in recwarn if "torn record" in str(w.message)]
    assert len(torn) == 4, torn
    assert sum("recovered" in message for message in torn) == 2


def test_an_append_after_a_tear_starts_on_a_new_line(tmp_path):
    journal = tmp_path / "optuna.journal"
    journal.write_bytes(line(RECORD) + TORN)
    JournalFile(str(journal)).append_logs([RECORD, RECORD])
    assert journal.read_bytes() == line(RECORD) + TORN + b"\n" + line(RECORD) * 2
    assert len(list(JournalFile(str(journal)).read_logs(0))) == 3
