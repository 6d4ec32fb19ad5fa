"""Every bad input to ``msam train``, ``msam sweep`` and ``msam worker`` exits with status 2 and
one ``error:`` line naming the problem, before any work starts: no traceback, no output, nothing
created, and an existing run folder left byte for byte (and mtime for mtime) as it was.

The matrix runs in process through ``sweeps.cli.main`` (an escaped exception fails the test as
surely as a traceback would); one case per command also runs as a real subprocess, where
warnings, logging and the exit status are the user's own.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from helpers import REPO
from helpers.sweep import TINY_SPEC, merge, snapshot

from sweeps.cli import main

PASSWORD = "s3cr3tpw"
PG_DOWN = f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/x"
REDIS_DOWN = f"redis://:{PASSWORD}@127.0.0.1:1/0"
#: A fixed, long-past mtime for the prior run's files, so a rewrite with equal bytes still shows.
OLD_MTIME_NS = 1_600_000_000 * 10**9

INF, NAN = float("inf"), float("nan")
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without CUDA")

GOOD_TRAIN: dict[str, Any] = {"name": "tiny", **copy.deepcopy(TINY_SPEC["base"])}

# `touch` through PyYAML's unsafe tags: a safe loader refuses them, an unsafe one runs them.
CODE_EXECUTION = '!!python/object/apply:os.system ["touch {tmp}/PWNED"]\n'
CODE_IN_A_VALUE = "name: !!python/object/apply:os.system ['touch {tmp}/PWNED']\n"

# Sources of the config file: a dict is merged into the good config, a str is the file's text
# ("{tmp}" is the test's folder), None means the file does not exist.
Source = dict[str, Any] | str | None

# (id, source, fragments of the error line[, pytest marks]).
# Cases that read the same for a train config and a sweep spec.
FILE_CASES: list[tuple[str, Source, list[str]]] = [
    ("broken-yaml", "name: t\ndata: {dataset: digits\nmodel: x\n", ["invalid YAML", ":3:6"]),
    ("empty-file", "", ["file is empty"]),
    ("only-comments", "# nothing here yet\n", ["file is empty"]),
    ("missing-file", None, ["no such file"]),
    ("not-a-mapping", "- sgd\n- sam\n", ["top level must be a mapping"]),
    ("code-execution", CODE_EXECUTION, ["invalid YAML", "python/object/apply:os.system"]),
    ("code-in-a-value", CODE_IN_A_VALUE, ["invalid YAML", "python/object/apply:os.system"]),
]

TRAIN_CASES: list[tuple[Any, ...]] = [
    *FILE_CASES,
    ("unknown-key", {"optim": {"rhoo": 0.1}}, ["unknown key 'optim.rhoo'", "did you mean 'rho'"]),
    ("unknown-section", {"trian": {}}, ["unknown key 'trian'", "did you mean 'train'"]),
    ("wrong-type", {"train": {"epochs": "ten"}}, ["train.epochs", "'ten'"]),
    ("wrong-type-section", {"optim": [0.1]}, ["optim: expected a mapping"]),
    ("negative-rho", {"optim": {"name": "sam", "rho": -0.1}}, ["optim.rho", "-0.1"]),
    (
        "micro-batches-do-not-divide",
        {"optim": {"name": "msam", "micro_batches": 3}},
        ["train.batch_size 64 is not divisible by optim.micro_batches 3"],
    ),
    ("unknown-optimizer", {"optim": {"name": "msma"}}, ["optim.name", "did you mean 'msam'"]),
    ("infinite-rho", {"optim": {"name": "sam", "rho": INF}}, ["optim.rho", "finite", "inf"]),
    ("not-a-number-lr", {"optim": {"lr": NAN}}, ["optim.lr", "(got nan)"]),
    ("unknown-base-optimizer", {"optim": {"base": "adamww"}}, ["did you mean 'adamw'"]),
    ("unknown-strategy", {"optim": {"strategy": "loops"}}, ["optim.strategy", "'loop'"]),
    (
        "cuda-only-strategy",
        {"optim": {"strategy": "graphed_loop"}},
        ["graphed_loop runs on CUDA only"],
    ),
    (
        "no-cuda-device",
        {"train": {"device": "cuda"}},
        ["train.device is cuda but no CUDA device is available"],
        NO_CUDA,
    ),
    ("unknown-model", {"model": {"name": "resnet1"}}, ["unknown model 'resnet1'"]),
    ("unknown-dataset", {"data": {"dataset": "mnst"}}, ["data.dataset", "did you mean 'mnist'"]),
    (
        "missing-data",
        {"data": {"dataset": "imagefolder", "root": "{tmp}/no-data"}},
        ["imagefolder", "no-data/train is not a folder"],
    ),
    (
        "subset-too-large",
        {"data": {"subset": 100_000}},
        ["data.subset=100000 exceeds the 1437 training examples of digits"],
    ),
    (
        "batch-larger-than-data",
        {"data": {"subset": 40}},
        ["batch_size=64 exceeds the 30 training examples of digits"],
    ),
]

SPEC_CASES: list[tuple[Any, ...]] = [
    *FILE_CASES,
    ("unknown-key", {"budget": {"trails": 3}}, ["unknown key 'budget.trails'", "'trials'"]),
    ("unknown-base-key", {"base": {"optim": {"rhoo": 0.1}}}, ["'base.optim.rhoo'", "'rho'"]),
    ("wrong-type", {"budget": {"trials": "ten"}}, ["budget.trials", "'ten'"]),
    ("wrong-type-list", {"optimizers": "sgd"}, ["optimizers: Input should be a valid list"]),
    ("negative-rho", {"base": {"optim": {"rho": -0.1}}}, ["base.optim.rho", "-0.1"]),
    (
        "negative-rho-searched",
        {"search": {"rho": {"low": -0.1, "high": 0.2}}},
        ["search.rho values must be >= 0"],
    ),
    (
        "micro-batches-do-not-divide",
        {"search": {"micro_batches": {"choices": [3, 4]}}},
        ["search.micro_batches: choice 3 does not divide base.train.batch_size 64"],
    ),
    (
        "base-micro-batches-do-not-divide",
        {"search": {}, "base": {"optim": {"micro_batches": 3}}},
        ["train.batch_size 64 is not divisible by optim.micro_batches 3"],
    ),
    (
        "infinite-lr-searched",
        {"search": {"lr": {"low": 0.01, "high": INF}}},
        ["search.lr.high", "finite", "inf"],
    ),
    ("unknown-optimizer", {"optimizers": ["sgd", "msma"]}, ["optimizers", "'msam'"]),
    ("unknown-strategy", {"base": {"optim": {"strategy": "loops"}}}, ["optim.strategy", "'loop'"]),
    (
        "cuda-only-strategy",
        {"base": {"optim": {"strategy": "graphed_fused"}}},
        ["graphed_fused runs on CUDA only"],
    ),
    (
        "no-cuda-device",
        {"base": {"train": {"device": "cuda"}}},
        ["train.device is cuda but no CUDA device is available"],
        NO_CUDA,
    ),
    ("unknown-model", {"base": {"model": {"name": "resnet1"}}}, ["unknown model 'resnet1'"]),
    (
        "unknown-dataset",
        {"base": {"data": {"dataset": "mnst"}}},
        ["base.data.dataset", "did you mean 'mnist'"],
    ),
    (
        "missing-data",
        {"base": {"data": {"dataset": "imagefolder", "root": "{tmp}/no-data"}}},
        ["imagefolder", "no-data/train is not a folder"],
    ),
    (
        "subset-too-large",
        {"base": {"data": {"subset": 100_000}}},
        ["data.subset=100000 exceeds the 1437 training examples of digits"],
    ),
    (
        "batch-larger-than-data",
        {"base": {"data": {"subset": 40}}},
        ["batch_size=64 exceeds the 30 training examples of digits"],
    ),
]

# (id, --storage URL, fragments): the spec itself is good.
STORAGE_CASES: list[tuple[str, str, list[str]]] = [
    ("unreachable-postgresql", PG_DOWN, ["cannot reach the database", "postgres:***@127.0.0.1:1"]),
    ("unreachable-redis", REDIS_DOWN, ["cannot reach Redis", "redis://:***@127.0.0.1:1/0"]),
    ("unknown-scheme", "ftp://127.0.0.1/x", ["unknown scheme 'ftp://'"]),
]


def _matrix() -> list[Any]:
    params = [
        pytest.param("train", s, None, f, id=f"train-{i}", marks=marks)
        for i, s, f, *marks in TRAIN_CASES
    ]
    for command in ("sweep", "worker"):
        params += [
            pytest.param(command, s, None, f, id=f"{command}-{i}", marks=marks)
            for i, s, f, *marks in SPEC_CASES
        ]
        params += [
            pytest.param(command, {}, url, f, id=f"{command}-{i}") for i, url, f in STORAGE_CASES
        ]
    return params


# ----------------------------------------------------------------------------- helpers


def write_source(folder: Path, command: str, source: Source) -> Path:
    """The config file of one case: ``config.yaml`` for train, ``spec.yaml`` otherwise."""
    path = folder / ("config.yaml" if command == "train" else "spec.yaml")
    if source is None:
        return path
    if isinstance(source, dict):
        good = GOOD_TRAIN if command == "train" else TINY_SPEC
        raw = merge(good, source)
        if "search" in source:  # a new search space, not a merge into the good one
            raw["search"] = source["search"]
        source = yaml.safe_dump(raw, sort_keys=False)
    path.write_text(source.replace("{tmp}", str(folder)))
    return path


def prior_run(folder: Path, command: str) -> Path:
    """A run folder holding earlier results: a finished train run, or a sweep's folder."""
    files = (
        {
            "metrics.jsonl": '{"epoch": 1, "val_acc": 0.5}\n',
            "summary.json": '{"status": "completed", "test_acc": 0.5}\n',
        }
        if command == "train"
        else {
            "spec.yaml": yaml.safe_dump(TINY_SPEC, sort_keys=False),
            "optuna.journal": '{"op_code": 0, "worker_id": "w", "study_name": "tiny/sgd"}\n',
            "trials/sgd/0/metrics.jsonl": '{"epoch": 1, "val_acc": 0.5}\n',
            "leaderboard.md": "| # | optimizer | test acc % |\n| 1 | sgd | 50.0 |\n",
        }
    )
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for path in [*folder.rglob("*"), folder]:
        os.utime(path, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    return folder


def argv_for(command: str, config: Path, run: Path, storage: str | None) -> list[str]:
    """The command line of one case; a worker gets the prior run's journal unless told a URL."""
    argv = [command, str(config), "--out", str(run)]
    if storage is None and command == "worker":
        storage = str(run / "optuna.journal")
    return argv + (["--storage", storage] if storage else [])


def assert_one_error_line(code: int, out: str, err: str, fragments: list[str]) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert PASSWORD not in out + err
    assert out == ""


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize(("command", "source", "storage", "fragments"), _matrix())
def test_bad_input_exits_2_in_one_line_and_touches_nothing(
    tmp_path, monkeypatch, capsys, command, source, storage, fragments
):
    cwd = tmp_path / "cwd"  # where a default runs/<name> would appear
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run = prior_run(tmp_path / "run", command)
    config = write_source(tmp_path, command, source)
    before = snapshot(run)
    created_before = sorted(tmp_path.iterdir())

    code = main(argv_for(command, config, run, storage))

    out, err = capsys.readouterr()
    assert_one_error_line(code, out, err, fragments)
    assert snapshot(run) == before
    assert sorted(tmp_path.iterdir()) == created_before  # no PWNED, no data folder
    assert list(cwd.iterdir()) == []


# One case per command: the unsafe YAML tag for real; a storage that a sweep reaches only after
# importing everything it uses (torch, timm, optuna, SQLAlchemy, W&B), so that any warning or
# log line of theirs would show on stderr; and a typo, cheap enough to keep the test quick.
SUBPROCESS_CASES: list[tuple[str, Source, str | None, list[str]]] = [
    ("train", CODE_EXECUTION, None, ["invalid YAML", "python/object/apply:os.system"]),
    ("sweep", {}, PG_DOWN, ["cannot reach the database"]),
    ("worker", {"budget": {"trails": 3}}, None, ["unknown key 'budget.trails'", "'trials'"]),
]


def test_bad_input_in_subprocesses(tmp_path, env):
    """The real command line: exit status 2, one line, no traceback. Started together, since
    each spends seconds on imports."""
    started = []
    for command, source, storage, fragments in SUBPROCESS_CASES:
        folder = tmp_path / command
        folder.mkdir()
        run = prior_run(folder / "run", command)
        config = write_source(folder, command, source)
        state = (snapshot(run), sorted(folder.iterdir()))
        proc = subprocess.Popen(
            [sys.executable, "-m", "sweeps.cli", *argv_for(command, config, run, storage)],
            cwd=folder,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        started.append((proc, fragments, folder, run, state))
    try:
        for proc, fragments, folder, run, state in started:
            out, err = proc.communicate(timeout=120)
            assert_one_error_line(proc.returncode, out, err, fragments)
            assert (snapshot(run), sorted(folder.iterdir())) == state
    finally:
        for proc, *_ in started:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


def test_a_config_error_answers_before_torch_is_imported(tmp_path):
    """Broken YAML and unknown keys are found without importing torch, timm or optuna (seconds
    of a user's time on every typo)."""
    (tmp_path / "broken.yaml").write_text("name: t\ndata: {dataset: digits\n")
    (tmp_path / "unknown.yaml").write_text("name: t\ndata: {datset: digits}\n")
    probe = (
        "import sys\n"
        "from sweeps.cli import main\n"
        "codes = [main(['train', 'broken.yaml']), main(['sweep', 'unknown.yaml'])]\n"
        "heavy = sorted({'torch', 'timm', 'optuna', 'wandb'} & set(sys.modules))\n"
        "print(codes, heavy)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.stdout.strip() == "[2, 2] []", done.stdout + done.stderr
