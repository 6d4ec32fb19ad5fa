"""Summaries and paired comparisons against values computed by hand (t quantiles from a table)."""

from __future__ import annotations

import math

import pytest

from sweeps.results.stats import (
    compare_optimizers,
    compare_ratios,
    holm_adjust,
    paired_difference,
    summarize,
    summarize_log,
)

# Student t quantiles from a table (not from scipy): t(0.975, df) and t(0.95, 2).
T975 = {1: 12.706204736174707, 2: 4.302652729911275}
T95_DF2 = 2.919985580355516


def test_summarize_three_values():
    s = summarize([0.90, 0.92, 0.94])
    half = T975[2] * 0.02 / math.sqrt(3)
    assert s.n == 3 and s.values == (0.90, 0.92, 0.94)
    assert s.mean == pytest.approx(0.92, abs=1e-12)
    assert s.std == pytest.approx(0.02, rel=1e-9)
    assert s.ci_low == pytest.approx(0.92 - half, rel=1e-8)
    assert s.ci_high == pytest.approx(0.92 + half, rel=1e-8)
    assert s.text(scale=100, unit="%") == "92.00 ± 2.00% (95% CI 87.03 to 96.97, n=3)"


def test_summarize_other_confidence():
    s = summarize([0.90, 0.92, 0.94], confidence=0.90)
    half = T95_DF2 * 0.02 / math.sqrt(3)
    assert (s.ci_low, s.ci_high) == pytest.approx((0.92 - half, 0.92 + half), rel=1e-8)
    assert "90% CI" in s.text()


def test_summarize_one_value_has_no_interval():
    s = summarize([0.93])
    assert (s.n, s.mean, s.std, s.ci_low, s.ci_high) == (1, 0.93, None, None, None)
    assert s.text(scale=100, unit="%") == "93.00% (n=1: no interval)"


def test_summarize_rejects_empty_and_non_finite():
    with pytest.raises(ValueError, match="no values"):
        summarize([])
    with pytest.raises(ValueError, match="non-finite"):
        summarize([0.9, float("nan")])
    with pytest.raises(ValueError, match="confidence"):
        summarize([0.9, 0.8], confidence=95)


def test_paired_difference_hand_computed():
    b = [0.90, 0.91, 0.92]
    a = [0.91, 0.93, 0.95]  # differences 0.01, 0.02, 0.03
    d = paired_difference(a, b, a_name="msam", b_name="sam")
    half = T975[2] * 0.01 / math.sqrt(3)
    assert d.n == 3
    assert d.mean == pytest.approx(0.02, rel=1e-9)
    assert d.std == pytest.approx(0.01, rel=1e-9)
    assert (d.ci_low, d.ci_high) == pytest.approx((0.02 - half, 0.02 + half), rel=1e-8)
    # t = 0.02 / (0.01 / sqrt 3) = 3.4641, two-sided p with df = 2 is 0.07418.
    assert d.p_value == pytest.approx(0.07418, abs=1e-5)
    assert d.p_value == pytest.approx(1 - 3.4641016151377544 / math.sqrt(3.4641016151377544**2 + 2))
    assert not d.significant
    assert d.verdict == (
        "msam - sam = +2.00 pp (95% CI -0.48 to +4.48, p = 0.074, n=3): not significant at 5%"
    )


def test_paired_difference_df1_matches_cauchy():
    # Differences [1, 3]: mean 2, sd sqrt 2, t = 2; with df = 1 t is Cauchy: p = 1 - 2 atan(2)/pi.
    d = paired_difference([1.0, 3.0], [0.0, 0.0], a_name="a", b_name="b", scale=1, unit="")
    assert d.p_value == pytest.approx(1 - 2 * math.atan(2) / math.pi, rel=1e-9)
    assert (d.ci_low, d.ci_high) == pytest.approx((2 - T975[1], 2 + T975[1]), rel=1e-8)
    assert d.verdict.startswith("a - b = +2.00 (95% CI -10.71 to +14.71, p = 0.30")


def test_paired_difference_significant_names_the_higher():
    b = [0.90, 0.91, 0.92, 0.93]
    a = [0.880, 0.889, 0.901, 0.909]  # a lower by 0.020, 0.021, 0.019, 0.021
    d = paired_difference(a, b, a_name="sgd", b_name="sam")
    assert d.significant and d.p_value < 0.001
    assert d.ci_high < 0
    assert d.verdict.endswith("p < 0.001, n=4): significant at 5%, sam higher")


def test_paired_difference_one_seed():
    d = paired_difference([0.93], [0.92], a_name="msam", b_name="sam")
    assert d.n == 1 and d.p_value is None and not d.significant
    assert d.std is None and d.ci_low is None and d.ci_high is None
    assert d.mean == pytest.approx(0.01)
    assert "n=1: no test possible" in d.verdict
    assert d.verdict.startswith("msam - sam = +1.00 pp")


def test_paired_difference_zero_variance():
    same = paired_difference([0.9, 0.8, 0.7], [0.9, 0.8, 0.7], a_name="a", b_name="b")
    assert same.p_value == 1.0 and not same.significant
    assert (same.mean, same.ci_low, same.ci_high) == (0.0, 0.0, 0.0)
    shifted = paired_difference([1.5, 2.5, 3.5], [1.0, 2.0, 3.0], a_name="a", b_name="b")
    assert shifted.p_value == 0.0 and shifted.significant


def test_paired_difference_rejects_unpaired_input():
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([0.9, 0.8], [0.9], a_name="msam", b_name="sam")
    with pytest.raises(ValueError, match="no runs"):
        paired_difference([], [], a_name="msam", b_name="sam")
    with pytest.raises(ValueError, match="sam"):
        paired_difference([0.9, float("inf")], [0.9, 0.8], a_name="sam", b_name="sgd")


def test_holm_adjust():
    assert holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm_adjust([0.02, 0.011]) == pytest.approx([0.022, 0.022])  # kept monotone
    assert holm_adjust([0.5, 0.6]) == [1.0, 1.0]  # capped at 1
    assert holm_adjust([0.2]) == [0.2]
    assert holm_adjust([]) == []
    with pytest.raises(ValueError):
        holm_adjust([1.2])


def test_compare_optimizers_adjusts_across_pairs():
    results = {
        "sgd": [0.900, 0.910, 0.920, 0.930],
        "sam": [0.880, 0.940, 0.910, 0.940],  # sgd - 0.02, + 0.03, - 0.01, + 0.01: noise
        "msam": [0.884, 0.951, 0.914, 0.949],  # sam + 0.004, 0.011, 0.004, 0.009
    }
    diffs = compare_optimizers(results)
    assert [(d.a, d.b) for d in diffs] == [("msam", "sam"), ("sam", "sgd"), ("msam", "sgd")]
    raw = [d.p_value for d in diffs]
    assert [d.p_adjusted for d in diffs] == pytest.approx(holm_adjust(raw))
    for d in diffs:
        assert d.significant == (d.p_adjusted < 0.05)
        assert "Holm-adjusted p" in d.verdict
    # msam - sam is significant on its own (p = 0.029) but not once three pairs are tested (x 3).
    assert diffs[0].p_value < 0.05 < diffs[0].p_adjusted and not diffs[0].significant
    assert diffs[0].p_adjusted == pytest.approx(3 * diffs[0].p_value)
    assert "p = 0.029, Holm-adjusted p = 0.088" in diffs[0].verdict


def test_compare_optimizers_skips_missing_and_single_pair_is_unadjusted():
    diffs = compare_optimizers({"sgd": [0.9, 0.91], "sam": [0.92, 0.925]}, alpha=0.1)
    assert len(diffs) == 1 and (diffs[0].a, diffs[0].b) == ("sam", "sgd")
    assert diffs[0].p_adjusted is None and diffs[0].alpha == 0.1
    assert "Holm" not in diffs[0].verdict
    assert compare_optimizers({"sgd": [0.9]}) == []


def test_compare_optimizers_one_seed_each():
    diffs = compare_optimizers({"sgd": [0.9], "sam": [0.91], "msam": [0.92]})
    assert len(diffs) == 3
    assert all(d.p_value is None and d.p_adjusted is None and not d.significant for d in diffs)


# --- positive quantities on the log scale -----------------------------------------------------


def test_log_summary_is_a_positive_interval_around_the_geometric_mean():
    """The claims' "63.6 (-24.3 to 151.5)": three top eigenvalues whose t-interval goes negative
    keep a positive interval on the log scale, by hand: exp(mean(log) +- t * sd(log) / sqrt(n))."""
    values = [20.0, 60.0, 110.0]
    raw = summarize(values)
    assert raw.ci_low < 0
    s = summarize_log(values)
    logs = [math.log(v) for v in values]
    mean = sum(logs) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, df=2)
    assert s.geo_mean == pytest.approx(math.exp(mean))
    assert s.ci_low == pytest.approx(math.exp(mean - half))
    assert s.ci_high == pytest.approx(math.exp(mean + half))
    assert 0 < s.ci_low < s.geo_mean < s.ci_high
    assert "95% CI" in s.text() and "n=3" in s.text()


def test_log_summary_needs_positive_values_and_says_n1():
    assert summarize_log([1.0, -0.5]) is None
    assert summarize_log([1.0, 0.0]) is None
    assert summarize_log([]) is None
    one = summarize_log([4.0])
    assert one.geo_mean == 4.0 and one.ci_low is None and "no interval" in one.text()


def test_paired_ratios_by_hand_with_holm_across_metrics():
    metrics = {
        "top eig": {"sgd": [100.0, 120.0, 90.0], "sam": [50.0, 66.0, 40.0]},
        "trace": {"sgd": [400.0, 500.0, 450.0], "sam": [410.0, 480.0, 470.0]},
    }
    ratios = compare_ratios(metrics, pairs=[("sam", "sgd")])
    assert [(r.metric, r.a, r.b) for r in ratios] == [
        ("top eig", "sam", "sgd"),
        ("trace", "sam", "sgd"),
    ]
    for r, metric in zip(ratios, metrics):
        d = paired_difference(
            [math.log(v) for v in metrics[metric]["sam"]],
            [math.log(v) for v in metrics[metric]["sgd"]],
            a_name="sam",
            b_name="sgd",
            scale=1.0,
            unit="",
        )
        assert r.ratio == pytest.approx(math.exp(d.mean))
        assert r.ci_low == pytest.approx(math.exp(d.ci_low))
        assert r.p_value == pytest.approx(d.p_value)
    adjusted = holm_adjust([r.p_value for r in ratios])
    assert [r.p_adjusted for r in ratios] == pytest.approx(adjusted)
    top = ratios[0]
    assert top.ratio < 1 and top.significant == (top.p_adjusted < 0.05)
    if top.significant:
        assert "sam flatter" in top.verdict


def test_paired_ratios_degenerate_cases_say_so():
    same = compare_ratios({"trace": {"sam": [2.0, 4.0], "sgd": [1.0, 2.0]}}, pairs=[("sam", "sgd")])
    assert same[0].ratio == pytest.approx(2.0) and same[0].p_value is None
    assert "every seed gave the same ratio" in same[0].verdict and not same[0].significant
    one = compare_ratios({"trace": {"sam": [2.0], "sgd": [1.0]}}, pairs=[("sam", "sgd")])
    assert one[0].p_value is None and "no test possible" in one[0].verdict
    negative = compare_ratios(
        {"s": {"sam": [2.0, -1.0], "sgd": [1.0, 2.0]}}, pairs=[("sam", "sgd")]
    )
    assert negative == []
