"""Tiny MoHGE vs stock Megatron MoE training on CPU (the README's main job).

Trains the same small GPT backbone three times on the same real text (byte-level tokens of
the Python standard library's own source files), same seed, data order and step budget:

* ``moe``: Megatron's stock ``MoELayer`` (uniform experts, TopKRouter + aux loss);
* ``mohge``: MoHGE experts/router from ``--config`` (renorm weighting);
* ``mohge_paper``: the same with the released code's ``paper`` weighting.

Prints a table (params, activated routed params per token measured from routing, held-out
loss/perplexity, tokens/s) and writes ``<out>/results.json``. Runs single-process by
default; under ``torchrun`` the ``--tp/--ep/--pp`` layout is used (gloo on CPU).
This is a small demonstration, not the benchmark; figures depend on the tiny budget.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import sysconfig
import time
import warnings
from pathlib import Path

import torch

from megatron_mohge import MoHGEConfig, get_mohge_decoder_block_spec, set_training_progress
from megatron_mohge.metrics import reset_routing_counts, routing_metrics
from megatron_mohge.training import mcore as M

VOCAB = 256  # byte-level tokens
# megatron-core warns at import that Apex / Transformer Engine are absent (expected on CPU).
warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")


def stdlib_corpus(max_bytes: int) -> torch.Tensor:
    """Bytes of the Python standard library's .py files (exists on every machine)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    if not chunks:
        raise SystemExit(f"no Python sources found under {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)[:max_bytes]), dtype=torch.uint8).long()


def batches(data: torch.Tensor, step: int, seed: int, global_batch: int, micro_batch: int,
            seq: int) -> list[dict]:
    """This DP rank's micro-batches of random windows (same global batch on every layout)."""
    from megatron.core import parallel_state as ps

    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, data.numel() - seq - 1, (global_batch,), generator=gen)
    seqs = torch.stack([data[s:s + seq + 1] for s in starts.tolist()])
    local = seqs.chunk(ps.get_data_parallel_world_size())[ps.get_data_parallel_rank()]
    pos = torch.arange(seq).unsqueeze(0).expand(micro_batch, -1).contiguous()
    return [dict(tokens=mb[:, :-1].contiguous(), labels=mb[:, 1:].contiguous(), position_ids=pos,
                 loss_mask=torch.ones(micro_batch, seq)) for mb in local.split(micro_batch)]


def backbone(args, **moe):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    tp = ps.get_tensor_model_parallel_world_size()
    return TransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        ffn_hidden_size=4 * args.hidden, normalization="RMSNorm", gated_linear_unit=True,
        activation_func=torch.nn.functional.silu, add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, init_method_std=0.02, use_cpu_initialization=True,
        params_dtype=torch.float32, tensor_model_parallel_size=tp, sequence_parallel=tp > 1,
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        moe_token_dispatcher_type="alltoall" if ps.get_expert_model_parallel_world_size() > 1
        else "allgather", moe_router_dtype="fp32", **moe)


def run(name: str, args, data_train, data_val, mc: MoHGEConfig | None) -> dict:
    M.init_layout(args.tp, args.ep, args.pp, seed=args.seed)
    if mc is None:  # stock MoE: uniform experts of the baseline width, Megatron's aux loss
        tc = backbone(args, num_moe_experts=args.stock_experts, moe_ffn_hidden_size=args.stock_width,
                      moe_router_topk=args.stock_topk, moe_aux_loss_coeff=1e-2,
                      moe_router_load_balancing_type="aux_loss")
        spec = None
    else:
        tc = mc.apply_to(backbone(args))
        spec = get_mohge_decoder_block_spec(tc, mc, use_te=False)
    model = M.wrap_ddp(M.build_gpt(tc, spec, vocab_size=VOCAB, seq_length=args.seq), tc)
    opt = M.build_optimizer(model, lr=args.lr)
    bare = M.unwrap(model)
    params = sum(p.numel() for p in bare.parameters())
    routed = sum(p.numel() for n, p in bare.named_parameters() if ".experts." in n)
    losses, t0, timed_from = [], time.perf_counter(), min(2, args.steps - 1)
    for step in range(args.steps):
        if step == timed_from:  # exclude one-time warm-up (lazy init, first allocations)
            t0 = time.perf_counter()
        set_training_progress(model, step, args.steps)
        b = batches(data_train, step, args.seed, args.global_batch, args.micro_batch, args.seq)
        losses.append(M.train_step(model, opt, b))
        if M.rank() == 0 and (step % args.log_every == 0 or step == args.steps - 1):
            print(f"  [{name}] step {step:4d}  loss {losses[-1]:.4f}", flush=True)
    elapsed = time.perf_counter() - t0
    reset_routing_counts(model)
    model.eval()
    val = [M.eval_loss(model, batches(data_val, i, args.seed + 1, args.global_batch,
                                      args.micro_batch, args.seq)) for i in range(args.eval_batches)]
    model.train()
    heldout = sum(val) / len(val)
    if mc is None:  # uniform experts: every token activates exactly K experts
        per_expert = 3 * args.hidden * args.stock_width
        activated = args.layers * args.stock_topk * per_expert
    else:
        activated = routing_metrics(model).activated_routed_params_per_token
    metrics = routing_metrics(model).to_dict() if mc is not None else None
    M.destroy_layout()
    return dict(total_params=params, routed_expert_params=routed,
                activated_routed_params_per_token=activated, train_losses=losses,
                heldout_loss=heldout, heldout_ppl=math.exp(heldout),
                train_tokens_per_s=(args.steps - timed_from) * args.global_batch * args.seq / elapsed,
                routing=metrics)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(Path(__file__).parent / "configs" / "tiny_mohge.yaml"))
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--stock-experts", type=int, default=16)
    p.add_argument("--stock-width", type=int, default=64)
    p.add_argument("--stock-topk", type=int, default=2)
    p.add_argument("--corpus-bytes", type=int, default=4_000_000)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--runs", default="moe,mohge,mohge_paper")
    p.add_argument("--out", default="runs/tiny_cpu")
    args = p.parse_args(argv)

    M.init_distributed()
    mc = MoHGEConfig.from_yaml(args.config)
    data = stdlib_corpus(args.corpus_bytes)
    split = int(0.95 * data.numel())
    train, val = data[:split], data[split:]
    if M.rank() == 0:
        print(f"corpus: {data.numel():,} bytes of Python stdlib source "
              f"({split:,} train / {data.numel() - split:,} held out)")
    results = {}
    variants = {"moe": None, "mohge": mc,
                "mohge_paper": MoHGEConfig.from_dict(
                    {**mc.to_dict(), "router": {**mc.to_dict()["router"],
                                                 "expert_weighting": "paper"}})}
    for name in args.runs.split(","):
        if name not in variants:
            raise SystemExit(f"--runs: unknown run {name!r}; choose from {', '.join(variants)}")
        if M.rank() == 0:
            print(f"training {name} ...", flush=True)
        results[name] = run(name, args, train, val, variants[name])

    if M.rank() == 0:
        base = results.get("moe")
        print("\n| run | total params | routed params | activated routed/token | held-out loss "
              "| ppl | tokens/s |\n|---|---|---|---|---|---|---|")
        for name, r in results.items():
            rel = ""
            if base and name != "moe":
                rel = (f" ({r['routed_expert_params'] / base['routed_expert_params'] - 1:+.1%})",
                       f" ({r['activated_routed_params_per_token'] / base['activated_routed_params_per_token'] - 1:+.1%})",
                       f" ({r['heldout_loss'] / base['heldout_loss'] - 1:+.2%})")
            rp, ap, hl = rel if rel else ("", "", "")
            print(f"| {name} | {r['total_params']:,} | {r['routed_expert_params']:,}{rp} | "
                  f"{r['activated_routed_params_per_token']:,.0f}{ap} | {r['heldout_loss']:.4f}{hl} "
                  f"| {r['heldout_ppl']:.2f} | {r['train_tokens_per_s']:,.0f} |")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(dict(args=vars(args), runs=results), indent=1))
        print(f"\nwrote {out / 'results.json'}")
    M.destroy_layout()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
