"""util.numbers: the one mean / percentile / count-format of the package."""

import pytest

from megatron_mohge.util import numbers


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


# The layer-bench text table's own style ("sig3", 1.23K) went with its own cells: it prints the
# markdown table's cells (report.layer_bench_rows, tests/test_bench_report.py).
@pytest.mark.parametrize("x, report, fixed3", [
    (512, "512", "512"),
    (1234, "1.234K", "1.234K"),
    (45_600_000, "45.60M", "45.600M"),
    (123_456_789, "123.5M", "123.457M"),
    (2_500_000_000, "2.500B", "2.500B"),
])
def test_count_styles_keep_each_tables_text(x, report, fixed3):
    assert numbers.fmt_count(x, "report") == report
    assert numbers.fmt_count(x, "fixed3") == fixed3
    assert set(numbers.COUNT_STYLES) == {"report", "fixed3"}


def test_rank_flops_means_by_ep_of_layers_and_of_log_windows():
    """balance_figures (over layers) and train_balance (over log windows) average rank FLOPs
    max/mean with one helper: the mean per EP size and layout, other keys dropped."""
    from megatron_mohge.training.run_figures import balance_figures, train_balance

    def layer(a2, c2, a4):
        return {"expert_load_cv": 0.1, "expert_load_max_over_mean": 1.5,
                "rank_flops": {"2": {"ep": 2, "all_size": [1.0, 1.0], "all_size_max_over_mean": a2,
                                     "contiguous_max_over_mean": c2},
                               "4": {"all_size_max_over_mean": a4}}}

    figs = balance_figures([layer(1.0, 1.5, 2.0), layer(1.25, 1.75, None)])
    assert figs["rank_flops_by_ep"] == {"2": {"all_size_max_over_mean": 1.125,
                                              "contiguous_max_over_mean": 1.625},
                                        "4": {"all_size_max_over_mean": 2.0}}
    hist = [{"iteration": it, "expert_load_cv": cv,
             "rank_flops_by_ep": {"2": {"x_max_over_mean": f}}} for it, cv, f in ((10, 0.5, 9.0), (80, 0.25, 1.5), (100, 0.75, 2.5))]
    train = train_balance(hist, iters=100)  # the last quarter: iterations 80 and 100
    assert train["expert_load_cv"] == 0.5
    assert train["rank_flops_by_ep"] == {"2": {"x_max_over_mean": 2.0}}
    assert numbers.mean_by_ep([None, {}]) == {}


def test_ffn_parameter_formula_is_stated_once():
    from megatron_mohge.sizes import ffn_param_coeffs, ffn_params

    for gated in (True, False):
        for bias in (True, False):
            per_width, per_expert = ffn_param_coeffs(16, gated, bias)
            for w in (8, 24):
                assert ffn_params(16, w, gated, bias) == per_width * w + per_expert
    assert ffn_params(16, 24, True, True, etp=2) == 16 * 24 + 12 * 16 + 24 + 16
