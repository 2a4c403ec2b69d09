"""mohge-bench on a tiny preset: a complete, internally consistent results.json."""

import json
import math

import pytest

from megatron_mohge.bench import e2e
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


def test_tiny_bench_writes_a_complete_consistent_results_json(tmp_path):
    preset = tiny_preset()
    results = e2e.run_bench(preset, tmp_path, names=["moe", "mohge"])
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["runs"].keys() == {"moe", "mohge"}
    runs = on_disk["runs"]
    for name, r in runs.items():
        for key in CONTRACT:
            assert r[key] is not None, (name, key)
        assert r["layout"]["ep"] == 2 and "rank_flops_max_over_mean" in r
        assert math.isclose(sum(r["group_token_share"]), 1.0, rel_tol=1e-6)
        assert r["heldout_ppl"] == pytest.approx(math.exp(r["heldout_loss"]))
        assert r["routed_expert_params"] < r["total_params"]
        assert r["activated_params_per_token"] == pytest.approx(
            r["total_params"] - r["routed_expert_params"] + r["activated_routed_params_per_token"])
        assert r["rank_flops_max_over_mean"] >= 1.0 and r["expert_load_max_over_mean"] >= 1.0
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
    flops = mohge["rank_flops"]
    assert len(flops["all_size"]) == 2 and len(flops["contiguous"]) == 2
    assert set(results["layer_bench"]["median_s"]) >= {"mohge", "moe_equal_total"}
    rep = results["layer_bench_representative"]
    assert {b: r["config"]["backend"] for b, r in rep.items()} == {"local": "local",
                                                                    "torch": "torch"}
    assert rep["torch"]["config"]["widths"] == [2 * w for w in cfg["widths"]]
    assert (tmp_path / "results.md").exists() is False  # the CLI writes the report
    assert "routed_params_reduction" in results["targets"]["figures"]


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
    assert e2e.launch_command(tmp_path / "x.yaml", 2)[1:4] == ["-m", "torch.distributed.run",
                                                                "--standalone"]


def test_cli_dry_run_and_gpu_preset_error(tmp_path, capsys):
    from megatron_mohge.cli.bench import main

    assert main(["--preset", "paper-3b", "--dry-run", "--out", str(tmp_path)]) == 0
    assert "--nproc-per-node=8" in capsys.readouterr().out
    assert (tmp_path / "configs" / "mohge.yaml").exists()
    import torch

    if not torch.cuda.is_available():
        assert main(["--preset", "paper-3b", "--out", str(tmp_path)]) == 2
        assert "GPU" in capsys.readouterr().err
