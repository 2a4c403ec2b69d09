"""The MoE-layer microbenchmark: all kinds timed, matched stock layers, ratios, bad input."""

import math

import pytest

from megatron_mohge import MoHGEConfig
from megatron_mohge.bench.layer_bench import KINDS, round_width, run_layer_bench

pytestmark = pytest.mark.usefixtures("mcore_world1")

HIDDEN = 16


def tiny_cfg():
    return MoHGEConfig(widths=[8, 16, 24, 32], experts_per_group=2, group_topk=2, topk=2)


BENCH_KW = dict(hidden_size=HIDDEN, tokens=64, stock_num_experts=6, stock_width=24, stock_topk=2,
                repeats=3, warmup=1)


@pytest.fixture(scope="module")
def result():
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_mohge.compat import enable_cpu_mode
    from megatron_mohge.training.mcore import init_distributed

    # Module-scoped copy of the mcore_world1 fixture's set-up (the bench runs once).
    enable_cpu_mode()
    if not dist.is_initialized():
        init_distributed()
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()
    return run_layer_bench(tiny_cfg(), **BENCH_KW)


def test_every_kind_is_timed(result):
    assert set(result["kinds"]) == set(KINDS)
    for kind, k in result["kinds"].items():
        assert len(k["times_s"]) == BENCH_KW["repeats"]
        assert k["median_s"] > 0 and k["router_s"] > 0, kind
        assert k["p10_s"] <= k["median_s"] <= k["p90_s"], kind
        assert 0 < k["router_share"] < 1, kind
        assert k["router_share"] == pytest.approx(k["router_s"] / k["median_s"])
        assert result["median_s"][kind] == k["median_s"]


def test_ratios_are_median_quotients(result):
    med = result["median_s"]
    r = result["ratios"]
    assert r["mohge_over_equal_total"] == pytest.approx(med["mohge"] / med["moe_equal_total"])
    assert r["mohge_over_equal_activated"] == pytest.approx(med["mohge"] / med["moe_equal_activated"])
    assert r["mohge_over_baseline"] == pytest.approx(med["mohge"] / med["moe_baseline"])


def test_matched_stock_layers(result):
    cfg = tiny_cfg()
    k = result["kinds"]
    per_width = 3 * HIDDEN  # gated expert: params = 3 * hidden * width
    mohge_routed = sum(cfg.routed_params_per_expert(HIDDEN))
    assert k["mohge"]["routed_expert_params"] == mohge_routed
    eq = k["moe_equal_total"]
    assert (eq["num_experts"], eq["topk"]) == (cfg.num_experts, cfg.topk)
    # Equal total: within one width rounding (half a width unit per expert).
    assert abs(eq["routed_expert_params"] - mohge_routed) <= cfg.num_experts * per_width * 0.5
    assert eq["width"] == round_width(sum(cfg.expert_widths) / cfg.num_experts)
    # MoHGE's measured activated params lie between K narrowest and K widest experts.
    act = k["mohge"]["activated_routed_params_per_token"]
    assert cfg.topk * per_width * min(cfg.widths) <= act <= cfg.topk * per_width * max(cfg.widths)
    ea = k["moe_equal_activated"]
    assert ea["width"] == round_width(k["mohge"]["mean_chosen_width"])
    assert ea["activated_routed_params_per_token"] == cfg.topk * per_width * ea["width"]
    assert abs(ea["activated_routed_params_per_token"] - act) <= cfg.topk * per_width * 0.5
    base = k["moe_baseline"]
    assert base["routed_expert_params"] == 6 * per_width * 24
    assert base["activated_routed_params_per_token"] == 2 * per_width * 24
    c = result["config"]
    assert (c["tokens"], c["hidden_size"], c["stock_width"], c["topk"]) == (64, HIDDEN, 24, 2)
    assert c["widths"] == cfg.widths and c["group_topk"] == 2


def test_round_width_is_half_up():
    assert [round_width(v) for v in (52.5, 53.5, 52.49, 0.2)] == [53, 54, 52, 1]


@pytest.mark.parametrize("arg,value", [("tokens", 0), ("hidden_size", -1), ("repeats", 0),
                                       ("stock_topk", 7), ("dispatcher", "flex")])
def test_bad_input_names_the_argument(arg, value):
    kw = dict(BENCH_KW, **{arg: value})
    with pytest.raises(ValueError, match=arg):
        run_layer_bench(tiny_cfg(), **kw)


def test_standalone_main_writes_json(tmp_path, capsys):
    import json

    from megatron_mohge.bench import layer_bench

    yaml_path = tmp_path / "cfg.yaml"
    tiny_cfg().to_yaml(yaml_path)
    out = tmp_path / "bench.json"
    res = layer_bench.main(["--config", str(yaml_path), "--hidden", "16", "--tokens", "32",
                            "--stock-experts", "4", "--stock-width", "16", "--repeats", "2",
                            "--warmup", "0", "--out", str(out)])
    data = json.loads(out.read_text())
    assert set(data["median_s"]) == set(KINDS) and math.isfinite(res["ratios"]["mohge_over_baseline"])
    assert "moe_equal_activated" in capsys.readouterr().out
