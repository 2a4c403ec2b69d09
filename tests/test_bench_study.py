"""The scaling-study preset: its definition, its analysis on known curves, and (slow) a tiny
end-to-end study."""

import math
import random

import pytest

from megatron_mohge.bench import e2e, stats
from megatron_mohge.util import numbers
from megatron_mohge.bench.aggregate import aggregate_runs
from megatron_mohge.bench.presets import STUDY_HIDDEN, get_preset
from megatron_mohge.bench.study import analyze, study_markdown


def test_study_preset_is_parameter_matched(tmp_path):
    p = get_preset("study")
    assert len(p.seeds) >= 3 and p.jobs == 2 and p.nproc == 1
    runs = e2e.run_configs(p, tmp_path, seed=5)
    sizes = p.study["sizes"]
    # the members: the default runs and the control arms trained on request (test_bench_arms)
    assert len(sizes) >= 3 and set(p.study["runs"]) == set(runs) | set(p.optional_runs)
    assert max(STUDY_HIDDEN) ** 2 / min(STUDY_HIDDEN) ** 2 >= 4  # params ~ hidden^2
    for h in STUDY_HIDDEN:
        moe, mohge = runs[f"moe_h{h}"], runs[f"mohge_h{h}"]
        # same backbone recipe; only the MoE layer differs
        assert moe.model == mohge.model and moe.model.hidden_size == h
        assert moe.train == mohge.train and moe.train.seed == 5
        m = mohge.moe.mohge
        stock_routed = moe.moe.num_experts * moe.moe.expert_hidden_size
        assert sum(m.expert_widths) / stock_routed == pytest.approx(0.8125)
        assert m.topk == moe.moe.topk
    assert p.comparison_pairs(list(runs)) == [(f"mohge_h{h}", f"moe_h{h}") for h in STUDY_HIDDEN]


def _fake_study_results(seeds, shift=1.25, noise=0.0):
    """Stock loss 6 - 0.3 ln N; MoHGE at N has the stock loss of shift*N (known ratio)."""
    spec = get_preset("study").study
    rng = random.Random(0)
    per_seed = {}
    for name, m in spec["runs"].items():
        h = int(m["size"][1:])
        n = 52 * h * h * (0.8125 if m["kind"] == "mohge" else 1.0)
        figs = []
        for s in seeds:
            eff = n * (shift if m["kind"] == "mohge" else 1.0)
            loss = 6.0 - 0.3 * math.log(eff) + noise * rng.gauss(0, 1)
            figs.append({"seed": s, "heldout_loss": loss, "total_params": n,
                         "activated_params_per_token": n / 8,
                         "curves": {"iteration": [10, 80, 100],
                                    "train_loss": [9.0, loss + 0.1, loss]}})
        per_seed[name] = figs
    return {"seeds": seeds, "runs": aggregate_runs(per_seed)}, spec


def test_study_analysis_recovers_a_known_efficiency_ratio():
    res, spec = _fake_study_results([1, 2, 3])
    study = analyze(res, spec, bootstrap_samples=200)
    fit = study["fits"]["total_params"]["moe"]
    assert fit["d"] == pytest.approx(-0.3) and fit["residual_rms"] == pytest.approx(0, abs=1e-9)
    eff = study["efficiency"]["mohge_vs_moe"]["total_params"]
    assert eff["geomean"] == pytest.approx(1.25)
    assert eff["per_size"] == pytest.approx([1.25] * 3)
    assert eff["geomean_ci95"] == pytest.approx([1.25, 1.25])  # no seed noise
    # activated params are total / 8 for both kinds: the same ratio on that axis
    assert study["efficiency"]["mohge_vs_moe"]["activated_params_per_token"]["geomean"] == \
        pytest.approx(1.25)
    t = study["kinds"]["mohge"]
    assert t["tail_drop"] == pytest.approx([0.1 / (l + 0.1) for l in t["loss_mean"]])
    md = study_markdown(study)
    assert "1.250" in md and "loss = c + d*ln(N)" in md


def test_study_analysis_interval_with_seed_noise():
    res, spec = _fake_study_results([1, 2, 3, 4], noise=0.02)
    study = analyze(res, spec, bootstrap_samples=300)
    eff = study["efficiency"]["mohge_vs_moe"]["total_params"]
    lo, hi = eff["geomean_ci95"]
    assert lo < eff["geomean"] < hi and eff["bootstrap"]["seeds"] == 4
    for kind, t in study["kinds"].items():
        for per, m, ci in zip(t["loss_per_seed"], t["loss_mean"], t["loss_ci95"]):
            # the Student-t interval of the seed mean: centred on it, t(0.975, n-1) sd/sqrt(n)
            # either side (a symmetric interval always holds its mean: check where it is)
            half = stats.t_quantile(0.975, len(per) - 1) * numbers.sample_sd(per) / len(per) ** 0.5
            assert m == pytest.approx(numbers.mean(per)) and half > 0
            assert ci == pytest.approx([m - half, m + half], rel=1e-12)


@pytest.mark.slow
def test_tiny_study_end_to_end(tmp_path):
    """Two seeds of a shrunken study (2 layers, seq 32, 3 steps, 2 of the sizes): results,
    fits, efficiency ratio with its interval, markdown and the study plot."""
    from megatron_mohge.bench.plots import STUDY_PLOT
    from megatron_mohge.bench.report import write_report

    p = get_preset("study")
    p.base["model"].update(num_layers=2, seq_length=32)
    p.base["data"] = dict(tokenizer="byte", default_corpus_bytes=300_000)
    p.base["train"].update(global_batch_size=8, micro_batch_size=8, lr_warmup_iters=1)
    p.base["eval"] = dict(interval=0, iters=2, final_iters=4)
    p.base["logging"]["interval"] = 1
    names = [n for n in p.runs if not n.endswith(f"h{STUDY_HIDDEN[-1]}")]
    res = e2e.run_bench(p, tmp_path, names=names, seeds=[3, 4], iters=3)
    study = res["study"]
    assert [len(t["sizes"]) for t in study["kinds"].values()] == [2, 2]
    for t in study["kinds"].values():
        assert all(len(per) == 2 for per in t["loss_per_seed"])
        assert t["total_params"][1] > 2 * t["total_params"][0]
    eff = study["efficiency"]["mohge_vs_moe"]["total_params"]
    assert len(eff["per_size"]) == 2 and "bootstrap" in eff
    comp = res["comparisons"]
    assert set(comp) == {f"mohge_h{h}_vs_moe_h{h}" for h in STUDY_HIDDEN[:2]}
    paths = write_report(res, tmp_path)
    assert "## Scaling study" in paths["results.md"].read_text()
    assert paths[STUDY_PLOT].stat().st_size > 1000
