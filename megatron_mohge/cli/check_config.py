"""``mohge-check-config RUN.yaml`` (or ``LAYER.yaml --hidden-size H --num-layers L --ep N``).

Validates a run (or a bare MoHGE layer on a given backbone) and prints the numbers to plan
with: total / routed parameters, activated parameters per token (min, uniform-routing
expectation, max), expert memory per EP rank, the all-size allocation table, and warnings.
``--json`` prints the same as JSON. Exit status 2 with the error for an invalid config.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional


from megatron_mohge.cli import common
from megatron_mohge.config import ConfigError, MoHGEConfig, read_yaml_file
from megatron_mohge.config.megatron import FP8_ALIGN
from megatron_mohge import accounting as A
from megatron_mohge.util.numbers import fmt_count

PROG = "mohge-check-config"
TE_WIDTH_MULTIPLE = 128  # TE / cuBLAS grouped GEMMs are fastest on multiples of 128


def _count(x) -> str:  # this tool's style: always three decimals (1.234M)
    return fmt_count(float(x), "fixed3")


def parse_args(argv=None):
    p = common.add_run_file(common.parser(PROG, __doc__), "run-file overrides, e.g. "
                            "parallel.expert_parallel=4", name="config",
                            help="run YAML, or a MoHGE layer YAML (then give the backbone)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="raw tokenizer vocabulary (padded as Megatron-LM pads it); default: from "
                        "model.vocab_size or the tokenizer")
    p.add_argument("--world-size", type=int, default=None,
                   help="ranks (default: launch.nodes x launch.gpus_per_node when the run file "
                        "has a launch section, else the smallest world the layout fits)")
    g = p.add_argument_group("bare MoHGE layer YAML")
    g.add_argument("--hidden-size", type=int, default=None)
    g.add_argument("--num-layers", type=int, default=None)
    g.add_argument("--num-attention-heads", type=int, default=None,
                   help="default hidden_size / 64")
    g.add_argument("--seq-length", type=int, default=4096)
    g.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    g.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    return p.parse_args(argv)


def load_run(args):
    """A ``RunConfig`` from a run YAML, or from a layer YAML plus the backbone options."""
    from megatron_mohge.config.run import RunConfig, config_kind

    path = Path(args.config)
    data = read_yaml_file(path, "config") or {}
    if config_kind(data, str(path)) == "run":
        run = RunConfig.from_yaml(path, args.overrides)
        explicit_launch = "launch" in data or any(o.startswith("launch.") for o in args.overrides)
        return run, False, explicit_launch
    if args.overrides:
        raise ConfigError("key.sub=value overrides apply to run files only")
    if args.hidden_size is None or args.num_layers is None:
        raise ConfigError(f"{path} is a MoHGE layer config: give the backbone with --hidden-size "
                          "and --num-layers (and --ep for the allocation).")
    layer = MoHGEConfig.from_dict(data)
    heads = args.num_attention_heads or max(1, args.hidden_size // 64)
    run = RunConfig.from_dict({
        "name": path.stem,
        "model": {"num_layers": args.num_layers, "hidden_size": args.hidden_size,
                  "num_attention_heads": heads, "seq_length": args.seq_length,
                  "precision": args.precision},
        "moe": {"kind": "mohge", "mohge": layer.to_dict()},
        "parallel": {"expert_parallel": args.ep},
        "launch": {"nodes": 1, "gpus_per_node": args.ep},
        "train": {"micro_batch_size": 1, "global_batch_size": args.ep},
    })
    return run, True, True


def default_world_size(run, explicit_launch: bool) -> int:
    """``launch.nodes x gpus_per_node`` for runs with a ``launch`` section, else the smallest
    world the parallel layout fits (runs meant for ``mohge-train``)."""
    if explicit_launch:
        return run.launch.nodes * run.launch.gpus_per_node
    p = run.parallel
    experts = p.expert_parallel * run.expert_tensor_parallel
    return p.tensor_parallel * p.pipeline_parallel * (experts // math.gcd(experts, p.tensor_parallel))


def warnings_for(run, plan, bare: bool = False) -> list[str]:
    out = []
    moe = run.moe
    etp = run.expert_tensor_parallel
    if moe.kind == "mohge":
        m = moe.mohge
        named = [(f"moe.mohge.widths[{g}]", w) for g, w in enumerate(m.widths)]
        if m.num_shared_experts:
            named.append(("moe.mohge.shared_expert_width", m.shared_expert_width))
    elif moe.kind == "stock":
        named = [("moe.expert_hidden_size", moe.expert_hidden_size)]
        if moe.num_shared_experts:
            named.append(("moe.shared_expert_width", moe.shared_expert_width))
    else:
        named = []
    slow = [f"{n}={w}" for n, w in named if (w // etp) % TE_WIDTH_MULTIPLE]
    if slow:
        out.append(f"width not a multiple of {TE_WIDTH_MULTIPLE} per expert-TP rank (TE/cuBLAS "
                   f"grouped GEMMs run fastest on multiples of 128): {', '.join(slow)}")
    fp8_a, mx_a = FP8_ALIGN["default"], FP8_ALIGN["mxfp8"]
    fp8 = [f"{n}={w}" for n, w in named if (w // etp) % fp8_a]
    if fp8:
        out.append("FP8 would be refused: each expert-TP shard of a width must be a multiple of "
                   f"{fp8_a} ({mx_a} for MXFP8): {', '.join(fp8)}")
    else:
        mx = [f"{n}={w}" for n, w in named if (w // etp) % mx_a]
        if mx:
            out.append(f"MXFP8 would be refused (widths per expert-TP rank must be multiples of "
                       f"{mx_a}): {', '.join(mx)}")
    tok = run.data.tokenizer
    if tok != "byte":
        path = Path(tok).expanduser()
        folder = path if path.suffix != ".json" else path.parent
        if path.suffix == ".json" and path.name != "tokenizer.json":
            out.append(f"data.tokenizer={tok}: Megatron-LM needs a folder holding tokenizer.json "
                       "(and tokenizer_config.json); the Megatron-LM flags refuse this path")
        elif folder.is_dir() and not (folder / "tokenizer_config.json").is_file():
            out.append(f"{folder} has no tokenizer_config.json: Megatron-LM loads HuggingFace "
                       "tokenizers with transformers.AutoTokenizer, which needs one, e.g. "
                       '{"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}'
                       " (eos_token = the eod token the data was prepared with)")
    if plan is not None and plan.imbalance > 1.0 + 1e-9:
        sums = plan.rank_width_sums
        out.append(f"allocation is not exact at EP={plan.ep_size} (strategy {plan.strategy}): "
                   f"per-rank width sums {min(sums)}..{max(sums)}, max/mean "
                   f"{plan.imbalance:.4f}; an EP size dividing every group size gives 1.0")
    if moe.kind == "mohge" and plan is not None and plan.strategy != "all-size":
        out.append(f"not every group size divides EP={plan.ep_size}: ranks do not all hold every "
                   "width, so uneven group popularity loads ranks unevenly")
    if moe.kind == "mohge" and moe.mohge.router.type == "mohge" and not bare:
        lo = moe.mohge.losses
        if lo.group_coeff > 0 and lo.group_start_fraction > 0:
            start = int(run.train.iters * lo.group_start_fraction)
            out.append(f"note: the group-wise loss switches on at iteration {start} "
                       f"(losses.group_start_fraction={lo.group_start_fraction} of "
                       f"train.iters={run.train.iters}); Megatron-LM runs need the MoHGE "
                       "launcher or patch to pass training progress to the routers")
    return out


def analyse(run, vocab_override: Optional[int] = None, world: Optional[int] = None,
            bare: bool = False) -> dict:
    """Everything ``mohge-check-config`` prints, as a JSON-able dict."""
    m, p = run.model, run.parallel
    world = world or run.launch.nodes * run.launch.gpus_per_node
    dp = run.check_world_size(world)
    if m.add_bias_linear and A.shared_width_of(run):
        raise ConfigError("model.add_bias_linear: Megatron's shared experts (SharedExpertMLP) have "
                          "no biases and refuse to build; set add_bias_linear: false or remove "
                          "the shared experts.")
    vocab, vocab_src = A.resolve_vocab(run, vocab_override)
    counts = A.analytic_param_counts(run, vocab)
    widths = A.routed_width_range(run)
    routed_act = A.activated_routed_params(run, widths)
    plan = run.moe.mohge.allocation_plan(p.expert_parallel) if run.moe.kind == "mohge" else None
    warn = warnings_for(run, plan, bare)
    if not vocab:
        warn.insert(0, f"vocabulary unknown ({vocab_src}): embedding/output parameters are "
                       "counted as 0; pass --vocab-size or set model.vocab_size")
    out = {
        "name": run.name,
        "moe_kind": run.moe.kind,
        "router": (run.moe.mohge.router.type if run.moe.kind == "mohge"
                   else run.moe.router if run.moe.kind == "stock" else None),
        "model": {"num_layers": m.num_layers, "num_moe_layers": counts.num_moe_layers,
                  "hidden_size": m.hidden_size, "num_attention_heads": m.num_attention_heads,
                  "num_query_groups": m.num_query_groups or m.num_attention_heads,
                  "seq_length": m.seq_length, "padded_vocab_size": vocab,
                  "vocab_source": vocab_src, "precision": m.precision},
        "parallel": {"world_size": world, "data_parallel": dp, "tensor_parallel": p.tensor_parallel,
                     "pipeline_parallel": p.pipeline_parallel, "expert_parallel": p.expert_parallel,
                     "expert_tensor_parallel": run.expert_tensor_parallel},
        "params": counts.to_dict(),
        "activated_per_token": {
            "routed_width_per_moe_layer": widths.to_dict(),
            "routed_params": routed_act,
            "total_params": {k: counts.non_routed + v for k, v in routed_act.items()},
            "convention": "non-routed parameters (embeddings, output layer, attention, norms, "
                          "dense FFNs, routers, shared experts) plus the routed experts a token "
                          "activates; 'uniform' is the expectation under uniform routing",
        },
        "expert_memory_per_ep_rank": A.expert_memory_per_rank(run, world),
        "allocation": None,
        "warnings": warn,
    }
    if run.moe.kind == "mohge":
        cfg = run.moe.mohge
        out["mohge"] = {"num_groups": cfg.num_groups, "experts_per_group": cfg.experts_per_group,
                        "widths": cfg.widths, "group_topk": cfg.group_topk, "topk": cfg.topk,
                        "num_experts": cfg.num_experts,
                        "mean_expert_width": sum(cfg.expert_widths) / cfg.num_experts,
                        "num_shared_experts": cfg.num_shared_experts,
                        "shared_expert_width": cfg.shared_expert_width,
                        "group_costs": cfg.group_costs}
    if plan is not None:
        out["allocation"] = {"ep_size": plan.ep_size, "strategy": plan.strategy,
                             "imbalance": plan.imbalance, "rank_width_sums": plan.rank_width_sums,
                             "table": plan.table()}
    return out


def render_text(r: dict) -> str:
    mo, pa, pr = r["model"], r["parallel"], r["params"]
    lines = [f"run {r['name']}: moe.kind={r['moe_kind']}"
             + (f", router={r['router']}" if r["router"] else ""),
             f"  backbone: {mo['num_layers']} layers ({mo['num_moe_layers']} MoE), hidden "
             f"{mo['hidden_size']}, {mo['num_attention_heads']} heads ({mo['num_query_groups']} "
             f"kv groups), seq {mo['seq_length']}, vocab {mo['padded_vocab_size']} "
             f"[{mo['vocab_source']}], {mo['precision']}",
             f"  parallel: world {pa['world_size']} = DP {pa['data_parallel']} x TP "
             f"{pa['tensor_parallel']} x PP {pa['pipeline_parallel']}; EP "
             f"{pa['expert_parallel']}, expert-TP {pa['expert_tensor_parallel']}"]
    if "mohge" in r:
        h = r["mohge"]
        lines.append(f"  MoHGE layer: {h['num_groups']} groups x {h['experts_per_group']} experts "
                     f"= {h['num_experts']}, widths {h['widths']} (mean {h['mean_expert_width']:.1f}),"
                     f" Kg={h['group_topk']}, K={h['topk']}, shared {h['num_shared_experts']} x "
                     f"{h['shared_expert_width']}")
    lines.append("")
    lines.append("parameters")
    for key in ("embedding", "output_layer", "attention", "norms", "dense_ffn", "routers",
                "shared_experts", "routed_experts", "total"):
        share = 100.0 * pr[key] / pr["total"] if pr["total"] else 0.0
        lines.append(f"  {key:<16}{pr[key]:>16,}  {_count(pr[key]):>9}  {share:5.1f}%")
    act = r["activated_per_token"]
    w, rp, tp = act["routed_width_per_moe_layer"], act["routed_params"], act["total_params"]
    lines += ["", "activated per token            min         uniform     max",
              f"  routed width / MoE layer  {w['min']:>10,.0f}  {w['uniform']:>10,.1f}  "
              f"{w['max']:>10,.0f}",
              f"  routed params             {_count(rp['min']):>10}  {_count(rp['uniform']):>10}  "
              f"{_count(rp['max']):>10}",
              f"  total params              {_count(tp['min']):>10}  {_count(tp['uniform']):>10}  "
              f"{_count(tp['max']):>10}",
              f"  ({act['convention']})"]
    mem = r["expert_memory_per_ep_rank"]
    if mem.get("ranks"):
        lines += ["", "routed-expert memory per EP rank",
                  f"  assumption: {mem['assumption']}"]
        for rk in mem["ranks"]:
            lines.append(f"  rank {rk['rank']}: {rk['experts']} experts/layer, width sum "
                         f"{rk['width_sum']}, {_count(rk['params'])} params, {rk['gib']:.2f} GiB")
    if r["allocation"]:
        lines += ["", "allocation", *("  " + ln for ln in r["allocation"]["table"].splitlines())]
    lines += ["", "warnings" if r["warnings"] else "warnings: none"]
    lines += [f"  - {x}" for x in r["warnings"]]
    return "\n".join(lines)


@common.entry
def main(argv=None) -> int:
    return common.run_cli(PROG, _check, parse_args(argv))


def _check(args) -> int:
    run, bare, explicit_launch = load_run(args)
    world = args.world_size or default_world_size(run, explicit_launch)
    result = analyse(run, args.vocab_size, world, bare)
    print(json.dumps(result, indent=2) if args.json else render_text(result))
    return 0

if __name__ == "__main__":
    sys.exit(main())
