"""util.numbers: the one mean / percentile / count-format of the package."""

import re
from pathlib import Path

import pytest

from megatron_mohge.util import numbers

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_mohge"


def test_percentile_hand_values():
    xs = [4.0, 1.0, 3.0, 2.0]  # sorted: 1 2 3 4, positions 0..3
    assert numbers.percentile(xs, 0.0) == 1.0
    assert numbers.percentile(xs, 1.0) == 4.0
    assert numbers.percentile(xs, 0.5) == 2.5
    assert numbers.percentile(xs, 0.1) == pytest.approx(1.3)  # pos 0.3
    assert numbers.percentile(xs, 0.9) == pytest.approx(3.7)  # pos 2.7
    assert numbers.percentile([7.0], 0.1) == 7.0  # one repeat is allowed
    with pytest.raises(ValueError):
        numbers.percentile([], 0.5)


def test_mean_present_skips_none_and_sums_in_order():
    assert numbers.mean_present([1.0, None, 2.0]) == 1.5
    assert numbers.mean_present([None, None]) is None
    xs = [0.1, 0.2, 0.3]
    assert numbers.mean_present(iter(xs)) == sum(xs) / len(xs)  # the builtin sum, as before
    assert numbers.standard_error([1.0]) is None
    assert numbers.standard_error([1.0, 3.0]) == pytest.approx(1.0)


@pytest.mark.parametrize("x, report, sig3, fixed3", [
    (512, "512", "512", "512"),
    (1234, "1.234K", "1.23K", "1.234K"),
    (45_600_000, "45.60M", "45.6M", "45.600M"),
    (123_456_789, "123.5M", "123M", "123.457M"),
    (2_500_000_000, "2.500B", "2.5B", "2.500B"),
])
def test_count_styles_keep_each_tables_text(x, report, sig3, fixed3):
    assert numbers.fmt_count(x, "report") == report
    assert numbers.fmt_count(x, "sig3") == sig3
    assert numbers.fmt_count(x, "fixed3") == fixed3


#: layer_bench.py still has its own `_quantile` / `_count` (another branch owns that file;
#: it should use numbers.percentile and numbers.fmt_count(x, "sig3")).
PENDING = {"bench/layer_bench.py"}


def test_helpers_are_not_written_again():
    found = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "util/numbers.py" or rel in PENDING:
            continue
        text = path.read_text()
        for pattern in (r"def _mean\(", r"def _quantile\(", r"\(1e9, \"B\"\)", r"\(\"B\", 1e9\)",
                        r"pos - i\)|pos - lo\)"):
            if re.search(pattern, text):
                found.append(f"{rel}: {pattern}")
    assert not found, found
