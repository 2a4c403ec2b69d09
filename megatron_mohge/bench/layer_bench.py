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

Widths are rounded half up (``floor(w + 0.5)``, at least 1). ``moe_equal_total`` also has
MoHGE's *expected* routed FLOPs per token (same ``E``, ``K`` and mean width: the
uniform-routing expectation), so it is the same-expected-FLOPs comparison too
(``ratios.mohge_over_same_expected_flops``).

``backend`` picks the expert GEMMs of *every* layer, so each comparison is like for like:
``local`` = Megatron's ``SequentialMLP`` (MoHGE: one per width), ``torch`` =
``TorchGroupedMLP`` (one ``torch._grouped_mm`` per linear; MoHGE: per width).

Besides the layer times, each kind reports its experts alone (``expert_s``: forward +
backward of the expert module on the tokens the dispatcher gave it) and the achieved
``expert_gflops`` of their GEMM FLOPs (``3 x 2 x tokens x 3 x hidden x width`` summed over
experts: fwd + two bwd GEMMs of a gated expert; activation time included), against
``matmul_gflops`` of one plain ``[tokens*K, hidden] @ [hidden, 3*w]`` matmul fwd+bwd of the
same FLOPs as MoHGE's experts, timed in the same rounds.

Library use (the caller initialises ``torch.distributed`` and the model-parallel state)::

    from megatron_mohge.training.mcore_plumbing import init_distributed, init_layout
    init_distributed(); init_layout()
    res = run_layer_bench(cfg, hidden_size=64, tokens=1024, stock_num_experts=16,
                          stock_width=64, stock_topk=2)

Standalone: ``python -m megatron_mohge.cli.layer_bench --config tiny_mohge.yaml
--hidden 64 --tokens 1024 --stock-experts 16 --stock-width 64 --stock-topk 2 --out b.json``.
"""

from __future__ import annotations

import statistics

import torch


# The layer builders and shapes, and the timers, live in their own modules.
from megatron_mohge.bench.layer_models import (
    BACKENDS,
    DISPATCHERS,
    DTYPES,
    GATED_MULT,
    KINDS,
    SAME_EXPECTED_FLOPS_KIND,
    build_mohge_layer,
    build_stock_layer,
    check_int,
    expert_gemm_flops,
    measure_mohge_routing,
    round_width,
)
from megatron_mohge.util.numbers import percentile
from megatron_mohge.bench.timing import (
    capture_expert_inputs,
    time_experts,
    time_fwd_bwd,
    time_matmul,
    time_router,
)
from megatron_mohge.config import MoHGEConfig


def run_layer_bench(mohge: MoHGEConfig, *, hidden_size: int, tokens: int, stock_num_experts: int,
                    stock_width: int, stock_topk: int, repeats: int = 20, warmup: int = 3,
                    seed: int = 1234, dispatcher: str = "allgather", backend: str = "local",
                    dtype: str = "fp32") -> dict:
    """Time forward + backward of ``out.sum()`` for the four layer kinds (see module doc).

    Needs ``torch.distributed`` and Megatron's model-parallel state (world 1:
    ``init_distributed(); init_layout()``). Returns ``{"config", "kinds", "ratios",
    "median_s"}``; each kind has ``median_s``, ``p10_s``, ``p90_s``, ``router_s``,
    ``router_share``, ``routed_expert_params``, ``activated_routed_params_per_token``,
    ``num_experts``, ``topk`` and its width(s), plus ``expert_s``, ``expert_gflops``,
    ``expert_gemm_flops``, ``expected_routed_flops_per_token`` (forward, uniform routing) and
    ``routed_flops_per_token`` (forward, measured routing). ``matmul`` holds the plain-matmul
    reference. Clears Megatron's aux-loss tracker at the end (the layers log their
    balancing losses into it).
    """
    if not isinstance(mohge, MoHGEConfig):
        raise TypeError(f"run_layer_bench: mohge must be a MoHGEConfig, got {type(mohge).__name__}")
    check_int("hidden_size", hidden_size, 1)
    check_int("tokens", tokens, 1)
    check_int("stock_num_experts", stock_num_experts, 1)
    check_int("stock_width", stock_width, 1)
    check_int("stock_topk", stock_topk, 1)
    check_int("repeats", repeats, 1)
    check_int("warmup", warmup, 0)
    check_int("seed", seed, 0)
    if stock_topk > stock_num_experts:
        raise ValueError(f"run_layer_bench: stock_topk={stock_topk} exceeds "
                         f"stock_num_experts={stock_num_experts}")
    if dispatcher not in DISPATCHERS:
        raise ValueError(f"run_layer_bench: dispatcher must be one of {', '.join(DISPATCHERS)}, "
                         f"got {dispatcher!r}")
    if backend not in BACKENDS:
        raise ValueError(f"run_layer_bench: backend must be one of {', '.join(BACKENDS)}, "
                         f"got {backend!r}")
    if dtype not in DTYPES:
        raise ValueError(f"run_layer_bench: dtype must be one of {', '.join(DTYPES)}, "
                         f"got {dtype!r}")
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
        raise RuntimeError(
            "run_layer_bench needs torch.distributed and Megatron's model-parallel state; call "
            "megatron_mohge.training.mcore_plumbing.init_distributed() and init_layout() first (or run "
            "python -m megatron_mohge.cli.layer_bench).")
    from megatron_mohge.compat.mcore import clear_metrics

    from megatron_mohge.training.mcore_plumbing import device

    dev = device()
    gen = torch.Generator().manual_seed(seed)
    tdtype = getattr(torch, DTYPES[dtype])
    x = torch.randn(tokens, 1, hidden_size, generator=gen).to(dev, tdtype).requires_grad_(True)

    h, K, E = hidden_size, mohge.topk, mohge.num_experts
    layers, info = {}, {}

    layers["mohge"] = build_mohge_layer(mohge, h, dispatcher, seed, backend, dtype).to(dev)
    routing = measure_mohge_routing(layers["mohge"], x.detach())
    mean_width = sum(mohge.expert_widths) / E
    info["mohge"] = dict(num_experts=E, topk=K, widths=list(mohge.widths),
                         experts_per_group=list(mohge.experts_per_group),
                         group_topk=mohge.group_topk,
                         routed_expert_params=sum(mohge.routed_params_per_expert(h, gated=True)),
                         activated_routed_params_per_token=routing.activated_routed_params_per_token,
                         mean_width=mean_width, mean_chosen_width=routing.mean_chosen_width,
                         group_token_share=routing.group_token_share,
                         expected_routed_flops_per_token=2.0 * GATED_MULT * h * K * mean_width,
                         routed_flops_per_token=2.0 * routing.activated_routed_params_per_token)

    def stock(kind: str, n: int, width: int, k: int, **extra) -> None:
        layers[kind] = build_stock_layer(n, width, k, h, dispatcher, seed, backend,
                                         dtype).to(dev)
        flops = 2.0 * k * GATED_MULT * h * width
        info[kind] = dict(num_experts=n, topk=k, width=width,
                          routed_expert_params=n * GATED_MULT * h * width,
                          activated_routed_params_per_token=float(k * GATED_MULT * h * width),
                          expected_routed_flops_per_token=flops, routed_flops_per_token=flops,
                          **extra)

    stock("moe_baseline", stock_num_experts, stock_width, stock_topk)
    stock("moe_equal_total", E, round_width(mean_width), K, unrounded_width=mean_width)
    stock("moe_equal_activated", E, round_width(routing.mean_chosen_width), K,
          unrounded_width=routing.mean_chosen_width)

    # Round-robin: each round runs one fwd+bwd and one router forward of every kind (the
    # starting kind rotates), so background load on this shared machine hits all kinds
    # alike instead of whichever kind happened to be timed during a busy spell.
    # The experts' own inputs (what the dispatcher hands them) and their GEMM FLOPs.
    expert_in, flops, grads = {}, {}, {}
    for kind in KINDS:
        expert_in[kind] = capture_expert_inputs(layers[kind], x.detach())
        counts = expert_in[kind][1]
        widths = (layers[kind].experts.plan.local_widths(0) if kind == "mohge"  # one rank
                  else [info[kind]["width"]] * len(counts))
        flops[kind] = expert_gemm_flops(counts, widths, h)
        grads[kind] = torch.randn(expert_in[kind][0].shape, generator=gen).to(dev, tdtype)
    # Plain matmul with the FLOPs of MoHGE's experts: [T*K, h] @ [h, 3 * mean chosen width].
    assignments = sum(expert_in["mohge"][1])
    mm_cols = max(1, round(flops["mohge"] / (3 * 2 * max(assignments, 1) * h)))
    mm_a = torch.randn(assignments, h, generator=gen).to(dev, tdtype).requires_grad_(True)
    mm_b = (torch.randn(h, mm_cols, generator=gen) * h ** -0.5).to(dev, tdtype).requires_grad_(True)
    mm_grad = torch.randn(assignments, mm_cols, generator=gen).to(dev, tdtype)
    mm_flops = 3 * 2.0 * assignments * h * mm_cols

    times = {k: [] for k in KINDS}
    router_times = {k: [] for k in KINDS}
    expert_times = {k: [] for k in KINDS}
    mm_times = []
    try:
        for r in range(warmup + repeats):
            order = KINDS[r % len(KINDS):] + KINDS[:r % len(KINDS)]
            for kind in order:
                dt = time_fwd_bwd(layers[kind], x)
                dr = time_router(layers[kind], x)
                de = time_experts(layers[kind], expert_in[kind], grads[kind])
                if r >= warmup:
                    times[kind].append(dt)
                    router_times[kind].append(dr)
                    expert_times[kind].append(de)
            dm = time_matmul(mm_a, mm_b, mm_grad)
            if r >= warmup:
                mm_times.append(dm)
    finally:
        layers["mohge"].router.counter.reset()
        for layer in layers.values():
            layer.zero_grad(set_to_none=True)
        clear_metrics()

    kinds = {}
    for kind in KINDS:
        med = statistics.median(times[kind])
        router_s = statistics.median(router_times[kind])
        expert_s = statistics.median(expert_times[kind])
        kinds[kind] = dict(median_s=med, p10_s=percentile(times[kind], 0.1),
                           p90_s=percentile(times[kind], 0.9), router_s=router_s,
                           router_share=router_s / med, times_s=times[kind], expert_s=expert_s,
                           expert_gemm_flops=flops[kind],
                           expert_gflops=flops[kind] / expert_s / 1e9,
                           **info[kind])
    mm_s = statistics.median(mm_times)
    matmul = dict(shape=[assignments, h, mm_cols], flops=mm_flops, median_s=mm_s,
                  gflops=mm_flops / mm_s / 1e9)
    for k in kinds.values():
        k["expert_gflops_over_matmul"] = k["expert_gflops"] / matmul["gflops"]
    med = {k: kinds[k]["median_s"] for k in KINDS}
    ratios = {
        "mohge_over_equal_total": med["mohge"] / med["moe_equal_total"],
        "mohge_over_equal_activated": med["mohge"] / med["moe_equal_activated"],
        "mohge_over_baseline": med["mohge"] / med["moe_baseline"],
        "mohge_over_same_expected_flops": med["mohge"] / med[SAME_EXPECTED_FLOPS_KIND],
    }
    config = dict(hidden_size=h, tokens=tokens, repeats=repeats, warmup=warmup, seed=seed,
                  dispatcher=dispatcher, device=str(dev), threads=torch.get_num_threads(),
                  backend=backend, dtype=dtype, same_expected_flops_kind=SAME_EXPECTED_FLOPS_KIND,
                  widths=list(mohge.widths), experts_per_group=list(mohge.experts_per_group),
                  group_topk=mohge.group_topk, topk=K, stock_num_experts=stock_num_experts,
                  stock_width=stock_width, stock_topk=stock_topk,
                  equal_total_width=info["moe_equal_total"]["width"],
                  equal_activated_width=info["moe_equal_activated"]["width"],
                  width_rounding="half up: floor(w + 0.5), at least 1")
    # Target: MoHGE's router share at most 2 points above the equal-total stock layer's.
    share_points = 100 * (kinds["mohge"]["router_share"] - kinds["moe_equal_total"]["router_share"])
    return {"config": config, "kinds": kinds, "ratios": ratios, "median_s": med,
            "matmul": matmul, "router_share_points_over_equal_total": share_points}


def format_table(result: dict) -> str:
    """Plain-text table of a ``run_layer_bench`` result: the cells and notes of the report's
    markdown table (``report.layer_bench_rows`` / ``layer_bench_notes``)."""
    from megatron_mohge.bench.fmt import text_table
    from megatron_mohge.bench.report import layer_bench_notes, layer_bench_rows

    c = result["config"]
    return "\n".join([f"MoE layer fwd+bwd: hidden={c['hidden_size']} tokens={c['tokens']} "
                      f"repeats={c['repeats']} warmup={c['warmup']} dispatcher={c['dispatcher']} "
                      f"backend={c.get('backend', 'local')} dtype={c.get('dtype', 'fp32')} "
                      f"device={c.get('device', '?')} threads={c.get('threads', '?')}",
                      text_table(*layer_bench_rows(result)), *layer_bench_notes(result)])
