"""A config cannot make ``msam train`` or ``msam sweep`` run away: YAML that expands without
bound (an alias bomb, a self-referring alias, nesting thousands deep, a file of megabytes) and
values that would hang, crash late or run for ever (a negative seed, a name too long for the
files named after it, more warm-up than epochs, a W&B project W&B refuses, epochs or trials by
the million) are each refused with one short ``error:`` line and exit status 2, before any work
starts: no traceback, no run folder created, an existing one left byte for byte as it was.

The YAML bombs run as subprocesses under a memory limit and a timeout, so a loader that expands
them fails the test instead of taking the machine's memory; the rest run in process.
"""

from __future__ import annotations

import copy
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers.sweep import TINY_SPEC, merge, snapshot

from sweeps.cli import main

#: ``error: `` and a message of at most 500 characters, whatever the config holds.
MAX_LINE = len("error: ") + 500
#: A bomb's subprocess may use this much address space; expanding one takes gigabytes.
MEMORY_LIMIT = 1 << 30
OLD_MTIME_NS = 1_600_000_000 * 10**9

GOOD_TRAIN: dict[str, Any] = {"name": "tiny", **copy.deepcopy(TINY_SPEC["base"])}


def alias_bomb(levels: int, indent: str = "") -> str:
    """Nested anchors, each a list of nine aliases of the one before: ``9**levels`` strings
    from a few hundred bytes (a "billion laughs")."""
    lines = [f'{indent}a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, levels):
        lines.append(f"{indent}a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def flow_alias_bomb(levels: int) -> str:
    """The same bomb as one flow mapping, as a ``--set`` value."""
    items = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    items += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "{" + ", ".join(items) + "}"


def with_kwargs_text(good: dict[str, Any], model_path: list[str], text: str) -> str:
    """``good`` as YAML with ``text`` (indented YAML lines) as the model's ``kwargs``."""
    dumped = yaml.safe_dump(good, sort_keys=False)
    indent = "  " * len(model_path)
    anchor = f"{indent}name: test_resnet\n"
    assert anchor in dumped
    return dumped.replace(anchor, f"{anchor}{indent}kwargs:\n{text}", 1)


def spec_text(changes: dict[str, Any] | None = None) -> str:
    raw = merge(TINY_SPEC, changes or {})
    return yaml.safe_dump(raw, sort_keys=False)


def train_text(changes: dict[str, Any] | None = None) -> str:
    return yaml.safe_dump(merge(GOOD_TRAIN, changes or {}), sort_keys=False)


def assert_one_short_line(code: int, out: str, err: str, fragments: list[str]) -> None:
    assert code == 2, err[:2000]
    assert "Traceback" not in err, err[-2000:]
    lines = err.splitlines()
    assert len(lines) == 1, err[:2000]
    line = lines[0]
    assert line.startswith("error: "), line[:2000]
    assert len(line) <= MAX_LINE, f"{len(line)} characters: {line[:300]}..."
    for fragment in fragments:
        assert fragment in line, line
    assert out == ""


def prior_run(folder: Path, spec: str) -> Path:
    """A run folder holding a sweep's earlier results, launched with ``spec``."""
    files = {
        "spec.yaml": spec,
        "optuna.journal": '{"op_code": 0, "worker_id": "w", "study_name": "tiny/sgd"}\n',
        "trials/sgd/0/metrics.jsonl": '{"epoch": 1, "val_acc": 0.5}\n',
        "leaderboard.md": "| # | optimizer | test acc % |\n| 1 | sgd | 50.0 |\n",
    }
    for name, text in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for path in [*folder.rglob("*"), folder]:
        os.utime(path, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
    return folder


# ----------------------------------------------------------------------------- YAML bombs

# (id, command, file text, extra argv, fragments of the error line): configs that expanded or
# allocated without bound
BOMBS: list[tuple[str, str, str, list[str], list[str]]] = [
    (
        "sweep-10-levels",  # 936 bytes that expand to 3.5e9 strings
        "sweep",
        with_kwargs_text(TINY_SPEC, ["base", "model"], alias_bomb(10, "      ")),
        [],
        ["config.yaml:", "expands", "100000"],
    ),
    (
        "sweep-6-levels",  # 531441 strings: used to be a 3 MB error line
        "sweep",
        with_kwargs_text(TINY_SPEC, ["base", "model"], alias_bomb(6, "      ")),
        [],
        ["config.yaml:", "expands", "100000"],
    ),
    (
        "train-10-levels",
        "train",
        with_kwargs_text(GOOD_TRAIN, ["model"], alias_bomb(10, "    ")),
        [],
        ["config.yaml:", "expands", "100000"],
    ),
    (
        "set-override",
        "sweep",
        spec_text(),
        ["--set", f"base.model.kwargs={flow_alias_bomb(10)}"],
        ["--set base.model.kwargs", "expands", "100000"],
    ),
    (
        "recursive-alias",
        "sweep",
        with_kwargs_text(TINY_SPEC, ["base", "model"], "      a: &a [1, *a]\n"),
        [],
        ["config.yaml:", "alias *a", "inside"],
    ),
    (
        "deep-nesting",
        "train",
        with_kwargs_text(GOOD_TRAIN, ["model"], "    a: " + "[" * 5000 + "]" * 5000 + "\n"),
        [],
        ["config.yaml:", "nested deeper than"],
    ),
    (
        "synthetic-data-of-38-gib",  # 12,000 images of 3 x 1024 x 1024 bytes, allocated at once
        "train",
        train_text(
            {"data": {"dataset": "synthetic", "subset": None, "synthetic": {"img_size": 1024}}}
        ),
        [],
        ["data.synthetic", "GiB"],
    ),
]


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def test_yaml_bombs_are_refused_in_one_short_line(tmp_path, env):
    """Each bomb is refused while it is read: exit 2, one line naming the file (or the
    ``--set``) within the length bound, in seconds and well under the memory limit, and
    nothing created. Started together, as each spends a second on imports."""
    started = []
    for case, command, text, extra, fragments in BOMBS:
        folder = tmp_path / case
        folder.mkdir()
        config = folder / "config.yaml"
        config.write_text(text)
        out = folder / "run"
        proc = subprocess.Popen(
            [sys.executable, "-m", "sweeps.cli", command, str(config), "--out", str(out), *extra],
            cwd=folder,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_limit_memory,
        )
        started.append((case, proc, fragments, folder))
    try:
        for case, proc, fragments, folder in started:
            try:
                out, err = proc.communicate(timeout=90)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{case}: still running after 90 s")
            assert_one_short_line(proc.returncode, out, err, fragments)
            assert sorted(p.name for p in folder.iterdir()) == ["config.yaml"], case
    finally:
        for _, proc, *_ in started:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()


# ----------------------------------------------------------------------------- bad values

LONG = "x" * 100_000
NAME_243 = "n" * 243

# (id, command, file changes (dict) or text (str), --set overrides, fragments of the error line)
CASES: list[tuple[str, str, dict[str, Any] | str, list[str], list[str]]] = [
    # seeds: numpy and torch take 0 <= seed < 2**32, and worker k seeds its sampler seed + k
    (
        "sweep-negative-seed",
        "sweep",
        {},
        ["budget.seed=-5"],
        ["budget.seed", "greater than or equal to 0", "-5"],
    ),
    (
        "sweep-huge-seed",
        "sweep",
        {},
        ["budget.seed=4294967296"],
        ["budget.seed", "less than 2147483648", "4294967296"],
    ),
    (
        "train-negative-seed",
        "train",
        {},
        ["train.seed=-1"],
        ["train.seed", "greater than or equal to 0"],
    ),
    ("train-negative-split-seed", "train", {}, ["data.split_seed=-3"], ["data.split_seed"]),
    (
        "flatness-negative-seed",
        "sweep",
        {},
        ["final.flatness.seed=4294967296"],
        ["final.flatness.seed", "less than 2147483648"],
    ),
    # names: every file named after the sweep must fit in 255 bytes (tuned/<name>-msam.yaml.tmp)
    ("sweep-long-name", "sweep", {"name": NAME_243}, [], ["name", "at most 241 characters"]),
    ("train-long-name", "train", {"name": "n" * 256}, [], ["name", "at most 255 characters"]),
    ("name-with-newline", "train", {"name": "tiny\n"}, [], ["name", "use letters, digits"]),
    # warm-up longer than the run: the learning rate would never reach its peak
    (
        "train-warmup-beyond-epochs",
        "train",
        {},
        ["train.warmup_epochs=5"],
        ["train.warmup_epochs: 5", "epochs (2)"],
    ),
    (
        "sweep-warmup-beyond-epochs",
        "sweep",
        {},
        ["base.train.warmup_epochs=3"],
        ["base.train.warmup_epochs: 3", "epochs (2)"],
    ),
    (
        "final-epochs-below-warmup",
        "sweep",
        {"base": {"train": {"epochs": 3, "warmup_epochs": 2}}, "final": {"epochs": 1}},
        [],
        ["final.epochs 1", "base.train.warmup_epochs 2"],
    ),
    # what W&B refuses when a run starts: each trial would then run untracked
    (
        "wandb-project-slash",
        "sweep",
        {},
        ["base.tracking.wandb.project=a/b"],
        ["base.tracking.wandb.project", "'/'"],
    ),
    (
        "wandb-project-colon",
        "train",
        {},
        ["tracking.wandb.project=team:x"],
        ["tracking.wandb.project", "':'"],
    ),
    (
        "wandb-project-too-long",
        "train",
        {"tracking": {"wandb": {"project": "p" * 129}}},
        [],
        ["tracking.wandb.project", "128"],
    ),
    (
        "wandb-entity-slash",
        "sweep",
        {},
        ["base.tracking.wandb.entity=me/team"],
        ["base.tracking.wandb.entity", "'/'"],
    ),
    (
        "wandb-tag-too-long",
        "train",
        {"tracking": {"wandb": {"tags": ["ok", "t" * 65]}}},
        [],
        ["tracking.wandb.tags[1]", "64 characters"],
    ),
    (
        "wandb-tag-empty",
        "sweep",
        {},
        ["base.tracking.wandb.tags=['']"],
        ["tags[0]", "1 to 64 characters"],
    ),
    # sizes that only a typo gives: they would run for days or take all memory
    (
        "train-epochs",
        "train",
        {},
        ["train.epochs=100000"],
        ["train.epochs", "less than or equal to 10000"],
    ),
    (
        "sweep-epochs",
        "sweep",
        {},
        ["base.train.epochs=100000"],
        ["train.epochs", "less than or equal to 10000"],
    ),
    (
        "final-epochs",
        "sweep",
        {},
        ["final.epochs=100000"],
        ["final.epochs", "less than or equal to 10000"],
    ),
    (
        "batch-size",
        "sweep",
        {},
        ["base.train.batch_size=1048576"],
        ["base.train.batch_size", "less than or equal to 65536"],
    ),
    (
        "eval-batch-size",
        "train",
        {},
        ["train.eval_batch_size=1000000000"],
        ["train.eval_batch_size", "less than or equal to 65536"],
    ),
    (
        "trials",
        "sweep",
        {},
        ["budget.trials=1000000"],
        ["budget.trials", "less than or equal to 10000"],
    ),
    (
        "final-seeds",
        "sweep",
        {},
        ["final.seeds=100000"],
        ["final.seeds", "less than or equal to 1000"],
    ),
    (
        "final-top-k",
        "sweep",
        {},
        ["final.top_k=100000"],
        ["final.top_k", "less than or equal to 100"],
    ),
    (
        "flatness-images",
        "sweep",
        {},
        ["final.flatness.images=100000000"],
        ["final.flatness.images", "less than or equal to 1000000"],
    ),
    (
        "flatness-iters",
        "sweep",
        {},
        ["final.flatness.iters=100000000"],
        ["final.flatness.iters", "less than or equal to 10000"],
    ),
    (
        "flatness-tol-zero",
        "sweep",
        {},
        ["final.flatness.tol=0"],
        ["final.flatness.tol", "greater than 0"],
    ),
    (
        "flatness-tol-one",
        "sweep",
        {},
        ["final.flatness.tol=1"],
        ["final.flatness.tol", "less than 1"],
    ),
    (
        "flatness-tol-nan",
        "sweep",
        {},
        ["final.flatness.tol=.nan"],
        ["final.flatness.tol"],
    ),
    (
        "flatness-radius-zero",
        "sweep",
        {},
        ["final.flatness.radii=[0.05, 0]"],
        ["final.flatness.radii", "every radius must be > 0"],
    ),
    (
        "flatness-radii-empty",
        "sweep",
        {},
        ["final.flatness.radii=[]"],
        ["final.flatness.radii", "at least 1"],
    ),
    (
        "flatness-radius-text",
        "sweep",
        {},
        ["final.flatness.radii=[0.05, big]"],
        ["final.flatness.radii"],
    ),
    (
        "flatness-samples",
        "sweep",
        {},
        ["final.flatness.samples=100000000"],
        ["final.flatness.samples", "less than or equal to 10000"],
    ),
    # values of any length: the line stays short
    ("long-unknown-key", "sweep", {"budget": {LONG: 1}}, [], ["unknown key 'budget.xxx", "…"]),
    ("long-model-name", "sweep", {"base": {"model": {"name": LONG}}}, [], ["base.model.name"]),
    ("long-base-optimizer", "train", {"optim": {"base": LONG}}, [], ["optim.base"]),
    ("long-set", "train", {}, [f"{LONG}"], ["--set", "expected KEY=VALUE"]),
    ("long-data-root", "train", {"data": {"root": LONG}}, [], ["data.root"]),
    # a config file of megabytes (or one that never ends) is not read into memory
    ("big-file", "train", "# padding\n" * 200_000 + train_text(), [], ["config.yaml", "1 MiB"]),
]


def write_config(folder: Path, command: str, source: dict[str, Any] | str) -> Path:
    path = folder / "config.yaml"
    if isinstance(source, dict):
        source = spec_text(source) if command == "sweep" else train_text(source)
    path.write_text(source)
    return path


@pytest.mark.parametrize(
    ("command", "source", "sets", "fragments"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_bad_values_exit_2_in_one_short_line_and_create_nothing(
    tmp_path, monkeypatch, capsys, command, source, sets, fragments
):
    cwd = tmp_path / "cwd"  # where a default runs/<name> would appear
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    config = write_config(tmp_path, command, source)
    before = sorted(tmp_path.iterdir())
    argv = [command, str(config), "--out", str(tmp_path / "run")]
    for item in sets:
        argv += ["--set", item]

    code = main(argv)

    out, err = capsys.readouterr()
    assert_one_short_line(code, out, err, fragments)
    assert sorted(tmp_path.iterdir()) == before  # no run folder
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize(
    "changes",
    [
        {"budget": {"seed": -5}},
        {"name": NAME_243},
        {"base": {"train": {"warmup_epochs": 3}}},
    ],
    ids=["seed", "name", "warmup"],
)
def test_a_rerun_with_a_bad_value_leaves_the_run_folder_as_it_was(
    tmp_path, monkeypatch, capsys, changes
):
    """The folder was launched with the same spec (so the rerun guard lets it through): the
    bad value itself must stop the rerun before it touches anything."""
    monkeypatch.chdir(tmp_path)
    config = write_config(tmp_path, "sweep", changes)
    run = prior_run(tmp_path / "run", config.read_text())
    before = snapshot(run)

    code = main(["sweep", str(config), "--out", str(run)])

    out, err = capsys.readouterr()
    assert_one_short_line(code, out, err, [])
    assert snapshot(run) == before


def test_a_config_that_never_ends_is_refused(tmp_path, env):
    """``msam train /dev/zero`` reads at most a little over 1 MiB, then stops."""
    proc = subprocess.run(
        [sys.executable, "-m", "sweeps.cli", "train", "/dev/zero", "--out", str(tmp_path / "r")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        preexec_fn=_limit_memory,
    )
    assert_one_short_line(proc.returncode, proc.stdout, proc.stderr, ["/dev/zero", "1 MiB"])
    assert list(tmp_path.iterdir()) == []


def test_kwargs_within_the_node_bound_still_give_a_short_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(with_kwargs_text(TINY_SPEC, ["base", "model"], alias_bomb(5, "      ")))

    code = main(["sweep", str(config), "--out", str(tmp_path / "run")])

    out, err = capsys.readouterr()
    assert_one_short_line(code, out, err, ["model.kwargs"])
    assert not (tmp_path / "run").exists()
