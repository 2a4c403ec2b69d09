"""The MoE-layer microbenchmark: all kinds timed, matched stock layers, ratios, bad input."""

import math
import statistics

import pytest

from megatron_mohge import MoHGEConfig
from megatron_mohge.bench.layer_bench import run_layer_bench
from megatron_mohge.bench.layer_models import KINDS, round_width
from megatron_mohge.util import numbers

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
    from megatron_mohge.training.mcore_plumbing import init_distributed

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
        assert k["router_s"] > 0, kind
        # The summary figures are exactly the package's quantile / median of the samples
        # (one percentile formula: util.numbers); the router share is their quotient.
        assert k["median_s"] == statistics.median(k["times_s"]), kind
        assert k["p10_s"] == numbers.percentile(k["times_s"], 0.1), kind
        assert k["p90_s"] == numbers.percentile(k["times_s"], 0.9), kind
        assert k["router_share"] == k["router_s"] / k["median_s"], kind
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


def test_expert_gemm_flops_and_matmul_reference(result):
    cfg = tiny_cfg()
    gemm = 3 * 2 * 3 * HIDDEN  # fwd+bwd GEMM FLOPs per (token, width unit) of a gated expert
    tokens = BENCH_KW["tokens"]
    for kind in ("moe_baseline", "moe_equal_total", "moe_equal_activated"):
        k = result["kinds"][kind]
        # Dropless routing at EP=1: the experts see tokens * topk assignments.
        assert k["expert_gemm_flops"] == tokens * k["topk"] * gemm * k["width"]
        assert k["expected_routed_flops_per_token"] == 2 * 3 * HIDDEN * k["topk"] * k["width"]
    m = result["kinds"]["mohge"]
    assert m["expert_gemm_flops"] == pytest.approx(
        tokens * cfg.topk * gemm * m["mean_chosen_width"])
    mean_w = sum(cfg.expert_widths) / cfg.num_experts
    assert m["expected_routed_flops_per_token"] == pytest.approx(2 * 3 * HIDDEN * cfg.topk * mean_w)
    same = result["kinds"][result["config"]["same_expected_flops_kind"]]
    assert abs(same["expected_routed_flops_per_token"] - m["expected_routed_flops_per_token"]) \
        <= 2 * 3 * HIDDEN * cfg.topk * 0.5  # one width rounding
    mm = result["matmul"]
    assert mm["flops"] == pytest.approx(m["expert_gemm_flops"], rel=0.05)
    for k in result["kinds"].values():
        assert k["expert_s"] > 0 and k["expert_gflops"] == pytest.approx(
            k["expert_gemm_flops"] / k["expert_s"] / 1e9)
        assert k["expert_gflops_over_matmul"] == pytest.approx(k["expert_gflops"] / mm["gflops"])


def test_torch_backend_runs_every_layer_on_grouped_gemms():
    from megatron_mohge.experts.torch_backend import TorchGroupedMLP

    res = run_layer_bench(tiny_cfg(), **dict(BENCH_KW, repeats=1, warmup=0), backend="torch")
    assert res["config"]["backend"] == "torch"
    assert set(res["kinds"]) == set(KINDS)
    # (the stock layers' expert class is checked by building one)
    from megatron_mohge.bench.layer_models import build_stock_layer

    layer = build_stock_layer(4, 8, 2, HIDDEN, backend="torch")
    assert isinstance(layer.experts, TorchGroupedMLP)


def test_compare_expert_backends():
    from megatron_mohge.bench.backend_compare import compare_expert_backends

    res = compare_expert_backends(tiny_cfg(), hidden_size=HIDDEN, tokens=32, repeats=7, warmup=0)
    assert set(res["median_s"]) == {"local", "torch"}
    assert res["torch_over_local"] == pytest.approx(res["median_s"]["torch"]
                                                    / res["median_s"]["local"])
    # paired: one torch/local ratio per repeat, their median inside its interval
    paired = res["paired"]
    assert paired["pairs"] == len(paired["ratios"]) == 7
    # (an order-statistic interval always holds the median: pin the sources instead)
    from megatron_mohge.bench.stats import median_ci

    assert paired["torch_over_local_median"] == statistics.median(paired["ratios"])
    assert paired["ci"] == median_ci(paired["ratios"]) == [min(paired["ratios"]),
                                                           max(paired["ratios"])]  # n=7
    assert len(res["loadavg"]["before"]) == 3 and res["loadavg"]["cpus"] >= 1


def test_compare_expert_backends_pairs_interleaved_rounds(monkeypatch):
    """With a scripted clock (the layers are real): warm-up rounds dropped, the backends'
    order alternating round by round, each torch time paired with the same round's local
    time, and every figure exactly the package's median / quantile of those samples."""
    from megatron_mohge.bench import backend_compare
    from megatron_mohge.bench.stats import median_ci
    from megatron_mohge.experts.torch_backend import TorchGroupedMLP

    calls = []

    def scripted(layer, x):
        b = "torch" if any(isinstance(m, TorchGroupedMLP) for m in layer.modules()) else "local"
        calls.append(b)
        n = calls.count(b)  # this backend's round, 1-based
        return float(n) if b == "local" else 0.5 * n + (0.25 if n % 3 == 0 else 0.0)

    monkeypatch.setattr(backend_compare, "time_fwd_bwd", scripted)
    res = backend_compare.compare_expert_backends(tiny_cfg(), hidden_size=HIDDEN, tokens=32,
                                                  repeats=5, warmup=2)
    assert calls == ["local", "torch", "torch", "local"] * 3 + ["local", "torch"]
    local = [3.0, 4.0, 5.0, 6.0, 7.0]  # rounds 3..7: the two warm-up rounds are dropped
    torch_ = [0.5 * n + (0.25 if n % 3 == 0 else 0.0) for n in range(3, 8)]
    ratios = [t / l for t, l in zip(torch_, local)]
    assert res["median_s"] == {"local": 5.0, "torch": statistics.median(torch_)}
    assert res["torch_over_local"] == statistics.median(torch_) / 5.0
    assert res["p10_s"] == {"local": numbers.percentile(local, 0.1),
                            "torch": numbers.percentile(torch_, 0.1)}
    paired = res["paired"]
    assert paired["ratios"] == ratios and paired["pairs"] == 5
    assert paired["torch_over_local_median"] == statistics.median(ratios)
    assert (paired["p10"], paired["p90"]) == (numbers.percentile(ratios, 0.1),
                                              numbers.percentile(ratios, 0.9))
    assert paired["ci"] == median_ci(ratios)


def test_median_ci_is_the_sign_test_interval():
    from megatron_mohge.bench.stats import median_ci

    # n=20 at 95%: P(Binom(20, 1/2) <= 5) = 0.0207 <= 0.025 < P(<= 6), so x_(6) .. x_(15)
    assert median_ci(list(range(20, 0, -1))) == [6, 15]
    assert median_ci([1.0, 2.0, 3.0, 4.0, 5.0]) is None  # too few for 95%


def test_width_scale():
    from megatron_mohge.bench.layer_models import scale_widths

    cfg = MoHGEConfig(widths=[8, 16], experts_per_group=2, group_topk=1, topk=2,
                      num_shared_experts=1, shared_expert_width=8)
    scaled = scale_widths(cfg, 4)
    assert scaled.widths == [32, 64] and scaled.shared_expert_width == 32
    assert scale_widths(cfg, 1) is cfg


@pytest.mark.parametrize("arg,value", [("tokens", 0), ("hidden_size", -1), ("repeats", 0),
                                       ("stock_topk", 7), ("dispatcher", "flex"),
                                       ("backend", "te"), ("dtype", "fp8")])
def test_bad_input_names_the_argument(arg, value):
    kw = dict(BENCH_KW, **{arg: value})
    with pytest.raises(ValueError, match=arg):
        run_layer_bench(tiny_cfg(), **kw)


def test_standalone_main_writes_json(tmp_path, capsys):
    import json

    from megatron_mohge.cli import layer_bench

    yaml_path = tmp_path / "cfg.yaml"
    tiny_cfg().to_yaml(yaml_path)
    out = tmp_path / "bench.json"
    res = layer_bench.main(["--config", str(yaml_path), "--hidden", "16", "--tokens", "32",
                            "--stock-experts", "4", "--stock-width", "16", "--repeats", "2",
                            "--warmup", "0", "--out", str(out)])
    data = json.loads(out.read_text())
    assert set(data["median_s"]) == set(KINDS) and math.isfinite(res["ratios"]["mohge_over_baseline"])
    assert "moe_equal_activated" in capsys.readouterr().out
