"""User errors on the command line: exit status 2, one line on stderr, no traceback, and an
existing output folder left byte-for-byte as it was.

The matrix of bad config files for train, sweep and worker (and its subprocess runs) is
tests/reliability/test_bad_input.py; here are overrides, options and usage mistakes."""

from __future__ import annotations

from pathlib import Path

import pytest

import msam.config
from sweeps.cli import main

GOOD_CONFIG = "name: t\ndata: {dataset: digits}\nmodel: {name: test_resnet}\ntrain: {epochs: 1}\n"
GOOD_SPEC = (
    "name: s\n"
    "base: {data: {dataset: digits}, model: {name: test_resnet}, train: {batch_size: 32}}\n"
    "search: {micro_batches: {choices: [2, 4]}}\n"
)


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    """An output folder holding a previous run's results."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 1, "val_acc": 0.5}\n')
    (out / "summary.json").write_text('{"status": "completed", "test_acc": 0.5}\n')
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def assert_one_line_error(stderr: str, *fragments: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0]


def in_process(capsys, *args: str) -> tuple[int, str]:
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("config", "sets", "fragments"),
    [
        (GOOD_CONFIG + "model: {name: resnet1}\n", [], ["duplicate key 'model'"]),
        (GOOD_CONFIG.replace("test_resnet", "resnet1"), [], ["unknown model 'resnet1'"]),
        (GOOD_CONFIG, ["optim.lr=-1"], ["optim.lr: Input should be greater than 0 (got -1)"]),
        (GOOD_CONFIG, ["optim.base=adamww"], ["did you mean 'adamw'"]),
        (
            GOOD_CONFIG,
            ["optim.name=msam", "optim.micro_batches=3"],
            ["train.batch_size 128", "optim.micro_batches 3"],
        ),
        (GOOD_CONFIG, ["data.dataset=mnst"], ["did you mean 'mnist'"]),
        (GOOD_CONFIG, ["optim.lr"], ["--set 'optim.lr': expected KEY=VALUE"]),
    ],
)
def test_train_validation_errors(tmp_path, out_dir, capsys, config, sets, fragments):
    path = tmp_path / "config.yaml"
    path.write_text(config)
    before = snapshot(out_dir)
    set_args = [arg for item in sets for arg in ("--set", item)]
    code, err = in_process(capsys, "train", str(path), *set_args, "--out", str(out_dir))
    assert code == 2
    assert_one_line_error(err, *fragments)
    assert snapshot(out_dir) == before


def test_train_refuses_to_overwrite_a_finished_run(tmp_path, out_dir, capsys):
    pytest.importorskip("msam.trainer")
    path = tmp_path / "config.yaml"
    path.write_text(GOOD_CONFIG)
    before = snapshot(out_dir)
    code, err = in_process(capsys, "train", str(path), "--out", str(out_dir))
    assert code == 2
    assert_one_line_error(err, "already holds a run")
    assert snapshot(out_dir) == before


@pytest.mark.parametrize(
    ("spec", "extra", "fragments"),
    [
        (GOOD_SPEC.replace("[2, 4]", "[2, 3]"), [], ["choice 3 does not divide", "32"]),
        (GOOD_SPEC + "budget: {sampler: tpee}\n", [], ["did you mean 'tpe'"]),
        (GOOD_SPEC, ["--per-gpu", "2"], ["--per-gpu needs --gpus"]),
        (GOOD_SPEC, ["--gpus", "0,x"], ["--gpus '0,x'"]),
        (GOOD_SPEC, ["--workers", "0"], ["--workers must be >= 1"]),
        (GOOD_SPEC, ["--workers", "2", "--storage", "sqlite:///x.db"], ["sqlite"]),
        (GOOD_SPEC, ["--workers", "2", "--gpus", "0"], ["not allowed with argument"]),
        (GOOD_SPEC, ["--stage", "tunes"], ["invalid choice: 'tunes'"]),
    ],
)
def test_sweep_errors(tmp_path, capsys, spec, extra, fragments):
    path = tmp_path / "spec.yaml"
    path.write_text(spec)
    code, err = in_process(capsys, "sweep", str(path), "--out", str(tmp_path / "run"), *extra)
    assert code == 2
    assert_one_line_error(err, *fragments)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        ([], "required: COMMAND"),
        (["trian"], "invalid choice: 'trian'"),
        (["train"], "required: CONFIG"),
        (["worker", "spec.yaml"], "required: --storage"),
        (["leaderboard", "no-such-dir"], "no-such-dir: no such run folder"),
        (["export", "no-such-dir", "--to", "x"], "no such run folder"),
        (["sync", "no-such-dir"], "no such run folder"),
        (["bench"], "required: {speed,claims}"),
        (["bench", "claims", "no-such.yaml"], "no-such.yaml: no such file"),
    ],
)
def test_usage_errors(tmp_path, monkeypatch, capsys, args, fragment):
    monkeypatch.chdir(tmp_path)
    code, err = in_process(capsys, *args)
    assert code == 2
    assert_one_line_error(err, fragment)


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "train" in capsys.readouterr().out


def test_ctrl_c_exits_130(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(msam.config, "load_train_config", interrupted)
    code, err = in_process(capsys, "train", str(tmp_path / "config.yaml"))
    assert code == 130
    assert "Traceback" not in err
