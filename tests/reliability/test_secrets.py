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

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml

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
        ("postgresql://u@x:pw@h/db", "postgresql://***@h/db"),  # where the user ends is unclear
        ("postgresql://p@ss@h/db", "postgresql://***@h/db"),
        ("postgresql://u:p w@h/db", "postgresql://u:***@h/db"),
        # a URL inside a message
        ("error at postgresql://u:p@ss@h/db: down", "error at postgresql://u:***@h/db: down"),
        ('tried "redis://:a@b@h:6379/0" twice', 'tried "redis://:***@h:6379/0" twice'),
    ],
)
def test_mask_url(url, shown):
    assert mask_url(url) == shown


def pieces_after_each_at(password: str) -> set[str]:
    """What of a password holding "@" a URL parser may take for the host, database or port."""
    pieces = set()
    for at in [i for i, char in enumerate(password) if char == "@"]:
        rest = password[at + 1 :]
        pieces |= {rest, *re.split(r"[/:@]", rest)}
    return pieces - {""}


@pytest.mark.parametrize("password", ["p@ss", "pa@ss@wo", "p@s/s", "pa@55:w0rd"])
def test_no_piece_of_a_password_with_an_at_reaches_a_message(
    tmp_path, write_spec, password, capsys
):
    """libpq reads ``u:p@ss@host`` as password "p" and host "ss@host", and says it cannot
    resolve "ss@host"; every piece of the password after each "@" stays hidden."""
    url = f"postgresql://u:{password}@nohost.invalid/db"
    assert main(["sweep", str(write_spec()), "--out", str(tmp_path / "run"), "--storage", url]) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and "cannot reach the database" in err, err
    words = re.split(r"""[\s"'()]+""", out + err)  # a piece shows as a word, or before an "@"
    for piece in pieces_after_each_at(password):
        assert piece not in words and f"{piece}@" not in out + err, (piece, err)
    assert password not in out + err
    assert not (tmp_path / "run").exists()


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


def test_sweep_storage_from_the_option_else_the_environment(
    tmp_path, write_spec, monkeypatch, capsys, read_trials
):
    """``msam sweep`` takes ``$MSAM_STORAGE`` when ``--storage`` is absent, and says so (masked),
    since the variable may have been set for another sweep."""
    spec = str(write_spec(optimizers=["sgd"], budget={"trials": 1}, base={"train": {"epochs": 1}}))
    out = tmp_path / "run"
    monkeypatch.setenv(STORAGE_ENV, f"postgresql://u:{PASSWORD}@127.0.0.1:1/from_env")
    assert main(["sweep", spec, "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert f"storage from ${STORAGE_ENV}: postgresql://u:***@127.0.0.1:1/from_env" in captured.out
    assert "postgresql://u:***@127.0.0.1:1/from_env" in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert not leaks((captured.out + captured.err).encode()) and not out.exists()

    elsewhere = tmp_path / "shared" / "optuna.journal"
    monkeypatch.setenv(STORAGE_ENV, str(elsewhere))
    assert main(["sweep", spec, "--out", str(out), "--stage", "tune"]) == 0
    assert f"storage from ${STORAGE_ENV}: {elsewhere}" in capsys.readouterr().out
    assert not (out / "optuna.journal").exists()
    assert len(read_trials(elsewhere, "tiny", ["sgd"])["sgd"]) == 1

    # --storage wins, and then nothing is said about the variable
    given = f"postgresql://u:{PASSWORD}@127.0.0.1:1/given"
    assert main(["sweep", spec, "--out", str(tmp_path / "other"), "--storage", given]) == 2
    captured = capsys.readouterr()
    assert "postgresql://u:***@127.0.0.1:1/given" in captured.err
    assert STORAGE_ENV not in captured.out + captured.err


#: A journal folder a user could create: HTML, a newline that starts a Markdown heading and a
#: YAML key, a terminal escape sequence and Unicode line and paragraph separators.
HOSTILE_DIR = "<script>alert(1)</script>\n# injected: true\n\x1b[31mred\u2028x\u2029y\x85z"


def test_a_hostile_storage_path_stays_text_in_the_leaderboard_and_tuned_files(tmp_path):
    from helpers.finals import NAME, make_sweep

    from msam.config import parse_train_config

    elsewhere = tmp_path / HOSTILE_DIR
    make_sweep(elsewhere)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "spec.yaml").write_bytes((elsewhere / "spec.yaml").read_bytes())
    journal = elsewhere / "optuna.journal"
    assert main(["leaderboard", str(run_dir), "--storage", str(journal)]) == 0

    board = (run_dir / "leaderboard.md").read_text(encoding="utf-8")
    assert "<script>" not in board and "&lt;script&gt;alert(1)&lt;/script&gt;" in board
    assert not [line for line in board.splitlines() if "injected" in line and line[0] == "#"]
    for char in "\x1b\u2028\u2029\x85":
        assert char not in board
    tuned = sorted((run_dir / "tuned").glob("*.yaml"))
    assert tuned
    for path in tuned:
        text = path.read_text(encoding="utf-8")
        header = text[: text.index("\nname:")]
        assert "storage: " in header and "alert(1)" in header
        assert all(line.startswith("# ") for line in header.splitlines()), header
        assert not any(char in text for char in "\x1b\u2028\u2029\x85")
        raw = yaml.safe_load(text)  # loads (YAML refuses control characters) to the config only
        assert "injected" not in raw
        parse_train_config(raw)
    assert NAME in board
