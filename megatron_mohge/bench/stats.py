"""Small statistics for the benchmark: seed means, paired Student-t intervals, log-linear
scaling fits and a seed bootstrap. Pure Python (no scipy dependency).

* :func:`t_quantile` -- Student-t quantiles from the regularized incomplete beta function
  (Numerical Recipes' continued fraction), inverted by bisection; exact to ~1e-10.
* :func:`mean_ci` -- mean and the two-sided Student-t interval ``mean +- t * sd / sqrt(n)``.
* :func:`median_ci` -- order-statistic (sign-test) interval of a median.
* :func:`paired_ratio` -- per-seed ratios ``x_s / y_s`` of two runs trained with the same
  seed (same data order and held-out set), and the t interval of their mean: pairing removes
  the seed-to-seed variation the two runs share.
* :func:`fit_log_linear` / :func:`efficiency_ratio` / :func:`bootstrap_efficiency` -- the
  scaling study: ``loss = c + d ln N`` per model kind and "stock params needed to reach
  MoHGE's loss / MoHGE's params".
"""

from __future__ import annotations

import math
import random
from typing import Optional, Sequence

from megatron_mohge.util.numbers import mean, percentile, sample_sd

CONFIDENCE = 0.95  # every interval in results.json is a two-sided 95% interval


# ---------------------------------------------------------------------------- Student t
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz)."""
    tiny, eps = 1e-300, 1e-15
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        m2 = 2 * m
        aa = m * (b - m) * x / ((qam + m2) * (a + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
        d = 1.0 + aa * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + aa / c
        c = c if abs(c) > tiny else tiny
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < eps:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta function I_x(a, b)."""
    if not 0.0 <= x <= 1.0:
        raise ValueError(f"betainc: x={x} outside [0, 1]")
    if x in (0.0, 1.0):
        return x
    ln_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom."""
    if df <= 0:
        raise ValueError(f"t_cdf: df={df} must be > 0")
    tail = 0.5 * betainc(0.5 * df, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection on
    :func:`t_cdf`; symmetric, so only ``p > 0.5`` is searched)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: p={p} must be in (0, 1)")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    if p == 0.5:
        return 0.0
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------------- samples
def mean_ci(xs: Sequence[float], confidence: float = CONFIDENCE) -> dict:
    """``{"mean", "sd", "n", "ci": [low, high] or None}``: the two-sided Student-t interval
    of the mean (None for one value: no spread to estimate)."""
    xs = [float(x) for x in xs]
    m, n = mean(xs), len(xs)
    out = {"mean": m, "sd": sample_sd(xs), "n": n, "ci": None}
    if n >= 2:
        half = t_quantile(0.5 + confidence / 2, n - 1) * out["sd"] / math.sqrt(n)
        out["ci"] = [m - half, m + half]
    return out


def paired_ratio(xs: Sequence[float], ys: Sequence[float],
                 confidence: float = CONFIDENCE) -> dict:
    """Mean and t interval of the per-pair ratios ``x_i / y_i`` (pairs: the same seed)."""
    if len(xs) != len(ys) or not xs:
        raise ValueError(f"paired_ratio: {len(xs)} vs {len(ys)} values; pairs must match")
    ratios = [float(x) / float(y) for x, y in zip(xs, ys)]
    s = mean_ci(ratios, confidence)
    return {"per_seed": ratios, **s}


# ---------------------------------------------------------------------------- scaling fits
def fit_log_linear(ns: Sequence[float], losses: Sequence[float]) -> dict:
    """Least squares ``loss = c + d ln N``. With 3-4 sizes spanning < 10x, a saturating
    power law ``a + b N^-alpha`` (3 parameters) is not identifiable; over such a range it is
    indistinguishable from its tangent in ln N, which these two parameters are."""
    if len(ns) != len(losses) or len({float(n) for n in ns}) < 2:
        raise ValueError("fit_log_linear: needs at least two distinct sizes")
    xs = [math.log(float(n)) for n in ns]
    mx, my = mean(xs), mean(losses)
    sxx = sum((x - mx) ** 2 for x in xs)
    d = sum((x - mx) * (y - my) for x, y in zip(xs, losses)) / sxx
    c = my - d * mx
    resid = [y - (c + d * x) for x, y in zip(xs, losses)]
    dof = len(xs) - 2
    rms = math.sqrt(sum(r * r for r in resid) / dof) if dof > 0 else None
    return {"form": "loss = c + d*ln(N)", "c": c, "d": d, "residual_rms": rms, "n_points": len(xs)}


def loss_at(fit: dict, n: float) -> float:
    return fit["c"] + fit["d"] * math.log(n)


def size_for_loss(fit: dict, loss: float) -> Optional[float]:
    """The N at which the fitted curve reaches ``loss``; None when the curve does not fall
    with size (d >= 0: no size reaches a lower loss)."""
    if fit["d"] >= 0:
        return None
    return math.exp((loss - fit["c"]) / fit["d"])


def efficiency_ratio(stock_ns: Sequence[float], stock_losses: Sequence[float],
                     other_ns: Sequence[float], other_losses: Sequence[float]) -> dict:
    """Per size of the other model: stock params needed (on the stock fit) to reach its
    loss / its params, and the geometric mean over sizes. Ratios whose stock size falls
    outside the measured stock range are extrapolations (``extrapolated``)."""
    fit = fit_log_linear(stock_ns, stock_losses)
    lo, hi = min(stock_ns), max(stock_ns)
    per, extra = [], []
    for n, loss in zip(other_ns, other_losses):
        need = size_for_loss(fit, loss)
        per.append(None if need is None else need / n)
        extra.append(need is None or not lo <= need <= hi)
    ok = [r for r in per if r is not None and r > 0]
    geo = math.exp(mean([math.log(r) for r in ok])) if len(ok) == len(per) else None
    return {"per_size": per, "geomean": geo, "extrapolated": extra, "stock_fit": fit}


def bootstrap_efficiency(stock_ns: Sequence[float], stock_by_seed: Sequence[Sequence[float]],
                         other_ns: Sequence[float], other_by_seed: Sequence[Sequence[float]],
                         *, samples: int = 2000, seed: int = 0,
                         confidence: float = CONFIDENCE) -> dict:
    """Percentile bootstrap over seeds of :func:`efficiency_ratio` on seed-mean losses.

    ``*_by_seed[s][i]`` is the loss of size ``i`` trained with seed ``s``; the two kinds
    share seeds (same data order), so one resample of seed indices is applied to both. With
    n seeds there are only C(2n-1, n) distinct resamples (10 for n = 3): the interval is
    coarse, and reported as such. Resamples where the stock curve does not fall with size
    are counted in ``undefined``.
    """
    n = len(stock_by_seed)
    if n != len(other_by_seed) or n < 2:
        raise ValueError("bootstrap_efficiency: both kinds need the same >= 2 seeds")
    rng = random.Random(seed)
    geos, per = [], [[] for _ in other_ns]
    undefined = 0
    for _ in range(samples):
        idx = [rng.randrange(n) for _ in range(n)]
        s_mean = [mean([stock_by_seed[j][i] for j in idx]) for i in range(len(stock_ns))]
        o_mean = [mean([other_by_seed[j][i] for j in idx]) for i in range(len(other_ns))]
        e = efficiency_ratio(stock_ns, s_mean, other_ns, o_mean)
        if e["geomean"] is None:
            undefined += 1
            continue
        geos.append(e["geomean"])
        for i, r in enumerate(e["per_size"]):
            per[i].append(r)
    q = (1 - confidence) / 2
    return {"geomean_ci": percentile_interval(geos, q),
            "per_size_ci": [percentile_interval(p, q) for p in per],
            "samples": samples, "undefined": undefined, "seeds": n}


def median_ci(xs: Sequence[float], confidence: float = CONFIDENCE) -> Optional[list[float]]:
    """Distribution-free interval of the median: the order statistics ``[x_(k), x_(n+1-k)]``
    with the largest ``k`` whose binomial(n, 1/2) tail ``P(X < k)`` is at most
    ``(1 - confidence) / 2`` (coverage >= ``confidence``, no assumption on the spread's
    shape, so a few load spikes do not widen it). None when ``n`` is too small (n < 6 at 95%)."""
    n, alpha = len(xs), (1 - confidence) / 2
    tail, k = 0.0, 0
    while k < n and tail + math.comb(n, k) / 2 ** n <= alpha:
        tail += math.comb(n, k) / 2 ** n
        k += 1
    if k == 0:
        return None
    s = sorted(xs)
    return [s[k - 1], s[n - k]]


def percentile_interval(xs: Sequence[float], q: float) -> Optional[list[float]]:
    """``[q, 1-q]`` empirical quantiles (linear interpolation); None when empty."""
    if not xs:
        return None
    return [percentile(xs, q), percentile(xs, 1 - q)]


def ratio_se_paired(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """Standard error of ``mean(xs) / mean(ys)`` over paired samples (the same held-out
    batches scored by two models), by the delta method: ``sd(x_i - R y_i) / (sqrt(n) ȳ)``.
    Shared batch difficulty cancels, so this is the evaluation noise of a loss ratio."""
    n = len(xs)
    if n != len(ys) or n < 2:
        return None
    r = mean(xs) / mean(ys)
    return sample_sd([x - r * y for x, y in zip(xs, ys)]) / (math.sqrt(n) * mean(ys))
