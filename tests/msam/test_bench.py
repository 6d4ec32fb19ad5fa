"""``msam bench speed`` (``msam.bench``): the records it writes, that its ratios come from its own
measurements, that every option reaches :class:`msam.bench.SpeedSettings` with the defaults it
always had, and that it runs where optuna and wandb are not installed (the GPU image)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from helpers import REPO

from msam import bench
from sweeps.cli.main import main

FIELDS = {
    "optimizer",
    "micro_batches",
    "strategy",
    "step_ms_median",
    "step_ms_min",
    "step_ms_max",
    "images_per_s",
    "peak_mem_mb",
    "ratio_to_sgd",
    "ratio_to_sam",
    "machine",
}
MACHINE = {"cpu", "cpu_cores", "torch", "timm", "python", "device", "device_name"}
TINY = ["--model", "test_resnet", "--img-size", "16", "--batch-size", "8"]


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("bench") / "speed.json"
    argv = ["bench", "speed", *TINY, "--micro-batches", "1,2", "--steps", "2", "--warmup", "1"]
    assert main([*argv, "--strategy", "all", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def test_records_have_the_fields(records):
    kinds = [(r["optimizer"], r["micro_batches"], r["strategy"]) for r in records]
    assert kinds[:4] == [
        ("sgd", 1, "none"),
        ("sam", 1, "loop"),
        ("sam", 1, "plain two-step"),
        ("sam", 1, "msam.SAM two-step"),
    ]
    assert {s for o, m, s in kinds if o == "msam"} == {"loop", "fused", "batched"}
    assert {m for o, m, s in kinds if o == "msam"} == {2}
    for r in records:
        assert r.keys() >= FIELDS, FIELDS - r.keys()
        assert r["machine"].keys() >= MACHINE
        assert "hostname" not in json.dumps(r).lower()
        assert r["step_ms_min"] <= r["step_ms_median"] <= r["step_ms_max"]
        assert len(r["step_ms"]) == 2
        assert r["peak_mem_mb"] > 0
        assert r["images_per_s"] == pytest.approx(8 / (r["step_ms_median"] / 1e3))
    assert sum(r["auto_choice"] for r in records if r["optimizer"] == "msam") == 1


def test_ratios_come_from_the_same_run(records):
    sgd = next(r for r in records if r["optimizer"] == "sgd")["step_ms_median"]
    sam = next(r for r in records if r["strategy"] == "loop")["step_ms_median"]
    plain = next(r for r in records if r["strategy"] == "plain two-step")["step_ms_median"]
    for r in records:
        assert r["ratio_to_sgd"] == pytest.approx(r["step_ms_median"] / sgd, rel=1e-12)
        assert r["ratio_to_sam"] == pytest.approx(r["step_ms_median"] / sam, rel=1e-12)
        assert r["ratio_to_plain_sam"] == pytest.approx(r["step_ms_median"] / plain, rel=1e-12)


@pytest.mark.parametrize("strategy", ["plain two-step", "msam.SAM two-step"])
def test_the_two_step_rows_take_the_sam_step(strategy):
    """The rows the others are compared with do SAM's work: after one update from the same
    weights, the parameters equal those of ``msam.backward(m=1)`` and the same SGD step."""
    import torch

    from msam.bench.speed import _Setup

    settings = bench.SpeedSettings(model="test_resnet", batch_size=8, img_size=16)
    ours = _Setup(settings, torch.device("cpu"), channels_last=False)
    theirs = _Setup(settings, torch.device("cpu"), channels_last=False)
    ours.step_fn("sam", 1, "loop", 0.05)()
    theirs.step_fn("sam", 1, strategy, 0.05)()
    for a, b in zip(ours.model.parameters(), theirs.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    moved = [not torch.equal(a, b) for a, b in zip(ours.model.parameters(), _fresh(settings))]
    assert any(moved)


def _fresh(settings):
    import torch

    from msam.bench.speed import _Setup

    return list(_Setup(settings, torch.device("cpu"), channels_last=False).model.parameters())


def test_table_prints_every_row(records, capsys):
    bench.print_table(records)
    out = capsys.readouterr().out
    assert out.count("msam ") == 3 and "xSAM" in out and "xplain" in out


def test_markdown_table_of_a_results_file(records, tmp_path):
    path = bench.write_records(tmp_path / "deeper" / "r.json", records)
    lines = bench.markdown_table(bench.read_records(path)).splitlines()
    assert lines[2].startswith("| optimizer | m | strategy")
    assert len([line for line in lines if line.startswith("| msam")]) == 3


@pytest.fixture
def settings_seen(monkeypatch) -> list[bench.SpeedSettings]:
    """What ``msam bench speed`` hands to the library, without measuring anything."""
    seen: list[bench.SpeedSettings] = []

    def fake(settings, *, log=None):
        seen.append(settings)
        return []

    monkeypatch.setattr(bench, "measure_speed", fake)
    return seen


def test_defaults_are_those_the_command_always_had(settings_seen):
    assert main(["bench", "speed", "--model", "resnet10t", "--batch-size", "64"]) == 0
    assert settings_seen == [
        bench.SpeedSettings(
            model="resnet10t",
            batch_size=64,
            micro_batches=(1, 2, 4, 8),
            img_size=32,
            in_chans=3,
            num_classes=10,
            steps=10,
            warmup=2,
            device="cpu",
            amp="none",
            strategy="all",
            rho=0.05,
            channels_last="auto",
            threads=None,
            memory=True,
            seed=0,
        )
    ]


def test_every_option_reaches_the_settings(settings_seen, tmp_path):
    out = tmp_path / "sub" / "speed.json"
    argv = [
        "bench", "speed", "--model", "vit_tiny", "--img-size", "24", "--in-chans", "1",
        "--num-classes", "7", "--batch-size", "12", "--micro-batches", "1,3,6", "--steps", "4",
        "--warmup", "0", "--device", "cuda:1", "--amp", "bf16", "--strategy", "loop,fused",
        "--rho", "0.2", "--channels-last", "off", "--small-input", "off", "--threads", "3",
        "--no-memory",
        "--seed", "5", "--json", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    assert settings_seen == [
        bench.SpeedSettings(
            model="vit_tiny",
            batch_size=12,
            micro_batches=(1, 3, 6),
            img_size=24,
            in_chans=1,
            num_classes=7,
            steps=4,
            warmup=0,
            device="cuda:1",
            amp="bf16",
            strategy="loop,fused",
            rho=0.2,
            channels_last="off",
            small_input="off",
            threads=3,
            memory=False,
            seed=5,
        )
    ]
    assert json.loads(out.read_text()) == []


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "resnet_nope", "--batch-size", "8"], "unknown model"),
        (["--model", "test_resnet", "--batch-size", "8", "--micro-batches", "3"], "do not divide"),
        (["--model", "test_resnet", "--batch-size", "8", "--strategy", "warp"], "unknown strategy"),
    ],
)
def test_user_errors_exit_2(argv, message, capsys):
    assert main(["bench", "speed", *argv, "--steps", "1", "--no-memory"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("msam bench speed: ") and message in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "argv",
    [
        ["--batch-size", "8"],
        [*TINY, "--micro-batches", "1,two"],
        [*TINY, "--amp", "fp8"],
        [*TINY, "--channels-last", "maybe"],
    ],
)
def test_usage_errors_exit_2_in_one_line(argv, capsys):
    assert main(["bench", "speed", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: msam bench speed: ") and len(err.strip().splitlines()) == 1


def test_help_lists_the_strategies(capsys):
    assert main(["bench", "speed", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--micro-batches" in out and "graphed_batched" in out


def test_settings_refuse_what_cannot_run():
    with pytest.raises(ValueError, match=r"micro-batches \[3\] do not divide the batch size 8"):
        bench.SpeedSettings(model="test_resnet", batch_size=8, micro_batches=[1, 3])
    with pytest.raises(ValueError, match="amp must be one of"):
        bench.SpeedSettings(model="test_resnet", batch_size=8, amp="fp8")
    assert bench.SpeedSettings(model="m", batch_size=8, micro_batches=[1, 2]).micro_batches == (
        1,
        2,
    )


def test_library_imports_neither_optuna_nor_wandb():
    code = (
        "import sys, msam.bench, msam.bench.speed; "
        "assert not {'optuna', 'wandb', 'sweeps'} & set(sys.modules), 'imported a sweep layer'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


#: Runs ``python -m sweeps.cli ARGS`` where optuna and wandb cannot be imported, as on the GPU
#: image (timm itself tries ``import wandb`` and carries on without it).
WITHOUT_SWEEP_DEPENDENCIES = """
import importlib.abc, runpy, sys

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in ("optuna", "wandb"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
for name in ("optuna", "wandb"):
    try:
        __import__(name)
    except ImportError:
        continue
    sys.exit(f"{name} is still importable")
sys.argv = ["msam", *sys.argv[1:]]
runpy.run_module("sweeps.cli", run_name="__main__")
"""


def test_bench_speed_runs_without_optuna_and_wandb(tmp_path):
    out = tmp_path / "speed.json"
    argv = ["bench", "speed", *TINY, "--micro-batches", "1,2", "--steps", "1", "--warmup", "1"]
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_SWEEP_DEPENDENCIES, *argv, "--strategy", "loop"]
        + ["--no-memory", "--threads", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())
    assert [(r["optimizer"], r["micro_batches"]) for r in rows] == [
        ("sgd", 1),
        ("sam", 1),
        ("sam", 1),
        ("sam", 1),
        ("msam", 2),
    ]
    assert "xSAM" in done.stdout
