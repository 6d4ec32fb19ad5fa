"""Statistics for final runs over seeds: means with t-intervals and paired comparisons.

A leaderboard is only as useful as its error bars: with three seeds a 0.4 pp gap between SAM and
mSAM is usually noise. Finals run every optimizer with the same seeds (same data order, same
initialisation), so runs pair by seed and the paired t-test on per-seed differences (Student,
1908) is the right test; it removes the seed-to-seed variance the optimizers share. When several
pairs are compared at once, Holm's step-down adjustment (Holm, 1979) keeps the chance of any false
"significant" at ``alpha``.

Every number comes with its sample size; with one seed no interval or test exists, and the text
says so instead of printing a spurious one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from scipy import stats as _scipy_stats

__all__ = [
    "LogSummary",
    "PairedDiff",
    "PairedRatio",
    "Summary",
    "compare_ratios",
    "compare_optimizers",
    "holm_adjust",
    "paired_difference",
    "summarize",
    "summarize_log",
]

DEFAULT_PAIRS: tuple[tuple[str, str], ...] = (("msam", "sam"), ("sam", "sgd"), ("msam", "sgd"))


def _finite_floats(values: Sequence[float], what: str) -> list[float]:
    out = [float(v) for v in values]
    bad = [v for v in out if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{what}: non-finite values {bad}; drop failed runs before summarising")
    return out


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var)


def _t_quantile(confidence: float, df: int) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return float(_scipy_stats.t.ppf(0.5 + confidence / 2.0, df))


def _unit(unit: str) -> str:
    """The unit as it follows a number: ``92.00%`` but ``+0.42 pp``."""
    return unit if unit in ("", "%") else f" {unit}"


def _percent(fraction: float) -> str:
    return f"{fraction * 100:g}%"


@dataclass(frozen=True)
class Summary:
    """Mean over seeds with the sample standard deviation and a t-interval for the mean.

    ``std``, ``ci_low`` and ``ci_high`` are None for a single value: one seed says nothing about
    the spread.
    """

    n: int
    mean: float
    std: float | None
    ci_low: float | None
    ci_high: float | None
    values: tuple[float, ...]
    confidence: float = 0.95

    def text(self, *, scale: float = 1.0, unit: str = "", digits: int = 2) -> str:
        """E.g. ``92.00 ± 2.00% (95% CI 87.03 to 96.97, n=3)`` with ``scale=100, unit="%"``."""
        u = _unit(unit)
        mean = f"{self.mean * scale:.{digits}f}"
        if self.std is None or self.ci_low is None or self.ci_high is None:
            return f"{mean}{u} (n=1: no interval)"
        lo, hi = self.ci_low * scale, self.ci_high * scale
        return (
            f"{mean} ± {self.std * scale:.{digits}f}{u} "
            f"({_percent(self.confidence)} CI {lo:.{digits}f} to {hi:.{digits}f}, n={self.n})"
        )


def summarize(
    values: Sequence[float],
    confidence: float = 0.95,
    *,
    bounds: tuple[float, float] | None = None,
) -> Summary:
    """Mean, sample std (n - 1) and the t-interval ``mean ± t(df=n-1) * std / sqrt(n)``.

    ``bounds`` is the range the quantity can take (``(0, 1)`` for an accuracy): the interval is
    cut to it, since a mean outside is impossible (a 2-seed t-interval easily reaches past 100%).
    """
    vals = _finite_floats(values, "summarize")
    if not vals:
        raise ValueError("summarize: no values")
    n = len(vals)
    if n == 1:
        _t_quantile(confidence, 1)  # validates confidence all the same
        return Summary(1, vals[0], None, None, None, tuple(vals), confidence)
    mean, std = _mean_std(vals)
    half = _t_quantile(confidence, n - 1) * std / math.sqrt(n)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return Summary(n, mean, std, low, high, tuple(vals), confidence)


@dataclass(frozen=True)
class PairedDiff:
    """``a - b`` paired by seed: mean difference, its t-interval and the paired t-test.

    ``p_adjusted`` is set when several pairs were tested together; ``significant`` and ``verdict``
    then use it. The interval is per comparison (unadjusted), so it can exclude zero while the
    adjusted test is not significant. ``scale``/``unit`` only affect the verdict (accuracies in
    [0, 1] read as percentage points).
    """

    a: str
    b: str
    n: int
    mean: float
    std: float | None
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    significant: bool
    verdict: str
    p_adjusted: float | None = None
    confidence: float = 0.95
    alpha: float = 0.05
    scale: float = 100.0
    unit: str = "pp"
    differences: tuple[float, ...] = field(default=(), repr=False)


def _format_p(p: float) -> str:
    if p < 0.001:
        return "< 0.001"
    return f"= {p:.2f}" if p >= 0.1 else f"= {p:.3f}"


def _verdict(d: PairedDiff, digits: int = 2) -> str:
    """One sentence a user can act on, e.g. ``msam - sam = +0.42 pp (95% CI ...): ...``."""
    u = _unit(d.unit)
    head = f"{d.a} - {d.b} = {d.mean * d.scale:+.{digits}f}{u}"
    if d.p_value is None or d.ci_low is None or d.ci_high is None:
        return f"{head}; n={d.n}: no test possible"
    ci = (
        f"{_percent(d.confidence)} CI {d.ci_low * d.scale:+.{digits}f} "
        f"to {d.ci_high * d.scale:+.{digits}f}"
    )
    p = f"p {_format_p(d.p_value)}"
    if d.p_adjusted is not None:
        p += f", Holm-adjusted p {_format_p(d.p_adjusted)}"
    level = _percent(d.alpha)
    if not d.significant:
        return f"{head} ({ci}, {p}, n={d.n}): not significant at {level}"
    higher = d.a if d.mean > 0 else d.b
    return f"{head} ({ci}, {p}, n={d.n}): significant at {level}, {higher} higher"


def paired_difference(
    a_values: Sequence[float],
    b_values: Sequence[float],
    *,
    a_name: str,
    b_name: str,
    confidence: float = 0.95,
    alpha: float = 0.05,
    scale: float = 100.0,
    unit: str = "pp",
) -> PairedDiff:
    """Paired t-test of ``a - b`` (same index = same seed), two-sided, df = n - 1.

    All differences zero gives p = 1 (no evidence of any gap); equal non-zero differences give
    p = 0 (the limit of t -> infinity). With n < 2 there is no test: p is None.
    """
    a = _finite_floats(a_values, a_name)
    b = _finite_floats(b_values, b_name)
    if len(a) != len(b):
        raise ValueError(
            f"{a_name} has {len(a)} runs but {b_name} has {len(b)}: a paired comparison needs "
            "the same seeds for both"
        )
    if not a:
        raise ValueError(f"no runs to compare for {a_name} vs {b_name}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    diffs = [x - y for x, y in zip(a, b)]
    n = len(diffs)
    common: dict[str, Any] = {
        "a": a_name,
        "b": b_name,
        "n": n,
        "confidence": confidence,
        "alpha": alpha,
        "scale": scale,
        "unit": unit,
        "differences": tuple(diffs),
        "verdict": "",
        "significant": False,
    }
    if n < 2:
        _t_quantile(confidence, 1)
        result = PairedDiff(
            mean=diffs[0], std=None, ci_low=None, ci_high=None, p_value=None, **common
        )
        return dataclasses.replace(result, verdict=_verdict(result))
    mean, std = _mean_std(diffs)
    sem = std / math.sqrt(n)
    half = _t_quantile(confidence, n - 1) * sem
    if sem == 0.0:
        p = 1.0 if mean == 0.0 else 0.0
    else:
        p = float(2.0 * _scipy_stats.t.sf(abs(mean / sem), n - 1))
    result = PairedDiff(
        mean=mean, std=std, ci_low=mean - half, ci_high=mean + half, p_value=p, **common
    )
    return _with_significance(result, p)


def _with_significance(d: PairedDiff, p: float) -> PairedDiff:
    d = dataclasses.replace(d, significant=p < d.alpha)
    return dataclasses.replace(d, verdict=_verdict(d))


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order.

    The k-th smallest of m p-values is multiplied by (m - k + 1), made non-decreasing along the
    sorted order and capped at 1; comparing the results to ``alpha`` controls the family-wise
    error rate, with more power than plain Bonferroni.
    """
    ps = [float(p) for p in p_values]
    if any(not 0.0 <= p <= 1.0 for p in ps):
        raise ValueError(f"p-values must lie in [0, 1], got {ps}")
    m = len(ps)
    order = sorted(range(m), key=lambda i: ps[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * ps[i]))
        adjusted[i] = running
    return adjusted


def compare_optimizers(
    results: Mapping[str, Sequence[float]],
    pairs: Sequence[tuple[str, str]] = DEFAULT_PAIRS,
    **kw: Any,
) -> list[PairedDiff]:
    """Paired comparisons of per-seed results, e.g. ``{"sgd": [...], "sam": [...], ...}``.

    Pairs naming an optimizer absent from ``results`` are skipped. When more than one pair has a
    test, p-values are Holm-adjusted across them and significance uses the adjusted value.
    ``kw`` goes to :func:`paired_difference` (confidence, alpha, scale, unit).
    """
    diffs = [
        paired_difference(results[a], results[b], a_name=a, b_name=b, **kw)
        for a, b in pairs
        if a in results and b in results
    ]
    tested = [i for i, d in enumerate(diffs) if d.p_value is not None]
    if len(tested) > 1:
        adjusted = holm_adjust([diffs[i].p_value for i in tested])  # type: ignore[misc]
        for i, p_adj in zip(tested, adjusted):
            diffs[i] = _with_significance(dataclasses.replace(diffs[i], p_adjusted=p_adj), p_adj)
    return diffs


# ----------------------------------------------------------------------------- positive quantities


@dataclass(frozen=True)
class LogSummary:
    """Geometric mean of a positive quantity over seeds, with a t-interval on the log scale.

    Curvature (a top Hessian eigenvalue, a trace, a sharpness) is positive and skewed: a
    symmetric interval on the raw values runs below zero ("63.6 (-24.3 to 151.5)"); on the log
    scale it stays positive and reads as a factor. None of the interval with one seed.
    """

    n: int
    geo_mean: float
    ci_low: float | None
    ci_high: float | None
    values: tuple[float, ...]
    confidence: float = 0.95

    def text(self, digits: int = 4) -> str:
        mean = f"{self.geo_mean:.{digits}g}"
        if self.ci_low is None or self.ci_high is None:
            return f"{mean} (n={self.n}: no interval)"
        return (
            f"{mean} ({_percent(self.confidence)} CI {self.ci_low:.{digits}g} to "
            f"{self.ci_high:.{digits}g}, n={self.n})"
        )


def summarize_log(values: Sequence[float], confidence: float = 0.95) -> LogSummary | None:
    """:class:`LogSummary` of ``values``; None unless every value is finite and > 0."""
    vals = [float(v) for v in values]
    if not vals or any(not math.isfinite(v) or v <= 0.0 for v in vals):
        return None
    logs = summarize([math.log(v) for v in vals], confidence)
    low = None if logs.ci_low is None else math.exp(logs.ci_low)
    high = None if logs.ci_high is None else math.exp(logs.ci_high)
    return LogSummary(len(vals), math.exp(logs.mean), low, high, tuple(vals), confidence)


@dataclass(frozen=True)
class PairedRatio:
    """``a / b`` of a positive quantity paired by seed: the geometric mean ratio, its interval
    and the paired t-test on the log ratios (``p_adjusted``: Holm across the family tested)."""

    metric: str
    a: str
    b: str
    n: int
    ratio: float
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    p_adjusted: float | None
    significant: bool
    verdict: str
    confidence: float = 0.95


def _ratio_verdict(r: PairedRatio, alpha: float) -> str:
    head = f"{r.metric}: {r.a} / {r.b} = {r.ratio:.3g}x"
    if r.n > 1 and r.ci_low is not None and r.ci_low == r.ci_high:
        return f"{head} (n={r.n}): every seed gave the same ratio, so no test is possible"
    if r.p_value is None or r.ci_low is None or r.ci_high is None:
        return f"{head}; n={r.n}: no test possible"
    p = f"p {_format_p(r.p_value)}"
    if r.p_adjusted is not None:
        p += f", Holm-adjusted p {_format_p(r.p_adjusted)}"
    ci = f"{_percent(r.confidence)} CI {r.ci_low:.3g}x to {r.ci_high:.3g}x"
    level = _percent(alpha)
    if not r.significant:
        return f"{head} ({ci}, {p}, n={r.n}): not significant at {level}"
    lower = r.a if r.ratio < 1 else r.b
    return f"{head} ({ci}, {p}, n={r.n}): significant at {level}, {lower} flatter"


def compare_ratios(
    metrics: Mapping[str, Mapping[str, Sequence[float]]],
    pairs: Sequence[tuple[str, str]] = DEFAULT_PAIRS,
    *,
    confidence: float = 0.95,
    alpha: float = 0.05,
) -> list[PairedRatio]:
    """Paired ratios ``a / b`` per metric (``{metric: {optimizer: per-seed values}}``), tested
    on the log scale; Holm's adjustment runs over every metric and pair together (one family).
    A metric with a value <= 0 for either side is not compared."""
    out: list[PairedRatio] = []
    for metric, by_optimizer in metrics.items():
        for a, b in pairs:
            if a not in by_optimizer or b not in by_optimizer:
                continue
            va, vb = list(by_optimizer[a]), list(by_optimizer[b])
            if not va or any(v <= 0 or not math.isfinite(v) for v in (*va, *vb)):
                continue
            d = paired_difference(
                [math.log(v) for v in va],
                [math.log(v) for v in vb],
                a_name=a,
                b_name=b,
                confidence=confidence,
                alpha=alpha,
                scale=1.0,
                unit="",
            )
            degenerate = d.std == 0.0
            out.append(
                PairedRatio(
                    metric=metric,
                    a=a,
                    b=b,
                    n=d.n,
                    ratio=math.exp(d.mean),
                    ci_low=None if d.ci_low is None else math.exp(d.ci_low),
                    ci_high=None if d.ci_high is None else math.exp(d.ci_high),
                    p_value=None if degenerate else d.p_value,
                    p_adjusted=None,
                    significant=False,
                    verdict="",
                    confidence=confidence,
                )
            )
    tested = [i for i, r in enumerate(out) if r.p_value is not None]
    adjusted = holm_adjust([out[i].p_value for i in tested]) if tested else []  # type: ignore[misc]
    for i, p_adj in zip(tested, adjusted):
        out[i] = dataclasses.replace(
            out[i], p_adjusted=p_adj if len(tested) > 1 else None, significant=p_adj < alpha
        )
    return [dataclasses.replace(r, verdict=_ratio_verdict(r, alpha)) for r in out]
