"""One MoE-argument mapping: ``config.megatron`` is the single source of the
MoE fields that ``MoHGEConfig.apply_to``, mohge-train's ``TransformerConfig``, the Megatron-LM
argument hook and the flag renderer use; the benchmark runs' ``TransformerConfig`` is pinned
by a golden file (``tests/_tc_golden.py``). The parse-back pins against Megatron-LM's own parser
live in ``test_megatron_lm_flags.py``."""

import dataclasses
import json
from pathlib import Path


from megatron_mohge.config import MoHGEConfig
from megatron_mohge.config import megatron as CM
from megatron_mohge.config.run import RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_transformer_config_golden(mcore_world1):
    """The default/ablation benchmark runs and the CPU configs build the same
    ``TransformerConfig`` as before the mapping was made one source (every field)."""
    from tests import _tc_golden as tc_golden

    golden = json.loads(tc_golden.GOLDEN.read_text()).get(tc_golden.line())
    assert golden, f"no golden for megatron-core {tc_golden.line()}: see tests/_tc_golden.py"
    runs = tc_golden.golden_runs()
    assert sorted(runs) == sorted(golden["runs"])
    for name, run in runs.items():
        got, want = tc_golden.snapshot(run), tc_golden.expected(golden, name)
        diff = {k: (want.get(k), got.get(k)) for k in {*got, *want} if want.get(k) != got.get(k)}
        assert not diff, (name, diff)


def test_apply_to_changes_only_the_moe_fields():
    from megatron.core.transformer import TransformerConfig

    cfg = MoHGEConfig.paper_3b(router={"z_loss_coeff": 1e-3, "input_jitter_eps": 0.01})
    tc = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                           num_moe_experts=8, moe_router_topk=2, moe_ffn_hidden_size=32,
                           moe_aux_loss_coeff=0.5, expert_model_parallel_size=8)
    out = cfg.apply_to(tc)
    fields = CM.moe_transformer_fields(cfg)
    changed = {f.name for f in dataclasses.fields(tc)
               if getattr(tc, f.name) != getattr(out, f.name)}
    assert changed and changed <= set(fields)
    assert {k: getattr(out, k) for k in fields} == fields


def test_stock_fields_one_rule_for_the_aux_loss(mcore_world1):
    """Stock MoE: Megatron's aux loss iff router topk with a positive coefficient, in
    mohge-train's TransformerConfig and in the Megatron-LM flags alike (they used to differ at
    coefficient 0), and the fp32 router dtype in both."""
    from megatron_mohge.integration.flags import moe_flags
    from megatron_mohge.training.model_builder import transformer_config

    for coeff, lb in ((1e-2, "aux_loss"), (0.0, "none")):
        run = RunConfig.from_dict({"model": {"num_layers": 2}, "moe": {
            "kind": "moe", "num_experts": 4, "expert_hidden_size": 16, "aux_loss_coeff": coeff}})
        tc = transformer_config(run)
        assert (tc.moe_router_load_balancing_type, tc.moe_aux_loss_coeff) == (lb, coeff)
        assert tc.moe_router_dtype == "fp32"
        f = moe_flags(run)
        assert f[f.index("--moe-router-load-balancing-type") + 1] == lb
        assert f[f.index("--moe-router-dtype") + 1] == "fp32"


def test_run_fields_by_kind():
    mohge = RunConfig.from_yaml(ROOT / "examples" / "configs" / "cpu_tiny_mohge.yaml")
    assert CM.run_moe_transformer_fields(mohge.moe) == CM.moe_transformer_fields(mohge.moe.mohge)
    stock = RunConfig.from_dict({"moe": {"kind": "moe", "num_shared_experts": 2,
                                         "shared_expert_hidden_size": 24}})
    s = CM.run_moe_transformer_fields(stock.moe)
    assert s["moe_shared_expert_intermediate_size"] == 48 and s["num_moe_experts"] == 16
    assert CM.megatron_lm_args(s)["num_experts"] == 16 and "num_moe_experts" not in \
        CM.megatron_lm_args(s)
    assert CM.routed_expert_widths(stock.moe) == [64] * 16
    assert CM.routed_expert_widths(mohge.moe) == mohge.moe.mohge.expert_widths
    assert CM.routed_expert_widths(RunConfig.from_dict({"moe": {"kind": "dense"}}).moe) == []


def test_moe_mapping_written_once():
    """No other package module sets Megatron's MoE fields by hand (keyword arguments or dict
    keys) or multiplies out the shared-expert size. The layer bench's bare layers
    (``bench/layer_models.py``) have no run config and keep their own fixed settings."""
    import ast

    fields = {"num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size",
              "moe_shared_expert_intermediate_size", "moe_router_dtype",
              "moe_router_load_balancing_type", "moe_aux_loss_coeff", "moe_z_loss_coeff",
              "moe_input_jitter_eps", "moe_router_pre_softmax"}
    pkg = ROOT / "megatron_mohge"
    allowed = {pkg / "config" / "megatron.py", pkg / "bench" / "layer_models.py"}
    hits = []
    for path in sorted(pkg.rglob("*.py")):
        if path in allowed:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Call):
                names = [k.arg for k in node.keywords if k.arg in fields]
            elif isinstance(node, ast.Dict):
                names = [k.value for k in node.keys
                         if isinstance(k, ast.Constant) and k.value in fields]
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
                names = ["num_shared_experts *" for side in (node.left, node.right)
                         if isinstance(side, ast.Attribute) and side.attr == "num_shared_experts"]
            hit = names
            hits += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in hit]
    assert not hits, hits


def test_local_widths_are_the_plans():
    """``AllocationPlan.local_widths`` is what the layer's experts hold, rank by rank, and
    sums to ``rank_width_sums``; accounting's per-rank memory reads the same widths."""
    from megatron_mohge.accounting import expert_memory_per_rank

    cfg = MoHGEConfig.paper_3b()
    run = RunConfig.from_yaml(ROOT / "examples" / "configs" / "paper_3b_mohge.yaml")
    for ep in (1, 2, 8):
        plan = cfg.allocation_plan(ep)
        for r in range(ep):
            assert plan.local_widths(r) == [cfg.widths[g] for g, _ in plan.local_experts(r)]
            assert plan.local_widths(r) == [cfg.widths[g] for g, ix in plan.local_runs(r)
                                            for _ in ix]
        assert [sum(plan.local_widths(r)) for r in range(ep)] == plan.rank_width_sums
    mem = expert_memory_per_rank(run, world_size=32)
    plan = run.moe.mohge.allocation_plan(run.parallel.expert_parallel)
    assert [r["width_sum"] for r in mem["ranks"]] == plan.rank_width_sums
