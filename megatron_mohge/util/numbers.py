"""Small numeric and text helpers used by training, the bench and the CLIs (stated once here).

Plain ``sum / len`` and linear interpolation, not :mod:`statistics`: ``statistics.mean``
computes exactly through fractions and ``statistics.quantiles`` interpolates as
``(d[j]*(n-δ) + d[j+1]*δ) / n``; both differ from these in the last bits, and results files
and their tests compare figures exactly.
"""

from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence


def mean(xs: Sequence[float]) -> float:
    """Arithmetic mean; ValueError for an empty sample."""
    if not xs:
        raise ValueError("mean of an empty sample")
    return sum(xs) / len(xs)


def mean_present(values: Iterable[Optional[float]]) -> Optional[float]:
    """Mean of the values that are not None; None when there are none."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def mean_by_ep(by_ep_dicts) -> dict:
    """``{ep: {"<layout>_max_over_mean": mean over the dicts}}`` from dicts shaped like
    ``{ep: {"<layout>_max_over_mean": x, ...}}`` (None skipped; other keys, e.g. per-rank
    lists, dropped). Keys keep their first-seen order."""
    flops: dict = {}
    for by_ep in by_ep_dicts:
        for ep, d in (by_ep or {}).items():
            for k, v in d.items():
                if k.endswith("_max_over_mean"):
                    flops.setdefault(ep, {}).setdefault(k, []).append(v)
    return {ep: {k: mean_present(v) for k, v in d.items()} for ep, d in flops.items()}


def sample_sd(xs: Sequence[float]) -> float:
    """Sample standard deviation (n - 1 in the denominator); 0 for one value."""
    n = len(xs)
    if n < 2:
        return 0.0
    m = mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))


def standard_error(xs: Sequence[float]) -> Optional[float]:
    """Standard error of the mean, sd / sqrt(n); None for fewer than two values."""
    return sample_sd(xs) / math.sqrt(len(xs)) if len(xs) >= 2 else None


def percentile(xs: Sequence[float], q: float) -> float:
    """Empirical quantile ``q`` in [0, 1] by linear interpolation (numpy's default); one
    value is its own quantile. ValueError for an empty sample."""
    if not xs:
        raise ValueError("percentile of an empty sample")
    s = sorted(xs)
    pos = q * (len(s) - 1)
    i = int(math.floor(pos))
    j = min(i + 1, len(s) - 1)
    return s[i] + (s[j] - s[i]) * (pos - i)


#: How each table prints a count scaled to B / M / K (scaled value -> digits).
COUNT_STYLES = {
    # markdown reports: three significant-looking digits, 1.23B / 45.6M / 789K
    "report": lambda y: f"{y:.{3 if abs(y) < 10 else 2 if abs(y) < 100 else 1}f}",
    "fixed3": lambda y: f"{y:.3f}",  # mohge-check-config: always three decimals
}


def fmt_count(x: float, style: str = "report") -> str:
    """A parameter / token count as ``1.23B``, ``45.6M``, ``7.89K`` or ``512``."""
    digits = COUNT_STYLES[style]
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{digits(x / div)}{suffix}"
    return f"{x:.0f}"
