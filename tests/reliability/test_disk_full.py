"""A full disk (ENOSPC) is one line and exit 2, never a traceback: no ``*.tmp`` file and no half
line of ``metrics.jsonl`` is left behind, a trial that could not write fails with reason
"disk full" (its handler must not fail again writing error.txt) and the sweep stops, and once
space is freed a rerun (or ``msam train --resume``) carries on.

Most tests fill a simulated disk: ``open`` is wrapped so that writes under a folder get a given
number of bytes, write what fits and then raise ENOSPC, as the kernel does. The last ones mount
a real 4 MiB tmpfs (a test_resnet checkpoint is 3 MB, so the second one does not fit beside the
first); they are skipped, with the reason, where mounting is not permitted. The sweep on it (two
``msam sweep`` processes, the journal on the full disk too) takes 20 s and is marked slow; the
in-process trial test covers the same path fast.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
import yaml
from helpers.sweep import TINY_SPEC, check_exact, rerun
from optuna.trial import TrialState

from sweeps.cli import main

NO_WANDB = {"tracking": {"wandb": {"mode": "disabled"}}}
TRAIN = {"name": "tiny", **TINY_SPEC["base"], **NO_WANDB}


class _Disk:
    """Bytes still free; None for unlimited until a write to a file named ``*<trigger>``."""

    def __init__(self, free: int, trigger: str | None) -> None:
        self.free = free if trigger is None else None
        self.after_trigger = free
        self.trigger = trigger
        self.refused: list[str] = []


class _FileOnFullDisk:
    def __init__(self, fh, path: str, disk: _Disk) -> None:
        self._fh, self._path, self._disk = fh, path, disk

    def write(self, data):
        disk = self._disk
        room = len(data) if disk.free is None else min(len(data), disk.free)
        if room:
            self._fh.write(data[:room])
        if disk.free is not None:
            disk.free -= room
        if room < len(data):
            disk.refused.append(self._path)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)
        return room

    def __getattr__(self, name):
        return getattr(self._fh, name)

    def __iter__(self):
        return iter(self._fh)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._fh.close()


@contextlib.contextmanager
def full_disk(root: Path, free: int = 0, trigger: str | None = None) -> Iterator[_Disk]:
    """Files opened for writing under ``root`` share ``free`` bytes, from the first write to a
    file whose name ends with ``trigger`` when one is given (everything fits before it)."""
    real_open = io.open
    disk = _Disk(free, trigger)
    root = Path(root).resolve()

    def fake_open(file, mode="r", *args, **kwargs):
        fh = real_open(file, mode, *args, **kwargs)
        if isinstance(file, int) or not any(c in mode for c in "wax+"):
            return fh
        path = Path(os.fsdecode(file)).resolve()
        if root not in path.parents:
            return fh
        if disk.free is None and path.name.endswith(disk.trigger):
            disk.free = disk.after_trigger
        return _FileOnFullDisk(fh, str(path), disk)

    with mock.patch("builtins.open", fake_open), mock.patch("io.open", fake_open):
        yield disk


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.tmp"))


def one_error_line(err: str) -> str:
    """The one ``error:`` line that ends stderr (after any epoch lines of the run), with no
    traceback."""
    lines = err.splitlines()
    assert lines and lines[-1].startswith("error: ") and err.endswith("\n"), err
    assert "Traceback" not in err and sum(line.startswith("error") for line in lines) == 1, err
    return lines[-1]


def whole_lines(path: Path) -> list[dict]:
    text = path.read_text()
    assert text == "" or text.endswith("\n"), text[-80:]
    return [json.loads(line) for line in text.splitlines()]


@pytest.fixture
def train_config(tmp_path) -> Path:
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(TRAIN, sort_keys=False))
    return path


@pytest.mark.parametrize(
    ("free", "refused", "epochs"),
    [(2_000_000, "checkpoint.pt.tmp", [1]), (40, "metrics.jsonl", [])],
    ids=["checkpoint", "metrics"],
)
def test_msam_train_on_a_full_disk(tmp_path, train_config, capsys, free, refused, epochs):
    out = tmp_path / "run"
    with full_disk(out, free) as disk:
        code = main(["train", str(train_config), "--out", str(out)])
    err = one_error_line(capsys.readouterr().err)
    assert code == 2 and disk.refused and disk.refused[0].endswith(refused)
    assert "disk full" in err and str(out) in err
    assert leftovers(out) == []
    # whole lines only: a line the disk took half of is cut back
    assert [m["epoch"] for m in whole_lines(out / "metrics.jsonl")] == epochs
    assert not (out / "summary.json").exists()

    # with space again, the run resumes
    assert main(["train", str(train_config), "--out", str(out), "--resume"]) == 0
    assert [m["epoch"] for m in whole_lines(out / "metrics.jsonl")] == [1, 2]
    assert leftovers(out) == []


def test_a_trial_on_a_full_disk_fails_as_disk_full_and_the_rerun_redoes_it(
    tmp_path, write_spec, read_trials, capsys
):
    """The trial's checkpoint and then its error.txt are refused: the trial fails with reason
    "disk full", its point is enqueued again, the sweep stops with one line (every later trial
    would fail alike), and the rerun on a disk with space again redoes the same point."""
    spec = write_spec(optimizers=["sgd"], budget={"trials": 2}, base=NO_WANDB)
    out = tmp_path / "run"
    with full_disk(out / "trials", trigger=".pt.tmp") as disk:
        code = rerun(spec, out)
    err = one_error_line(capsys.readouterr().err)
    assert code == 2 and "disk full" in err
    assert any(p.endswith("error.txt") for p in disk.refused)  # the handler met it too
    assert leftovers(out) == []

    trials = read_trials(out / "optuna.journal", "tiny", ["sgd"])["sgd"]
    full = trials[0]
    assert full.state == TrialState.FAIL and full.user_attrs["reason"] == "disk full"
    assert [t.state for t in trials[1:]] == [TrialState.WAITING]
    assert trials[1].user_attrs["retry_of"] == full.number

    assert rerun(spec, out) == 0
    trials = read_trials(out / "optuna.journal", "tiny", ["sgd"])
    check_exact(trials, 2)
    retry = trials["sgd"][1]
    assert retry.state == TrialState.COMPLETE and retry.params == full.params
    assert leftovers(out) == []


def test_atomic_write_on_a_full_disk_keeps_the_old_file(tmp_path):
    from msam.files import DiskFullError, atomic_write

    target = atomic_write(tmp_path / "summary.json", "old\n")
    with full_disk(tmp_path, 3), pytest.raises(DiskFullError) as caught:
        atomic_write(target, "a new and longer text\n")
    assert isinstance(caught.value, OSError) and caught.value.errno == errno.ENOSPC
    assert "\n" not in str(caught.value) and str(target) in str(caught.value)
    assert target.read_text() == "old\n" and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- a real full disk


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 4 MiB tmpfs (``remount(size)`` frees space), unmounted at the end."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _remount(disk: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(disk)], check=True)


def test_msam_train_on_a_real_full_disk(small_disk, train_config, msam_cli):
    out = small_disk / "run"
    done = msam_cli("train", train_config, "--out", out)
    assert done.returncode == 2, done.stdout + done.stderr
    one_error_line(done.stderr)
    assert "disk full" in done.stderr and leftovers(small_disk) == []
    assert [m["epoch"] for m in whole_lines(out / "metrics.jsonl")] == [1, 2]


@pytest.mark.slow
def test_a_sweep_on_a_real_full_disk_resumes_once_space_is_freed(
    small_disk, write_spec, msam_cli, read_trials
):
    spec = write_spec(optimizers=["sgd"], budget={"trials": 2}, base=NO_WANDB)
    out = small_disk / "run"
    done = msam_cli("sweep", spec, "--out", out, "--stage", "tune")
    assert done.returncode == 2, done.stdout + done.stderr
    one_error_line(done.stderr)
    assert "disk full" in done.stderr and leftovers(small_disk) == []

    _remount(small_disk, "64m")
    done = msam_cli("sweep", spec, "--out", out, "--stage", "tune")
    assert done.returncode == 0, done.stdout + done.stderr
    check_exact(read_trials(out / "optuna.journal", "tiny", ["sgd"]), 2)
    assert leftovers(small_disk) == []
