"""stats: Student's t, confidence intervals and paired differences checked against scipy; verdict wording."""
import math

import pytest

from optstate import stats

scipy_stats = pytest.importorskip("scipy.stats")

DFS = (1, 2, 3, 5, 10, 30, 100, 1000)
KEEP = [0.861, 0.857, 0.869, 0.852, 0.864]
WORSE = [0.850, 0.846, 0.861, 0.839, 0.851]  # below KEEP on every seed
BETTER = [0.871, 0.868, 0.877, 0.864, 0.873]  # above KEEP on every seed
NOISY = [0.866, 0.850, 0.872, 0.849, 0.861]  # either side of KEEP
WHAT = "`new` instead of `keep`"


@pytest.mark.parametrize("df", DFS)
@pytest.mark.parametrize("p", (0.005, 0.025, 0.5, 0.9, 0.975, 0.995))
def test_t_quantile_matches_scipy(p, df):
    assert stats.t_quantile(p, df) == pytest.approx(scipy_stats.t.ppf(p, df), rel=1e-8, abs=1e-10)


@pytest.mark.parametrize("df", DFS)
@pytest.mark.parametrize("x", (-50.0, -3.0, -1.0, -0.1, 0.0, 0.5, 2.0, 4.3, 60.0))
def test_t_cdf_matches_scipy(x, df):
    assert stats.t_cdf(x, df) == pytest.approx(scipy_stats.t.cdf(x, df), rel=1e-9)


@pytest.mark.parametrize("df", DFS)
@pytest.mark.parametrize("p", (1e-12, 0.01, 0.3, 0.7, 0.99))
def test_t_quantile_inverts_t_cdf(p, df):
    assert stats.t_cdf(stats.t_quantile(p, df), df) == pytest.approx(p, rel=1e-9)


def test_t_functions_reject_bad_arguments():
    for p in (0.0, 1.0, -0.1, 1.5, math.nan):
        with pytest.raises(ValueError):
            stats.t_quantile(p, 5)
    for df in (0, 0.5, -3, math.nan, math.inf):
        with pytest.raises(ValueError):
            stats.t_quantile(0.9, df)
        with pytest.raises(ValueError):
            stats.t_cdf(1.0, df)
    with pytest.raises(ValueError):
        stats.t_cdf(math.nan, 5)


def test_summary_matches_scipy_interval():
    s = stats.summary(KEEP)
    low, high = scipy_stats.t.interval(0.95, len(KEEP) - 1, loc=s["mean"], scale=scipy_stats.sem(KEEP))
    assert s["n"] == 5 and s["level"] == 0.95
    assert s["mean"] == pytest.approx(sum(KEEP) / 5, rel=1e-12)
    assert s["std"] == pytest.approx(scipy_stats.tstd(KEEP), rel=1e-12)
    assert (s["ci_low"], s["ci_high"]) == (pytest.approx(low, rel=1e-10), pytest.approx(high, rel=1e-10))


def test_summary_other_level_matches_scipy_interval():
    s = stats.summary(KEEP, level=0.9)
    low, high = scipy_stats.t.interval(0.9, len(KEEP) - 1, loc=s["mean"], scale=scipy_stats.sem(KEEP))
    assert (s["ci_low"], s["ci_high"]) == (pytest.approx(low, rel=1e-10), pytest.approx(high, rel=1e-10))


def test_summary_of_one_value_has_no_spread():
    assert stats.summary([0.86]) == {"n": 1, "mean": 0.86, "std": None, "ci_low": None, "ci_high": None,
                                     "level": 0.95}


def test_summary_rejects_bad_input():
    for bad in ([], [0.8, math.nan], [math.inf, 0.8]):
        with pytest.raises(ValueError):
            stats.summary(bad)
    with pytest.raises(ValueError):
        stats.summary(KEEP, level=1.0)


def test_paired_matches_scipy_on_differences():
    d = stats.paired(NOISY, KEEP)
    diffs = [a - b for a, b in zip(NOISY, KEEP)]
    assert d["diffs"] == diffs
    low, high = scipy_stats.t.interval(0.95, len(diffs) - 1, loc=d["mean"], scale=scipy_stats.sem(diffs))
    assert (d["ci_low"], d["ci_high"]) == (pytest.approx(low, rel=1e-10), pytest.approx(high, rel=1e-10))
    t_stat = d["mean"] / (d["std"] / math.sqrt(d["n"]))
    assert t_stat == pytest.approx(scipy_stats.ttest_rel(NOISY, KEEP).statistic, rel=1e-10)


def test_paired_rejects_unequal_lengths():
    with pytest.raises(ValueError):
        stats.paired(KEEP, KEEP[:-1])


def test_verdict_one_seed():
    assert stats.verdict(stats.paired([0.80], [0.81]), WHAT) == (
        "`new` instead of `keep`: -1.0 points with one seed; no error bars (run more seeds)")
    # A difference that rounds to zero prints as +0.0, never -0.0.
    assert stats.verdict(stats.paired([0.80], [0.8004]), WHAT) == (
        "`new` instead of `keep`: +0.0 points with one seed; no error bars (run more seeds)")


def test_verdict_no_detectable_difference():
    assert stats.verdict(stats.paired(NOISY, KEEP), WHAT) == (
        "`new` instead of `keep`: no detectable difference: within ±0.7 points at 95% confidence (5 seeds)")
    assert stats.verdict(stats.paired(NOISY, KEEP, level=0.9), WHAT) == (
        "`new` instead of `keep`: no detectable difference: within ±0.6 points at 90% confidence (5 seeds)")


def test_verdict_costs():
    assert stats.verdict(stats.paired(WORSE, KEEP), WHAT) == (
        "`new` instead of `keep` costs 1.1 points (95% CI 0.9 to 1.4, 5 seeds)")


def test_verdict_gains():
    assert stats.verdict(stats.paired(BETTER, KEEP), WHAT) == (
        "`new` instead of `keep` gains 1.0 points (95% CI 0.8 to 1.2, 5 seeds)")
    assert stats.verdict(stats.paired(BETTER, KEEP), "x", scale=1000.0, unit="per mille") == (
        "x gains 10.0 per mille (95% CI 8.0 to 12.0, 5 seeds)")
