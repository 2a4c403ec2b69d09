"""mohge-bench's progress lines (bench/progress.py) and when its loss targets are judged
(bench/verdicts.py)."""

import pytest

from megatron_mohge.bench import progress, verdicts
from megatron_mohge.bench.figures import target_checks


def test_progress_counts_runs_and_estimates_from_finished_wall_times():
    p = progress.Progress(total=6, jobs=2)
    assert [p.start() for _ in range(3)] == ["run 1/6", "run 2/6", "run 3/6"]
    assert p.eta_s() is None  # nothing finished yet: no estimate
    assert p.finish(100.0) == "run 1/6 done, ETA 5 min"  # 5 left, 2 at once: 3 rounds of 100 s
    assert p.finish(200.0) == "run 2/6 done, ETA 5 min"  # mean 150 s x 2 rounds
    assert p.eta_s() == pytest.approx(300.0)
    for _ in range(3):
        p.finish(150.0)
    assert p.finish(150.0) == "run 6/6 done"  # the last one: no ETA


def test_durations_read_naturally():
    assert [progress.duration(s) for s in (5, 89, 600, 5400, 9000)] == [
        "5 s", "89 s", "10 min", "1.5 h", "2.5 h"]


def test_layer_bench_line_names_shape_backend_and_grows_with_the_work():
    lb = dict(hidden_size=64, tokens=1024, stock_num_experts=16, stock_width=64, stock_topk=2,
              repeats=20, warmup=3)
    line = progress.layer_bench_line(lb, "local", cuda=False)
    assert "hidden 64" in line and "1024 tokens" in line and "local experts" in line
    assert "3 + 20 rounds" in line and "about " in line
    big = dict(lb, hidden_size=1024, tokens=8192, stock_width=1024)
    big_line = progress.layer_bench_line(big, "torch", cuda=False)
    assert line.endswith(" s") and big_line.endswith((" min", " h"))  # 256x the FLOPs


def _results(steps, seeds, loss_ratio=1.0):
    def run(loss):
        return {"routed_expert_params": 100, "heldout_loss": loss,
                "activated_routed_params_per_token": 10, "activated_params_per_token": 50,
                "iterations": steps, "seeds": list(range(seeds))}

    mohge = dict(run(2.0 * loss_ratio), routed_expert_params=80,
                 activated_routed_params_per_token=7)
    return {"baseline": "moe", "seeds": list(range(seeds)),
            "runs": {"moe": run(2.0), "mohge": mohge},
            "comparisons": {"mohge_vs_moe": {"loss_ratio_ci95": [0.99, 1.005]}}}


@pytest.mark.parametrize("steps, seeds, why", [
    (5, 1, "5 steps < 1000, 1 seed < 3"),
    (300, 3, "300 steps < 1000"),
    (2000, 2, "2 seeds < 3"),
    (None, 3, "steps not recorded"),
])
def test_a_short_or_one_seed_bench_does_not_judge_loss_targets(steps, seeds, why):
    t = target_checks(_results(steps, seeds))
    met = t["met"]
    assert met["heldout_loss<=+1%"] is None and met["heldout_loss_ratio_ci95<=1.01"] is None
    assert t["not_judged"] == f"{verdicts.TOO_FEW} ({why})"
    # parameter counts are facts of the config: judged at any length
    assert met["routed_params_reduction>=0.18"] is True
    assert met["activated_routed_reduction>=0.20"] is True


def test_a_long_multi_seed_bench_judges_loss_targets_both_ways():
    assert target_checks(_results(1000, 3))["met"]["heldout_loss<=+1%"] is True
    missed = target_checks(_results(1000, 3, loss_ratio=1.05))
    assert missed["met"]["heldout_loss<=+1%"] is False and "not_judged" not in missed


def test_steps_fall_back_to_the_last_logged_iteration():
    assert verdicts.train_steps({"curves": {"iteration": [10, 20, 300]}}) == 300
    assert verdicts.train_steps({}) is None


def test_verdict_words():
    assert [verdicts.verdict(v) for v in (True, False, None)] == [
        "met", "**missed**", "too few steps/seeds to judge"]
    assert verdicts.verdict(False, shout=True) == "MISSED"


def test_report_says_too_few_instead_of_met():
    from megatron_mohge.bench.report import markdown_report

    res = _results(5, 1)
    res["targets"] = target_checks(res)
    md = markdown_report(res)
    assert "| heldout_loss<=+1% | too few steps/seeds to judge |" in md
    assert "Loss targets not judged: too few steps/seeds to judge (5 steps" in md
