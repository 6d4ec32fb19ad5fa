"""``python -m msam.bench speed``: the records it writes, and that its ratios come from its own
measurements."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from msam import bench

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


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("bench") / "speed.json"
    threads = torch.get_num_threads()
    try:
        status = bench.main(
            [
                "speed", "--model", "test_resnet", "--img-size", "16", "--batch-size", "8",
                "--micro-batches", "1,2", "--steps", "2", "--warmup", "1",
                "--strategy", "all", "--json", str(out),
            ]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert status == 0
    return json.loads(out.read_text())


def test_records_have_the_fields(records):
    kinds = [(r["optimizer"], r["micro_batches"], r["strategy"]) for r in records]
    assert kinds[:2] == [("sgd", 1, "none"), ("sam", 1, "loop")]
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
    sam = next(r for r in records if r["optimizer"] == "sam")["step_ms_median"]
    for r in records:
        assert r["ratio_to_sgd"] == pytest.approx(r["step_ms_median"] / sgd, rel=1e-12)
        assert r["ratio_to_sam"] == pytest.approx(r["step_ms_median"] / sam, rel=1e-12)


def test_table_prints_every_row(records, capsys):
    bench.print_table(records)
    out = capsys.readouterr().out
    assert out.count("msam") == 3 and "xSAM" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--model", "resnet_nope", "--batch-size", "8"], "unknown model"),
        (["--model", "test_resnet", "--batch-size", "8", "--micro-batches", "3"], "do not divide"),
        (["--model", "test_resnet", "--batch-size", "8", "--strategy", "warp"], "unknown strategy"),
    ],
)
def test_user_errors_exit_2(argv, message, capsys):
    assert bench.main(["speed", *argv, "--steps", "1", "--no-memory"]) == 2
    assert message in capsys.readouterr().err


def test_runs_as_a_module_without_optuna_or_wandb():
    code = (
        "import sys, msam.bench; "
        "assert not {'optuna', 'wandb'} & set(sys.modules), 'imported a sweep dependency'; "
        "sys.exit(msam.bench.main(['speed', '--help']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "--micro-batches" in done.stdout


def test_markdown_table_of_a_results_file(records, tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps(records))
    assert bench.main(["table", str(path), "--markdown"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("| optimizer | m | strategy")
    assert len([line for line in lines if line.startswith("| msam")]) == 3
