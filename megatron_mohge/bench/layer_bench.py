"""Forward+backward microbenchmark of one MoE layer: MoHGE against three stock MoE layers.

Every layer is a full Megatron ``MoELayer`` (router + token dispatcher + experts) in fp32
with gated SiLU experts and no biases, run in training mode (load-balancing losses
attached, as in training) on the same input ``x [tokens, 1, hidden]``:

* ``mohge``: the MoHGE layer of ``get_mohge_moe_module_spec`` (group loss switched on,
  i.e. training progress reported as 1.0);
* ``moe_baseline``: Megatron's stock layer, ``stock_num_experts`` experts of width
  ``stock_width``, top-``stock_topk`` (the model-level baseline);
* ``moe_equal_total``: stock layer with MoHGE's routed-expert parameter count: ``E`` experts
  of width round(mean MoHGE expert width), top-``K``;
* ``moe_equal_activated``: stock layer with MoHGE's *measured* activated routed parameters
  per token: ``E`` experts of width round(mean width of the experts MoHGE's router chose
  for ``x``), top-``K``.

Widths are rounded half up (``floor(w + 0.5)``, at least 1). On CPU both sides run their
experts as Megatron's ``SequentialMLP`` (MoHGE: one per width), so it is like for like.

Library use (the caller initialises ``torch.distributed`` and the model-parallel state)::

    from megatron_mohge.training.mcore import init_distributed, init_layout
    init_distributed(); init_layout()
    res = run_layer_bench(cfg, hidden_size=64, tokens=1024, stock_num_experts=16,
                          stock_width=64, stock_topk=2)

Standalone: ``python -m megatron_mohge.bench.layer_bench --config tiny_mohge.yaml
--hidden 64 --tokens 1024 --stock-experts 16 --stock-width 64 --stock-topk 2 --out b.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_mohge.config import MoHGEConfig

KINDS = ("mohge", "moe_baseline", "moe_equal_total", "moe_equal_activated")
DISPATCHERS = ("allgather", "alltoall")
STOCK_AUX_LOSS_COEFF = 1e-2
GATED_MULT = 3  # gated (SwiGLU) expert: gate + up + down projections, no biases


def round_width(value: float) -> int:
    """The width rounding used for the matched stock layers: half up, at least 1."""
    return max(1, int(math.floor(value + 0.5)))


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"run_layer_bench: {name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"run_layer_bench: {name} must be >= {minimum}, got {value}")


def _base_config(hidden_size: int, dispatcher: str, **moe):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(num_layers=1, hidden_size=hidden_size, num_attention_heads=1,
              use_cpu_initialization=True, gated_linear_unit=True, activation_func=F.silu,
              add_bias_linear=False, bf16=False, fp16=False, params_dtype=torch.float32,
              cuda_graph_scope=[],  # the default "full" only warns that it is deprecated
              moe_grouped_gemm=False, moe_token_dispatcher_type=dispatcher,
              moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=STOCK_AUX_LOSS_COEFF)
    kw.update(moe)
    return TransformerConfig(**kw)


def _seed_all(seed: int) -> None:
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def build_mohge_layer(mohge: MoHGEConfig, hidden_size: int, dispatcher: str = "allgather",
                      seed: int = 1234):
    """The MoHGE ``MoELayer`` (local experts), built after seeding, in training mode."""
    from megatron_mohge.specs import get_mohge_moe_module_spec

    tc = mohge.apply_to(_base_config(hidden_size, dispatcher))
    _seed_all(seed)
    # Specs are ModuleSpecs (0.16) or partials (0.19); both are called to build.
    layer = get_mohge_moe_module_spec(mohge, use_te=False)(config=tc, layer_number=1)
    # Full training cost: the scheduled group loss is on (as in the second part of training).
    layer.router.set_training_progress(1.0)
    return layer.train()


def build_stock_layer(num_experts: int, width: int, topk: int, hidden_size: int,
                      dispatcher: str = "allgather", seed: int = 1234):
    """Megatron's stock ``MoELayer`` (``SequentialMLP`` experts, aux-loss balancing)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    tc = _base_config(hidden_size, dispatcher, num_moe_experts=num_experts,
                      moe_ffn_hidden_size=width, moe_router_topk=topk)
    spec = get_moe_module_spec(use_te=False, num_experts=num_experts, moe_grouped_gemm=False)
    _seed_all(seed)
    layer = spec(config=tc, layer_number=1)
    return layer.train()


def measure_mohge_routing(layer, x: torch.Tensor):
    """Route ``x`` once with the MoHGE layer's router (eval mode, no grad, no jitter) and
    return its ``LayerRouting`` (activated routed params/token, mean chosen width...)."""
    from megatron_mohge.metrics import layer_routing

    router = layer.router
    mode = router.training
    router.eval()
    router.reset_routing_counts()
    try:
        with torch.no_grad():
            router(x)
        return layer_routing(router)
    finally:
        router.reset_routing_counts()
        router.train(mode)


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


def _time_fwd_bwd(layer, x: torch.Tensor) -> float:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    _sync(x)
    t0 = time.perf_counter()
    out, _ = layer(x)
    out.sum().backward()
    _sync(x)
    return time.perf_counter() - t0


def _time_router(layer, x: torch.Tensor) -> float:
    # The router forward as the layer runs it in training (grad on, losses attached).
    _sync(x)
    t0 = time.perf_counter()
    probs, routing_map = layer.router(x)
    _sync(x)
    dt = time.perf_counter() - t0
    del probs, routing_map
    return dt


def _quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default), ``q`` in [0, 1]."""
    s = sorted(values)
    pos = q * (len(s) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def run_layer_bench(mohge: MoHGEConfig, *, hidden_size: int, tokens: int, stock_num_experts: int,
                    stock_width: int, stock_topk: int, repeats: int = 20, warmup: int = 3,
                    seed: int = 1234, dispatcher: str = "allgather") -> dict:
    """Time forward + backward of ``out.sum()`` for the four layer kinds (see module doc).

    Needs ``torch.distributed`` and Megatron's model-parallel state (world 1:
    ``init_distributed(); init_layout()``). Returns ``{"config", "kinds", "ratios",
    "median_s"}``; each kind has ``median_s``, ``p10_s``, ``p90_s``, ``router_s``,
    ``router_share``, ``routed_expert_params``, ``activated_routed_params_per_token``,
    ``num_experts``, ``topk`` and its width(s). Clears Megatron's aux-loss tracker at the end
    (the layers log their balancing losses into it).
    """
    if not isinstance(mohge, MoHGEConfig):
        raise TypeError(f"run_layer_bench: mohge must be a MoHGEConfig, got {type(mohge).__name__}")
    _check_int("hidden_size", hidden_size, 1)
    _check_int("tokens", tokens, 1)
    _check_int("stock_num_experts", stock_num_experts, 1)
    _check_int("stock_width", stock_width, 1)
    _check_int("stock_topk", stock_topk, 1)
    _check_int("repeats", repeats, 1)
    _check_int("warmup", warmup, 0)
    _check_int("seed", seed, 0)
    if stock_topk > stock_num_experts:
        raise ValueError(f"run_layer_bench: stock_topk={stock_topk} exceeds "
                         f"stock_num_experts={stock_num_experts}")
    if dispatcher not in DISPATCHERS:
        raise ValueError(f"run_layer_bench: dispatcher must be one of {', '.join(DISPATCHERS)}, "
                         f"got {dispatcher!r}")
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
        raise RuntimeError(
            "run_layer_bench needs torch.distributed and Megatron's model-parallel state; call "
            "megatron_mohge.training.mcore.init_distributed() and init_layout() first (or run "
            "python -m megatron_mohge.bench.layer_bench).")
    from megatron_mohge.compat.mcore import clear_metrics

    from megatron_mohge.training.mcore import device

    dev = device()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 1, hidden_size, generator=gen).to(dev).requires_grad_(True)

    h, K, E = hidden_size, mohge.topk, mohge.num_experts
    layers, info = {}, {}

    layers["mohge"] = build_mohge_layer(mohge, h, dispatcher, seed).to(dev)
    routing = measure_mohge_routing(layers["mohge"], x.detach())
    mean_width = sum(mohge.expert_widths) / E
    info["mohge"] = dict(num_experts=E, topk=K, widths=list(mohge.widths),
                         experts_per_group=list(mohge.experts_per_group),
                         group_topk=mohge.group_topk,
                         routed_expert_params=sum(mohge.routed_params_per_expert(h, gated=True)),
                         activated_routed_params_per_token=routing.activated_routed_params_per_token,
                         mean_width=mean_width, mean_chosen_width=routing.mean_chosen_width,
                         group_token_share=routing.group_token_share)

    def stock(kind: str, n: int, width: int, k: int, **extra) -> None:
        layers[kind] = build_stock_layer(n, width, k, h, dispatcher, seed).to(dev)
        info[kind] = dict(num_experts=n, topk=k, width=width,
                          routed_expert_params=n * GATED_MULT * h * width,
                          activated_routed_params_per_token=float(k * GATED_MULT * h * width),
                          **extra)

    stock("moe_baseline", stock_num_experts, stock_width, stock_topk)
    stock("moe_equal_total", E, round_width(mean_width), K, unrounded_width=mean_width)
    stock("moe_equal_activated", E, round_width(routing.mean_chosen_width), K,
          unrounded_width=routing.mean_chosen_width)

    # Round-robin: each round runs one fwd+bwd and one router forward of every kind (the
    # starting kind rotates), so background load on this shared machine hits all kinds
    # alike instead of whichever kind happened to be timed during a busy spell.
    times = {k: [] for k in KINDS}
    router_times = {k: [] for k in KINDS}
    try:
        for r in range(warmup + repeats):
            order = KINDS[r % len(KINDS):] + KINDS[:r % len(KINDS)]
            for kind in order:
                dt = _time_fwd_bwd(layers[kind], x)
                dr = _time_router(layers[kind], x)
                if r >= warmup:
                    times[kind].append(dt)
                    router_times[kind].append(dr)
    finally:
        layers["mohge"].router.reset_routing_counts()
        for layer in layers.values():
            layer.zero_grad(set_to_none=True)
        clear_metrics()

    kinds = {}
    for kind in KINDS:
        med = statistics.median(times[kind])
        router_s = statistics.median(router_times[kind])
        kinds[kind] = dict(median_s=med, p10_s=_quantile(times[kind], 0.1),
                           p90_s=_quantile(times[kind], 0.9), router_s=router_s,
                           router_share=router_s / med, times_s=times[kind], **info[kind])
    med = {k: kinds[k]["median_s"] for k in KINDS}
    ratios = {
        "mohge_over_equal_total": med["mohge"] / med["moe_equal_total"],
        "mohge_over_equal_activated": med["mohge"] / med["moe_equal_activated"],
        "mohge_over_baseline": med["mohge"] / med["moe_baseline"],
    }
    config = dict(hidden_size=h, tokens=tokens, repeats=repeats, warmup=warmup, seed=seed,
                  dispatcher=dispatcher, device=str(dev), threads=torch.get_num_threads(),
                  widths=list(mohge.widths), experts_per_group=list(mohge.experts_per_group),
                  group_topk=mohge.group_topk, topk=K, stock_num_experts=stock_num_experts,
                  stock_width=stock_width, stock_topk=stock_topk,
                  equal_total_width=info["moe_equal_total"]["width"],
                  equal_activated_width=info["moe_equal_activated"]["width"],
                  width_rounding="half up: floor(w + 0.5), at least 1")
    return {"config": config, "kinds": kinds, "ratios": ratios, "median_s": med}


def _count(n: float) -> str:
    for div, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{suffix}"
    return f"{n:.0f}"


def format_table(result: dict) -> str:
    """Plain-text table of a ``run_layer_bench`` result."""
    c = result["config"]
    head = (f"{'kind':<20} {'E':>4} {'K':>3} {'width':>10} {'routed':>8} {'act/tok':>8} "
            f"{'median ms':>10} {'p10 ms':>8} {'p90 ms':>8} {'router ms':>10} {'router %':>9}")
    lines = [f"MoE layer fwd+bwd: hidden={c['hidden_size']} tokens={c['tokens']} "
             f"repeats={c['repeats']} warmup={c['warmup']} dispatcher={c['dispatcher']} "
             f"device={c.get('device', '?')} threads={c.get('threads', '?')}", head,
             "-" * len(head)]
    for kind, k in result["kinds"].items():
        width = (f"{min(k['widths'])}..{max(k['widths'])}" if "widths" in k else str(k["width"]))
        lines.append(
            f"{kind:<20} {k['num_experts']:>4} {k['topk']:>3} {width:>10} "
            f"{_count(k['routed_expert_params']):>8} "
            f"{_count(k['activated_routed_params_per_token']):>8} {k['median_s'] * 1e3:>10.2f} "
            f"{k['p10_s'] * 1e3:>8.2f} {k['p90_s'] * 1e3:>8.2f} {k['router_s'] * 1e3:>10.3f} "
            f"{k['router_share'] * 100:>8.1f}%")
    lines.append("ratios (median): " + "  ".join(f"{n}={v:.3f}"
                                                 for n, v in result["ratios"].items()))
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m megatron_mohge.bench.layer_bench",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="MoHGE YAML (e.g. examples/configs/tiny_mohge.yaml)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per forward (default 1024)")
    p.add_argument("--stock-experts", type=int, default=16, help="baseline experts (default 16)")
    p.add_argument("--stock-width", type=int, default=64, help="baseline expert width (default 64)")
    p.add_argument("--stock-topk", type=int, default=2, help="baseline top-k (default 2)")
    p.add_argument("--repeats", type=int, default=20, help="timed rounds (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds (default 3)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--dispatcher", choices=DISPATCHERS, default="allgather")
    p.add_argument("--out", type=Path, help="write the result dict as JSON here")
    args = p.parse_args(argv)

    from megatron_mohge.training.mcore import destroy_layout, init_distributed, init_layout

    import torch.distributed as dist

    cfg = MoHGEConfig.from_yaml(args.config)
    own_group = not dist.is_initialized()
    init_distributed()
    init_layout(seed=args.seed)
    try:
        result = run_layer_bench(cfg, hidden_size=args.hidden, tokens=args.tokens,
                                 stock_num_experts=args.stock_experts,
                                 stock_width=args.stock_width, stock_topk=args.stock_topk,
                                 repeats=args.repeats, warmup=args.warmup, seed=args.seed,
                                 dispatcher=args.dispatcher)
    finally:
        destroy_layout()
        if own_group:
            dist.destroy_process_group()
    print(format_table(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        from megatron_mohge.training.health import dumps

        args.out.write_text(dumps(result, indent=2))
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
