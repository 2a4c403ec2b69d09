"""bench/stats.py against table values and hand computations."""

import math
import random

import pytest

from megatron_mohge.bench import stats
from megatron_mohge.util import numbers

# Two-sided 95% (p = 0.975) and 99% (p = 0.995) Student-t critical values, from any table.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 10: 2.228, 20: 2.086,
         30: 2.042, 120: 1.980}
T_995 = {1: 63.657, 4: 4.604, 10: 3.169, 30: 2.750}


@pytest.mark.parametrize("df,expected", sorted(T_975.items()))
def test_t_quantile_975_matches_the_table(df, expected):
    assert stats.t_quantile(0.975, df) == pytest.approx(expected, abs=5e-4)


@pytest.mark.parametrize("df,expected", sorted(T_995.items()))
def test_t_quantile_995_matches_the_table(df, expected):
    assert stats.t_quantile(0.995, df) == pytest.approx(expected, abs=5e-4)


def test_t_quantile_symmetry_limits_and_inverse():
    assert stats.t_quantile(0.025, 4) == pytest.approx(-stats.t_quantile(0.975, 4))
    assert stats.t_quantile(0.5, 3) == 0.0
    assert stats.t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)  # the normal
    for df in (1, 3, 17):
        for p in (0.6, 0.9, 0.99):
            assert stats.t_cdf(stats.t_quantile(p, df), df) == pytest.approx(p, abs=1e-10)
    # df = 1 is the Cauchy distribution: CDF 1/2 + atan(t)/pi
    assert stats.t_cdf(2.0, 1) == pytest.approx(0.5 + math.atan(2.0) / math.pi, abs=1e-12)
    with pytest.raises(ValueError):
        stats.t_quantile(1.0, 3)


def test_betainc_closed_forms():
    for x in (0.1, 0.5, 0.93):
        assert stats.betainc(1, 1, x) == pytest.approx(x, abs=1e-12)
        assert stats.betainc(3, 1, x) == pytest.approx(x ** 3, abs=1e-12)
        assert stats.betainc(1, 2, x) == pytest.approx(1 - (1 - x) ** 2, abs=1e-12)
    assert stats.betainc(4.5, 4.5, 0.5) == pytest.approx(0.5, abs=1e-12)


def test_mean_ci_by_hand():
    s = stats.mean_ci([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["sd"] == pytest.approx(1.0) and s["n"] == 3
    half = 4.302653 / math.sqrt(3)
    assert s["ci"] == pytest.approx([2.0 - half, 2.0 + half], abs=1e-6)
    one = stats.mean_ci([5.0])
    assert one["ci"] is None and one["sd"] == 0.0
    assert numbers.standard_error([1.0, 3.0]) == pytest.approx(math.sqrt(2) / math.sqrt(2))
    assert numbers.standard_error([1.0]) is None


def test_paired_ratio_by_hand():
    r = stats.paired_ratio([2.0, 3.0], [1.0, 2.0])
    assert r["per_seed"] == [2.0, 1.5] and r["mean"] == 1.75
    sd = math.sqrt(0.125)  # sample sd of (2, 1.5)
    assert r["ci"] == pytest.approx([1.75 - 12.706205 * sd / math.sqrt(2),
                                     1.75 + 12.706205 * sd / math.sqrt(2)], abs=1e-5)
    with pytest.raises(ValueError, match="pairs must match"):
        stats.paired_ratio([1.0], [1.0, 2.0])


def test_ratio_se_paired():
    ys = [2.0, 2.5, 1.5, 3.0]
    assert stats.ratio_se_paired([1.1 * y for y in ys], ys) == pytest.approx(0.0, abs=1e-12)
    xs = [2.1, 2.4, 1.7, 2.9]
    r = sum(xs) / sum(ys)
    resid = [x - r * y for x, y in zip(xs, ys)]
    expected = numbers.sample_sd(resid) / (2.0 * sum(ys) / 4)
    assert stats.ratio_se_paired(xs, ys) == pytest.approx(expected)
    assert stats.ratio_se_paired([1.0], [1.0]) is None


def test_log_linear_fit_and_efficiency_ratio():
    ns = [1e5, 4e5, 1.6e6]
    stock = [5.0 - 0.3 * math.log(n) for n in ns]
    fit = stats.fit_log_linear(ns, stock)
    assert fit["c"] == pytest.approx(5.0) and fit["d"] == pytest.approx(-0.3)
    assert fit["residual_rms"] == pytest.approx(0.0, abs=1e-12)
    assert stats.size_for_loss(fit, stats.loss_at(fit, 2e5)) == pytest.approx(2e5)
    # the other model reaches at N the stock loss of 1.25 N (and, at its largest size, of a
    # stock size beyond the measured range)
    other_ns = [1e5, 4e5, 1.4e6]
    other = [5.0 - 0.3 * math.log(1.25 * n) for n in other_ns]
    e = stats.efficiency_ratio(ns, stock, other_ns, other)
    assert e["per_size"] == pytest.approx([1.25] * 3)
    assert e["geomean"] == pytest.approx(1.25)
    assert e["extrapolated"] == [False, False, True]
    flat = stats.efficiency_ratio(ns, [3.0, 3.0, 3.1], other_ns, other)
    assert flat["per_size"] == [None] * 3 and flat["geomean"] is None


def test_bootstrap_efficiency():
    ns = [1e5, 4e5, 1.6e6]
    stock = [5.0 - 0.3 * math.log(n) for n in ns]
    other = [5.0 - 0.3 * math.log(1.25 * n) for n in ns]
    # identical seeds: every resample gives the point estimate
    b = stats.bootstrap_efficiency(ns, [stock] * 3, ns, [other] * 3, samples=50)
    assert b["geomean_ci"] == pytest.approx([1.25, 1.25])
    assert b["undefined"] == 0 and b["seeds"] == 3
    # noisy seeds: the interval contains the point estimate on the seed means, and the same
    # bootstrap seed gives the same interval
    rng = random.Random(1)
    s_by = [[x + rng.gauss(0, 0.01) for x in stock] for _ in range(4)]
    o_by = [[x + rng.gauss(0, 0.01) for x in other] for _ in range(4)]
    mean_s = [numbers.mean([s[i] for s in s_by]) for i in range(3)]
    mean_o = [numbers.mean([o[i] for o in o_by]) for i in range(3)]
    point = stats.efficiency_ratio(ns, mean_s, ns, mean_o)["geomean"]
    b1 = stats.bootstrap_efficiency(ns, s_by, ns, o_by, samples=400, seed=3)
    b2 = stats.bootstrap_efficiency(ns, s_by, ns, o_by, samples=400, seed=3)
    assert b1 == b2
    lo, hi = b1["geomean_ci"]
    assert lo < point < hi
    with pytest.raises(ValueError):
        stats.bootstrap_efficiency(ns, [stock], ns, [other])


def test_percentile_interval():
    assert stats.percentile_interval(list(range(101)), 0.025) == pytest.approx([2.5, 97.5])
    assert stats.percentile_interval([], 0.025) is None
