"""Evidence for the mSAM paper's claims on a user's own model and data.

Behdin et al., 2023 ("mSAM: Micro-Batch-Averaged Sharpness-Aware Minimization", arXiv:2302.09693)
claim that SGD < SAM < mSAM in flatness and in test accuracy, and that more micro-batches give
flatter minima. With one tuned lr and rho, this trains SGD, SAM and mSAM for several micro-batch
counts over paired seeds, measures test accuracy and three flatness metrics on every final model,
and reports means with 95% intervals and paired differences against SAM, whatever they show.

Needs neither optuna nor wandb (runs on the GPU image); matplotlib is optional (PNG plots).
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from msam.errors import UserError
from msam.files import write_json
from sweeps.finals.flatness import FlatnessSettings, flatness_sample, measure_flatness
from sweeps.layout import RunFolder
from sweeps.results.stats import paired_difference, summarize
from sweeps.spec import SweepSpec

METRICS = ("test_acc", "hessian_top_eig", "hessian_trace", "sam_sharpness")
LABELS = {
    "test_acc": "test accuracy",
    "hessian_top_eig": "top Hessian eigenvalue",
    "hessian_trace": "Hessian trace",
    "sam_sharpness": "SAM sharpness L(w+eps)-L(w)",
}


@dataclass(frozen=True)
class Method:
    """One arm of the comparison: an optimizer and its micro-batch count."""

    optimizer: str
    micro_batches: int

    @property
    def label(self) -> str:
        return self.optimizer if self.optimizer != "msam" else f"msam-m{self.micro_batches}"


def methods(batch_size: int, ms: Sequence[int]) -> list[Method]:
    """SGD, SAM and mSAM for each m that divides the batch (others are skipped, not errors)."""
    bad = [m for m in ms if m < 2]
    if bad:
        raise UserError(f"--micro-batches: mSAM needs m >= 2 (got {bad}); SAM is m = 1")
    usable = [m for m in ms if batch_size % m == 0]
    if not usable:
        raise UserError(f"no micro-batch count in {list(ms)} divides batch_size {batch_size}")
    return [Method("sgd", 1), Method("sam", 1)] + [Method("msam", m) for m in usable]


def run_one(
    spec: SweepSpec,
    method: Method,
    seed: int,
    *,
    lr: float,
    rho: float,
    epochs: int | None,
    flatness: FlatnessSettings,
) -> dict[str, Any]:
    """Train one method and seed on train + validation; test once; measure flatness."""
    cfg = claims_config(spec, method, seed, lr=lr, rho=rho, epochs=epochs)
    from msam.trainer import run_train

    t0 = time.perf_counter()
    result = run_train(cfg, final=True, verbose=False)
    wall = time.perf_counter() - t0
    return _row(method, seed, cfg, result, wall, flatness, rho)


def claims_config(
    spec: SweepSpec, method: Method, seed: int, *, lr: float, rho: float, epochs: int | None
) -> Any:
    """The validated train config of one method and seed (a UserError if it cannot be one)."""
    params: dict[str, Any] = {"lr": lr, "train.seed": seed}
    if method.optimizer != "sgd":
        params["rho"] = rho
    if method.optimizer == "msam":
        params["micro_batches"] = method.micro_batches
    if epochs is not None:
        params["train.epochs"] = epochs
    params["tracking.wandb.mode"] = "disabled"
    return spec.train_config(method.optimizer, params)


def _row(
    method: Method,
    seed: int,
    cfg: Any,
    result: Any,
    wall: float,
    flatness: FlatnessSettings,
    rho: float,
) -> dict[str, Any]:
    row: dict[str, Any] = {
        "method": method.label,
        "optimizer": method.optimizer,
        "micro_batches": method.micro_batches,
        "seed": seed,
        "status": result.status,
        "test_acc": result.summary["test_acc"],
        "seconds": wall,
        "train_seconds": result.summary["seconds"],
        "images_per_s": result.summary["images_per_s"],
    }
    if result.status != "complete" or result.model is None or not flatness.enabled:
        return row
    # The sample and the measurement of the final stage, at one rho for every arm.
    sample = flatness_sample(cfg, flatness)
    report = measure_flatness(result.model, sample, rho=rho, adaptive=False, settings=flatness)
    row.update({k: report[k] for k in ("hessian_top_eig", "hessian_trace", "sam_sharpness")})
    row["flatness_rho"] = rho
    row["flatness_images"] = report["n_images"]
    return row


def summarize_rows(rows: Sequence[Mapping[str, Any]], order: Sequence[str]) -> dict[str, Any]:
    """Per method: mean and 95% CI of each metric; paired differences against SAM, by seed."""
    by_method: dict[str, dict[int, Mapping[str, Any]]] = {}
    for r in rows:
        if r.get("status") == "complete":
            by_method.setdefault(r["method"], {})[r["seed"]] = r
    table: list[dict[str, Any]] = []
    for label in order:
        runs = by_method.get(label, {})
        entry: dict[str, Any] = {"method": label, "n": len(runs)}
        for metric in METRICS:
            values = [r[metric] for r in runs.values() if r.get(metric) is not None]
            if values:
                s = summarize(values)
                entry[metric] = {
                    "mean": s.mean,
                    "std": s.std,
                    "ci": [s.ci_low, s.ci_high],
                    "n": s.n,
                }
        table.append(entry)
    diffs: list[dict[str, Any]] = []
    sam = by_method.get("sam", {})
    for label in order:
        if label == "sam" or label not in by_method:
            continue
        seeds = sorted(set(sam) & set(by_method[label]))
        for metric in METRICS:
            a = [by_method[label][s].get(metric) for s in seeds]
            b = [sam[s].get(metric) for s in seeds]
            if not seeds or any(v is None for v in a + b):
                continue
            scale, unit = (100.0, "pp") if metric == "test_acc" else (1.0, "")
            d = paired_difference(a, b, a_name=label, b_name="sam", scale=scale, unit=unit)
            diffs.append(
                {
                    "method": label,
                    "metric": metric,
                    "n": d.n,
                    "mean": d.mean,
                    "ci": [d.ci_low, d.ci_high],
                    "p_value": d.p_value,
                    "significant": d.significant,
                    "verdict": d.verdict,
                }
            )
    return {"table": table, "paired_vs_sam": diffs}


def _fmt(entry: Mapping[str, Any] | None, scale: float = 1.0, digits: int = 3) -> str:
    if not entry:
        return "-"
    mean = entry["mean"] * scale
    lo, hi = entry["ci"]
    if lo is None:
        return f"{mean:.{digits}f} (n=1)"
    return f"{mean:.{digits}f} [{lo * scale:.{digits}f}, {hi * scale:.{digits}f}]"


def markdown(result: Mapping[str, Any]) -> str:
    lines = [
        f"# Claims check: {result['dataset']} / {result['model']}",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}  ",
        f"Versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items())}  ",
        f"Date: {result['date']}; lr {result['lr']}, rho {result['rho']}, "
        f"{result['seeds']} paired seeds, {result['epochs']} epochs, "
        f"flatness on {result['flatness']['images']} training images.",
        "",
        "Means with 95% t-intervals over seeds (test accuracy in %).",
        "",
        "| method | n | test acc % | top Hessian eig | Hessian trace | SAM sharpness |",
        "|---|---|---|---|---|---|",
    ]
    for e in result["summary"]["table"]:
        lines.append(
            f"| {e['method']} | {e['n']} | {_fmt(e.get('test_acc'), 100, 2)} | "
            f"{_fmt(e.get('hessian_top_eig'), 1, 2)} | {_fmt(e.get('hessian_trace'), 1, 1)} | "
            f"{_fmt(e.get('sam_sharpness'), 1, 4)} |"
        )
    lines += ["", "Paired differences against SAM (same seed = same init and batches):", ""]
    for d in result["summary"]["paired_vs_sam"]:
        lines.append(f"- {LABELS[d['metric']]}: {d['verdict']}")
    return "\n".join(lines) + "\n"


def plots(result: Mapping[str, Any], out: Path) -> list[Path]:
    """Test accuracy and flatness against m: PNG (matplotlib, if installed) and one HTML page."""
    table = result["summary"]["table"]
    written: list[Path] = []

    def series(metric: str):
        xs, ys, lo, hi, names = [], [], [], [], []
        for e in table:
            if metric not in e:
                continue
            m = (
                0
                if e["method"] == "sgd"
                else 1
                if e["method"] == "sam"
                else int(e["method"].split("-m")[1])
            )
            scale = 100.0 if metric == "test_acc" else 1.0
            mean = e[metric]["mean"] * scale
            ci = e[metric]["ci"]
            xs.append(m)
            ys.append(mean)
            lo.append(mean - ci[0] * scale if ci[0] is not None else 0.0)
            hi.append(ci[1] * scale - mean if ci[1] is not None else 0.0)
            names.append(e["method"])
        return xs, ys, lo, hi, names

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    if plt is not None:
        for name, metrics in (
            ("accuracy", ["test_acc"]),
            ("flatness", ["hessian_top_eig", "hessian_trace", "sam_sharpness"]),
        ):
            fig, axes = plt.subplots(
                1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False
            )
            for ax, metric in zip(axes[0], metrics, strict=True):
                xs, ys, lo, hi, names = series(metric)
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", capsize=4)
                ax.set_xscale("symlog", base=2, linthresh=1)
                ax.set_xticks(xs, names, rotation=30, fontsize=8)
                ax.set_title(LABELS[metric] + (" (%)" if metric == "test_acc" else ""))
                ax.grid(alpha=0.3)
            fig.suptitle(
                f"{result['dataset']} / {result['model']}: mean, 95% CI, {result['seeds']} seeds",
                fontsize=10,
            )
            fig.tight_layout()
            path = out / f"{name}_vs_m.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=1, cols=len(METRICS), subplot_titles=[LABELS[m] for m in METRICS])
    for col, metric in enumerate(METRICS, start=1):
        xs, ys, lo, hi, names = series(metric)
        fig.add_trace(
            go.Scatter(
                x=names,
                y=ys,
                mode="markers+lines",
                name=LABELS[metric],
                error_y={"type": "data", "symmetric": False, "array": hi, "arrayminus": lo},
            ),
            row=1,
            col=col,
        )
    fig.update_layout(
        height=420,
        width=1600,
        showlegend=False,
        title=f"{result['dataset']} / {result['model']} (mean, 95% CI)",
    )
    page = out / "claims.html"
    page.write_text(fig.to_html(include_plotlyjs=True, full_html=True))
    written.append(page)
    return written


def run(
    spec: SweepSpec,
    *,
    out: Path,
    lr: float | None = None,
    rho: float | None = None,
    micro_batches: Sequence[int] = (2, 4, 8, 16, 32),
    seeds: int = 3,
    epochs: int | None = None,
    flatness: FlatnessSettings | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Run (or resume) every method x seed; write results.json, README.md, plots under ``out``.

    Flatness is measured as in the final stage, with the spec's ``final.flatness`` unless
    ``flatness`` says otherwise.
    """
    flat = flatness or FlatnessSettings.from_spec(spec)
    lr = lr if lr is not None else spec.base.optim.lr
    rho = rho if rho is not None else spec.base.optim.rho
    if lr <= 0 or rho <= 0:
        raise UserError(f"claims need lr > 0 and rho > 0 (got lr {lr}, rho {rho})")
    if seeds < 2:
        raise UserError(f"--seeds {seeds}: paired intervals need at least 2 seeds")
    arms = methods(spec.base.train.batch_size, micro_batches)
    for arm in arms:  # every config is checked before the first run starts (exit 2)
        claims_config(spec, arm, 0, lr=lr, rho=rho, epochs=epochs)
    out.mkdir(parents=True, exist_ok=True)
    runs_dir = out / "runs"
    runs_dir.mkdir(exist_ok=True)
    rows = []
    for seed in range(seeds):  # seed-major: a partial run still has complete pairs
        for arm in arms:
            path = runs_dir / f"{arm.label}-seed{seed}.json"
            if path.exists():
                rows.append(json.loads(path.read_text()))
                continue
            row = run_one(spec, arm, seed, lr=lr, rho=rho, epochs=epochs, flatness=flat)
            write_json(path, row)
            rows.append(row)
            print(
                f"{arm.label:>10} seed {seed}: test_acc {row['test_acc']}, "
                f"top eig {row.get('hessian_top_eig')}, {row['seconds']:.0f} s",
                file=sys.stderr,
                flush=True,
            )
    import torch

    from msam.trainer import versions

    result = {
        "dataset": spec.base.data.dataset,
        "model": spec.base.model.name,
        "command": command,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, "
        + (torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"),
        "versions": versions(),
        "date": date.today().isoformat(),
        "lr": lr,
        "rho": rho,
        "seeds": seeds,
        "epochs": epochs or spec.base.train.epochs,
        "flatness": flat.record(),
        "runs": rows,
        "summary": summarize_rows(rows, [a.label for a in arms]),
    }
    write_json(out / "results.json", result)
    (out / "README.md").write_text(markdown(result))
    plots(result, out)
    return result


def tuned_lr_rho(run_dir: str | Path) -> tuple[float, float]:
    """The lr and rho of a sweep's tuned SAM config (``tuned/<name>-sam.yaml``)."""
    from msam.config import load_train_config

    found = sorted(RunFolder(run_dir).tuned_dir.glob("*-sam.yaml"))
    if not found:
        raise UserError(f"--tuned {run_dir}: no tuned/*-sam.yaml there (run the sweep first)")
    cfg = load_train_config(found[0])
    return cfg.optim.lr, cfg.optim.rho
