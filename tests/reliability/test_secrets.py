"""Secrets never leak: a password in the storage URL and ``WANDB_API_KEY`` appear in no terminal
output, no file of the run folder (logs, spec, W&B logs, leaderboard, report, tuned defaults,
trial and final folders) and no command line of the worker processes, which every user of a
machine can read in ``/proc/<pid>/cmdline``. Where the storage is named, it is masked.

The end-to-end check with two worker processes on PostgreSQL takes half a minute and is marked
slow. Fast tests cover it: the same sweep with one worker in this process (output and every file
of the run folder free of both secrets, the storage masked where named), the launcher handing the
storage over in the environment instead of the command line, and ``mask_url``.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from sweeps.cli import main
from sweeps.engine import launch
from sweeps.engine.launch import STORAGE_ENV, WorkerPool
from sweeps.layout import RunFolder
from sweeps.run import Slot
from sweeps.storage import mask_url

PASSWORD = "S3cret/Pw-123"  # a "/" is legal in a database URL's password
API_KEY = "fakeWandbApiKey" + "0" * 25  # W&B keys are 40 characters
SECRETS = (PASSWORD.encode(), API_KEY.encode())


def with_password(url: str) -> str:
    """``postgresql://postgres@host/db`` -> ``postgresql://postgres:<PASSWORD>@host/db``
    (the server trusts local connections, so it ignores the password)."""
    scheme, rest = url.split("://", 1)
    user, where = rest.split("@", 1)
    return f"{scheme}://{user}:{PASSWORD}@{where}"


def descendants(root: int) -> dict[int, bytes]:
    """Command lines of every living process below ``root``, by pid (empty for a process that
    has just ended)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process has just ended
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found: dict[int, bytes] = {}
    frontier = [root]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in found:
                try:
                    found[child] = Path(f"/proc/{child}/cmdline").read_bytes()
                except OSError:
                    continue
                frontier.append(child)
    return found


def leaks(data: bytes) -> list[str]:
    """The secrets found in ``data``."""
    return [s.decode() for s in SECRETS if s in data]


def read_tree(folder: Path, when: str) -> dict[str, bytes]:
    """Every file under ``folder`` (W&B logs, journals and checkpoints included), as bytes."""
    return {
        f"{path.relative_to(folder)} ({when})": path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u:a/b:c@h/db", "postgresql://u:***@h/db"),  # SQLAlchemy takes "a/b:c"
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),  # malformed: hide it all
        ("postgresql://u:p%40ss@h/db", "postgresql://u:***@h/db"),
        ("redis://:pw@h:6379/0", "redis://:***@h:6379/0"),
        (
            "postgresql://u@h/db?sslmode=require&password=pw",
            "postgresql://u@h/db?sslmode=require&password=***",
        ),
        ("postgresql://u@h:5432/db", "postgresql://u@h:5432/db"),
        ("runs/a:b@c/optuna.journal", "runs/a:b@c/optuna.journal"),
    ],
)
def test_mask_url(url, shown):
    assert mask_url(url) == shown


def test_launcher_hands_the_storage_over_in_the_environment(tmp_path, monkeypatch):
    url = "postgresql://u:" + PASSWORD + "@h/db"
    started: list[tuple[list[str], dict[str, str]]] = []
    monkeypatch.setattr(
        launch.subprocess, "Popen", lambda command, env, **_: started.append((command, env))
    )
    WorkerPool([Slot(0), Slot(1, gpu=0)], RunFolder(tmp_path), url).start()
    assert len(started) == 2
    for command, env in started:
        assert "worker" in command and "--storage" not in command
        assert not leaks("\0".join(command).encode())
        assert env[STORAGE_ENV] == url


def test_worker_storage_from_the_option_else_the_environment(
    tmp_path, write_spec, monkeypatch, capsys
):
    spec = str(write_spec())
    out = str(tmp_path / "run")
    monkeypatch.delenv(STORAGE_ENV, raising=False)
    assert main(["worker", spec, "--out", out]) == 2
    err = capsys.readouterr().err
    assert "required: --storage" in err and STORAGE_ENV in err

    # Nothing listens on port 1: the error names the storage that was used, masked.
    monkeypatch.setenv(STORAGE_ENV, f"postgresql://u:{PASSWORD}@127.0.0.1:1/from_env")
    assert main(["worker", spec, "--out", out]) == 2
    err = capsys.readouterr().err
    assert "postgresql://u:***@127.0.0.1:1/from_env" in err and not leaks(err.encode())
    given = f"postgresql://u:{PASSWORD}@127.0.0.1:1/given"
    assert main(["worker", spec, "--storage", given, "--out", out]) == 2
    err = capsys.readouterr().err
    assert "postgresql://u:***@127.0.0.1:1/given" in err and not leaks(err.encode())
    assert not (tmp_path / "run").exists()


def test_no_secret_in_the_output_or_files_of_a_one_worker_sweep(
    tmp_path, write_spec, pg_url, monkeypatch, capsys
):
    monkeypatch.setenv("WANDB_API_KEY", API_KEY)  # W&B stays offline: nothing goes out
    url = with_password(pg_url)
    run_dir = tmp_path / "run"
    spec = write_spec(
        optimizers=["msam"],
        base={"data": {"subset": 128}, "train": {"epochs": 1}},
        budget={"trials": 1},
        final={"seeds": 1},
    )
    assert main(["sweep", str(spec), "--out", str(run_dir), "--storage", url]) == 0
    captured = capsys.readouterr()
    places = {"msam sweep output": (captured.out + captured.err).encode()}
    places.update(read_tree(run_dir, "after msam sweep"))
    suffixes = {Path(place.split(" (")[0]).suffix for place in places}
    assert {".wandb", ".jsonl", ".yaml", ".md", ".json", ".html"} <= suffixes, suffixes
    leaked = {place: found for place, data in places.items() if (found := leaks(data))}
    assert not leaked
    masked = url.replace(PASSWORD, "***").encode()
    for name in ("leaderboard.md", "leaderboard.json", "tuned/tiny-msam.yaml"):
        assert masked in places[f"{name} (after msam sweep)"], name


@pytest.mark.slow
def test_no_secret_in_outputs_files_or_command_lines(
    tmp_path, write_spec, env, start_sweep, msam_cli, pg_url
):
    env["WANDB_API_KEY"] = API_KEY  # WANDB_MODE stays offline: nothing goes to the network
    url = with_password(pg_url)
    masked = url.replace(PASSWORD, "***")
    run_dir = tmp_path / "run"
    spec = write_spec(  # two trials, one per worker, and one final run: a few seconds each
        optimizers=["msam"],
        base={"data": {"subset": 128}, "train": {"epochs": 1}},
        budget={"trials": 2},
        final={"seeds": 1},
    )

    sweep = start_sweep(spec, "--out", run_dir, "--workers", 2, "--storage", url)
    captured: list[str] = []
    reader = threading.Thread(target=lambda: captured.append(sweep.stdout.read()), daemon=True)
    reader.start()
    cmdlines: dict[int, set[bytes]] = {}  # a process's command line changes when it execs
    while sweep.poll() is None:  # the workers live a few seconds: look often
        for pid, line in descendants(sweep.pid).items():
            cmdlines.setdefault(pid, set()).add(line)
        time.sleep(0.1)
    reader.join(timeout=30)
    sweep_output = "".join(captured)
    assert sweep.returncode == 0, sweep_output
    workers = [pid for pid, lines in cmdlines.items() if any(b"\0worker\0" in x for x in lines)]
    assert len(workers) == 2, cmdlines  # the launcher's own workers, seen while they ran
    after_sweep = read_tree(run_dir, "after msam sweep")

    with ThreadPoolExecutor(2) as pool:  # both only read the studies: run them side by side
        board_run = pool.submit(msam_cli, "leaderboard", run_dir, "--storage", url)
        worker_run = pool.submit(
            msam_cli, "worker", run_dir / "spec.yaml", "--storage", url, "--out", run_dir
        )
        board, joined = board_run.result(), worker_run.result()
    assert board.returncode == 0, board.stdout + board.stderr
    assert joined.returncode == 0, joined.stdout + joined.stderr  # a finished sweep: no work

    suffixes = {Path(place.split(" (")[0]).suffix for place in after_sweep}
    assert {".wandb", ".log", ".jsonl", ".yaml", ".md", ".json", ".html"} <= suffixes, suffixes
    assert len(list((run_dir / "logs").glob("worker-*.log"))) == 2
    places = {
        "msam sweep output": sweep_output.encode(),
        "msam leaderboard output": (board.stdout + board.stderr).encode(),
        "msam worker output": (joined.stdout + joined.stderr).encode(),
        **after_sweep,
        **read_tree(run_dir, "after msam leaderboard and msam worker"),
    }
    # Between fork and exec a child still shows its parent's command line, which holds the URL
    # as typed here: only what the children run with counts.
    typed = b"".join(str(arg).encode() + b"\0" for arg in sweep.args)
    for pid, lines in cmdlines.items():
        for n, line in enumerate(lines - {typed}):
            places[f"command line of pid {pid} ({n})"] = line
    leaked = {place: found for place, data in places.items() if (found := leaks(data))}
    assert not leaked

    # Where the storage is named, it is named masked.
    assert f"storage {masked}" in sweep_output
    tuned = [path.name for path in (run_dir / "tuned").glob("*.yaml")]
    assert tuned == ["tiny-msam.yaml"]
    for when in ("after msam sweep", "after msam leaderboard and msam worker"):
        for name in ("leaderboard.md", "leaderboard.json", "report.html", "tuned/tiny-msam.yaml"):
            assert masked.encode() in places[f"{name} ({when})"], (name, when)
