"""mohge-bench on a tiny preset: a complete, internally consistent results.json."""

import json
import math

import pytest

from megatron_mohge.bench import e2e, runner, stats
from megatron_mohge.util import numbers
from megatron_mohge.bench.aggregate import aggregate_runs, compare_runs, mean_over_seeds
from megatron_mohge.bench.presets import get_preset
from megatron_mohge.config import ConfigError

CONTRACT = ("total_params", "routed_expert_params", "activated_params_per_token", "heldout_loss",
            "heldout_ppl", "train_tokens_per_s", "peak_mem_bytes", "group_token_share",
            "expert_load_cv", "expert_load_max_over_mean")


def tiny_preset():
    p = get_preset("default")
    p.base["model"] = dict(num_layers=2, hidden_size=32, num_attention_heads=4, seq_length=32)
    p.base["data"] = dict(tokenizer="byte", default_corpus_bytes=300_000)
    p.base["train"].update(iters=4, global_batch_size=8, micro_batch_size=2, lr_warmup_iters=1)
    p.base["eval"] = dict(interval=2, iters=2)
    p.base["logging"]["interval"] = 1
    p.layer_bench = dict(hidden_size=32, tokens=64, stock_num_experts=16, stock_width=64,
                         stock_topk=2, repeats=2, warmup=1)
    p.layer_bench_representative = dict(p.layer_bench, width_scale=2, repeats=1, warmup=0,
                                        backends=["local", "torch"])
    return p


@pytest.mark.pipeline
def test_tiny_bench_writes_a_complete_consistent_results_json(tmp_path):
    """Two seeds, two runs at a time: figures are seed means of the per-seed figures, and
    the comparisons' intervals are the paired Student-t intervals of the per-seed ratios."""
    preset = tiny_preset()
    results = e2e.run_bench(preset, tmp_path, names=["moe", "mohge"], seeds=[11, 12], jobs=2)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["runs"].keys() == {"moe", "mohge"}
    assert on_disk["seeds"] == [11, 12] and on_disk["seed"] == 11
    assert on_disk["config"]["runs"].keys() == {"moe", "mohge"}  # what produced the figures
    runs = on_disk["runs"]
    _check_seed_consistency(on_disk, with_targets=True)
    for name, r in runs.items():
        for key in CONTRACT:
            assert r[key] is not None, (name, key)
        assert r["layout"]["ep"] == 2 and "rank_flops_max_over_mean" in r
        assert math.isclose(sum(r["group_token_share"]), 1.0, rel_tol=1e-6)
        assert r["heldout_ppl"] == pytest.approx(math.exp(r["heldout_loss"]))
        assert r["routed_expert_params"] < r["total_params"]
        assert r["activated_params_per_token"] == pytest.approx(
            r["total_params"] - r["routed_expert_params"] + r["activated_routed_params_per_token"])
        layout = "all_size" if name == "mohge" else "contiguous"
        for f in r["per_seed"]:  # the trainer's layer means, read back, not recomputed
            summary = json.loads((tmp_path / "runs" / name / f"seed{f['seed']}" /
                                  "summary.json").read_text())
            assert f["rank_flops_by_ep"] == summary["rank_flops_by_ep"]
            assert f["rank_flops_max_over_mean"] == \
                summary["rank_flops_by_ep"]["2"][f"{layout}_max_over_mean"]
            assert f["expert_load_max_over_mean"] == summary["expert_load_max_over_mean"] == \
                numbers.mean([l["expert_load_max_over_mean"] for l in summary["layers"]])
    moe, mohge = runs["moe"], runs["mohge"]
    cfg = preset.run_dicts(["mohge"])["mohge"]["moe"]["mohge"]
    hidden, layers = 32, 2
    per_expert = [3 * hidden * w for w, n in zip(cfg["widths"], cfg["experts_per_group"])
                  for _ in range(n)]
    assert mohge["routed_expert_params"] == layers * sum(per_expert)
    assert moe["routed_expert_params"] == layers * 16 * 3 * hidden * 64
    # exactly K=2 experts per token: activated routed params lie between the 2 cheapest and
    # the 2 widest experts, per layer
    k = cfg["topk"]
    lo, hi = layers * sum(sorted(per_expert)[:k]), layers * sum(sorted(per_expert)[-k:])
    assert lo <= mohge["activated_routed_params_per_token"] <= hi
    assert moe["activated_routed_params_per_token"] == pytest.approx(layers * 2 * 3 * hidden * 64)
    assert len(mohge["group_token_share"]) == len(cfg["widths"])
    assert math.isclose(sum(mohge["chosen_width_hist"]["fraction"]), 1.0, rel_tol=1e-6)
    widths_E = [w for w, n in zip(cfg["widths"], cfg["experts_per_group"]) for _ in range(n)]
    for f in mohge["per_seed"]:  # the histogram and activated params from the measured counts
        summary = json.loads((tmp_path / "runs" / "mohge" / f"seed{f['seed']}" /
                              "summary.json").read_text())
        per_width = {w: 0.0 for w in cfg["widths"]}
        activated = 0.0
        for layer in summary["layers"]:
            for n, w, p_e in zip(layer["tokens_per_expert"], widths_E, per_expert):
                per_width[w] += n
                activated += n * p_e / layer["tokens"]
        total = sum(per_width.values())
        assert f["chosen_width_hist"] == {"widths": cfg["widths"], "fraction": pytest.approx(
            [per_width[w] / total for w in cfg["widths"]])}
        assert f["activated_routed_params_per_token"] == pytest.approx(activated)
    flops = mohge["rank_flops"]
    assert len(flops["all_size"]) == 2 and len(flops["contiguous"]) == 2
    assert set(results["layer_bench"]["median_s"]) >= {"mohge", "moe_equal_total"}
    rep = results["layer_bench_representative"]
    assert {b: r["config"]["backend"] for b, r in rep.items()} == {"local": "local",
                                                                    "torch": "torch"}
    assert rep["torch"]["config"]["widths"] == [2 * w for w in cfg["widths"]]
    assert json.loads(json.dumps(results)) == on_disk  # what is returned is what is written
    assert "routed_params_reduction" in results["targets"]["figures"]


def _check_seed_consistency(res, with_targets=False):
    seeds = res["seeds"]
    for name, r in res["runs"].items():
        assert r["seeds"] == seeds and [f["seed"] for f in r["per_seed"]] == seeds
        per = r["heldout_loss_per_seed"]
        assert per == [f["heldout_loss"] for f in r["per_seed"]]
        assert r["heldout_loss"] == pytest.approx(numbers.mean(per))
        assert r["activated_params_per_token"] == pytest.approx(
            numbers.mean(r["activated_params_per_token_per_seed"]))
        assert r["heldout_ppl"] == pytest.approx(math.exp(r["heldout_loss"]))
        # the held-out set: the same number of tokens for every seed, with its noise
        assert len({f["heldout_tokens"] for f in r["per_seed"]}) == 1
        assert all(f["heldout_loss_se"] > 0 for f in r["per_seed"])
    # different seeds train different models (weights, data order)
    assert len(set(res["runs"]["moe"]["heldout_loss_per_seed"])) == len(seeds)
    comp = res["comparisons"]["mohge_vs_moe"]
    assert comp["seeds"] == seeds
    t = stats.t_quantile(0.975, len(seeds) - 1)
    for field, short in (("heldout_loss", "loss"), ("activated_params_per_token",
                                                    "activated_params"),
                         ("expert_load_cv", "expert_load_cv"),
                         ("rank_flops_max_over_mean", "rank_flops_max_over_mean")):
        ratios = [a[field] / b[field] for a, b in zip(res["runs"]["mohge"]["per_seed"],
                                                      res["runs"]["moe"]["per_seed"])]
        assert comp[f"{short}_ratio_per_seed"] == pytest.approx(ratios)
        mean = numbers.mean(ratios)
        assert comp[f"{short}_ratio_mean"] == pytest.approx(mean)
        lo, hi = comp[f"{short}_ratio_ci95"]
        assert (lo + hi) / 2 == pytest.approx(mean)
        assert hi - lo == pytest.approx(2 * t * numbers.sample_sd(ratios) / math.sqrt(len(seeds)))
    assert len(comp["loss_ratio_eval_se"]) == len(seeds)
    if with_targets:
        assert res["targets"]["figures"]["heldout_loss_ratio_ci95_high"] == \
            comp["loss_ratio_ci95"][1]


def test_seed_report_and_plot(tmp_path):
    """results.md shows every seed's loss and the paired intervals; the loss plot has them."""
    from megatron_mohge.bench.report import write_report

    per_seed = {n: [_fake_fig(n, s, loss) for s, loss in zip((1, 2, 3), losses)]
                for n, losses in (("moe", (2.0, 2.2, 2.1)), ("mohge", (1.9, 2.3, 2.0)))}
    res = {"seeds": [1, 2, 3], "valid_seed": 1234, "baseline": "moe",
           "runs": aggregate_runs(per_seed),
           "comparisons": compare_runs(per_seed, [("mohge", "moe")])}
    _check_seed_consistency(res)
    paths = write_report(res, tmp_path)
    md = paths["results.md"].read_text()
    assert "3 seeds (1, 2, 3)" in md and "valid_seed 1234" in md
    assert "| mohge | 1.9000 | 2.3000 | 2.0000 | 2.0667 |" in md
    c = res["comparisons"]["mohge_vs_moe"]
    assert f"{c['loss_ratio_ci95'][0]:.4f}, {c['loss_ratio_ci95'][1]:.4f}" in md
    assert paths["loss_curves.png"].stat().st_size > 1000


def _fake_fig(name, seed, loss):
    routed = 100.0 if name == "moe" else 81.25
    act = 900.0 + (20.0 if name == "moe" else 15.0 + seed)
    return {"kind": "moe" if name == "moe" else "mohge", "seed": seed, "heldout_loss": loss,
            "heldout_ppl": math.exp(loss), "heldout_loss_se": 0.01, "heldout_tokens": 4096,
            "heldout_batch_losses": [loss - 0.05, loss + 0.05, loss],
            "total_params": 1000.0 + routed, "routed_expert_params": routed,
            "activated_params_per_token": act, "activated_routed_params_per_token": act - 900,
            "expert_load_cv": 0.5 + 0.1 * seed, "rank_flops_max_over_mean": 1.0 + 0.01 * seed,
            "group_token_share": [0.5, 0.5],
            "curves": {"iteration": [1, 2, 3], "train_loss": [3.0, loss + 0.3, loss + 0.1],
                       "eval_iteration": [3], "eval_loss": [loss]}}


def test_mean_over_seeds_and_resolve_seeds():
    assert mean_over_seeds([{"a": 1, "b": [1.0, 2.0], "c": "x", "it": [5, 10]},
                            {"a": 3, "b": [3.0, 4.0], "c": "y", "it": [5, 10]}]) == \
        {"a": 2.0, "b": [2.0, 3.0], "c": "x", "it": [5, 10]}
    p = get_preset("default")
    assert e2e.resolve_seeds(p) == list(p.seeds) and len(p.seeds) >= 3
    assert e2e.resolve_seeds(p, [2], 7) == [7, 8]
    assert e2e.resolve_seeds(p, None, 7) == [7]
    assert e2e.resolve_seeds(p, [5, 9, 1]) == [5, 9, 1]
    with pytest.raises(ConfigError, match="seeds repeat"):
        e2e.resolve_seeds(p, [5, 5])
    with pytest.raises(ConfigError, match="--seeds 0"):
        e2e.resolve_seeds(p, [0])


@pytest.mark.parametrize("argv, match", [
    (["--seeds", "1234"], r"--seeds 1234 asks for 1234 seeds \(one number is a count, at most "
                          r"20\); for the one seed 1234 use --seed 1234"),
    (["--jobs", "0"], r"--jobs 0: run at least one job at a time"),
])
def test_a_seed_count_above_the_limit_and_jobs_0_are_refused(tmp_path, capsys, argv, match):
    """Issue 25.7 / 25.6: --seeds 1234 planned 2,468 trainings; --jobs 0 fell back to the
    preset's value (``jobs or preset.jobs``). Both are one line, before anything is written."""
    from megatron_mohge.cli.bench import main

    assert len(e2e.resolve_seeds(get_preset("default"), [e2e.MAX_SEED_COUNT], 1)) == 20
    assert main(["--out", str(tmp_path / "b"), "--dry-run", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mohge-bench: ")
    import re

    assert re.search(match, err), err
    assert not (tmp_path / "b").exists()


def test_presets_and_errors(tmp_path):
    with pytest.raises(ConfigError, match="--preset"):
        get_preset("nope")
    with pytest.raises(ConfigError, match="no run 'x'"):
        get_preset("default").run_dicts(["x"])
    runs = e2e.run_configs(get_preset("paper-3b"), tmp_path)
    assert runs["moe"].moe.num_experts == 64 and runs["mohge"].moe.mohge.topk == 6
    assert runs["mohge"].model == runs["moe"].model  # same backbone
    abl = e2e.run_configs(get_preset("load-balance-ablation"), tmp_path)
    assert [r.moe.noisy_gating.importance_coeff > 0 for r in abl.values()] == [False, True,
                                                                              False, True]
    # torchrun through megatron_mohge.cli.launch: a rank's usage error comes back as one line
    assert runner.launch_command(tmp_path / "x.yaml", 2)[1:4] == ["-m", "megatron_mohge.cli.launch",
                                                                "--standalone"]


def test_cli_dry_run_and_gpu_preset_error(tmp_path, capsys, monkeypatch):
    from megatron_mohge.cli.bench import main

    assert main(["--preset", "paper-3b", "--dry-run", "--out", str(tmp_path)]) == 0
    assert "--nproc-per-node=8" in capsys.readouterr().out
    assert (tmp_path / "configs" / "mohge.seed1234.yaml").exists()
    assert main(["--preset", "default", "--dry-run", "--seeds", "2", "--seed", "5",
                 "--out", str(tmp_path / "d")]) == 0
    assert {p.name for p in (tmp_path / "d" / "configs").iterdir()} == {
        f"{n}.seed{s}.yaml" for n in ("moe", "mohge") for s in (5, 6)}
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # on every machine
    assert main(["--preset", "paper-3b", "--out", str(tmp_path)]) == 2
    assert "GPU" in capsys.readouterr().err


def test_eval_and_valid_seed_fields_are_validated():
    from megatron_mohge.config.run import RunConfig

    run = RunConfig.from_dict({"eval": {"iters": 8, "final_iters": 64}})
    assert run.eval.final_batches == 64 and run.data.valid_seed == 1234
    assert RunConfig.from_dict({"eval": {"iters": 8}}).eval.final_batches == 8
    with pytest.raises(ConfigError, match="eval.final_iters"):
        RunConfig.from_dict({"eval": {"final_iters": 0}})
    with pytest.raises(ConfigError, match="data.valid_seed"):
        RunConfig.from_dict({"data": {"valid_seed": "x"}})
    assert RunConfig.from_dict({"data": {"valid_seed": None}}).data.valid_seed is None
