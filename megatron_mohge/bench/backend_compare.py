"""The MoHGE layer with each expert backend on the same weights' draw, timed in interleaved
rounds: the figure behind ``expert_backend: auto`` on CPU (``experts/selection.py``).

Robust to steady background load (a shared machine): both backends run in the same process,
repeat by repeat (the order alternates, AB BA AB ..., so neither always runs second), and the
figure is the *paired* ratio: per repeat ``torch_s / local_s`` of the two runs timed back to
back, whose median and distribution-free 95% interval (``stats.median_ci``) discount load that
changes slowly compared with a repeat. The load average (1/5/15 min) before and after the
timing is reported with it.
"""

from __future__ import annotations

import os
import statistics

import torch

from megatron_mohge.bench.layer_models import BACKENDS, DTYPES, build_mohge_layer, check_int
from megatron_mohge.bench.stats import CONFIDENCE, median_ci
from megatron_mohge.util.numbers import percentile
from megatron_mohge.bench.timing import time_fwd_bwd
from megatron_mohge.config import MoHGEConfig


def _loadavg():
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def compare_expert_backends(mohge: MoHGEConfig, *, hidden_size: int, tokens: int,
                            repeats: int = 20, warmup: int = 3, seed: int = 1234,
                            dispatcher: str = "allgather", dtype: str = "fp32") -> dict:
    """MoHGE layer fwd+bwd with each of ``BACKENDS`` on the same weights' draw (same seed),
    timed in interleaved rounds (the figure behind ``expert_backend: auto`` on CPU).

    Returns ``{"config", "median_s": {backend: s}, "p10_s", "p90_s", "torch_over_local"
    (ratio of the medians), "paired": {"torch_over_local_median", "ci" (95%), "p10", "p90",
    "pairs", "ratios"}, "loadavg": {"before", "after", "cpus"}}``."""
    from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

    from megatron_mohge.training.mcore_plumbing import device

    check_int("repeats", repeats, 1)
    dev = device()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 1, hidden_size, generator=gen).to(dev, getattr(torch, DTYPES[dtype]))
    x.requires_grad_(True)
    layers = {b: build_mohge_layer(mohge, hidden_size, dispatcher, seed, b, dtype).to(dev)
              for b in BACKENDS}
    times = {b: [] for b in BACKENDS}
    load_before = _loadavg()
    try:
        for r in range(warmup + repeats):
            order = BACKENDS if r % 2 == 0 else BACKENDS[::-1]
            for b in order:
                dt = time_fwd_bwd(layers[b], x)
                if r >= warmup:
                    times[b].append(dt)
    finally:
        clear_aux_losses_tracker()
    load_after = _loadavg()
    med = {b: statistics.median(t) for b, t in times.items()}
    ratios = [t / l for t, l in zip(times["torch"], times["local"])]
    paired = dict(torch_over_local_median=statistics.median(ratios),
                  ci=median_ci(ratios, CONFIDENCE), confidence=CONFIDENCE,
                  p10=percentile(ratios, 0.1), p90=percentile(ratios, 0.9), pairs=len(ratios),
                  ratios=ratios)
    return dict(config=dict(hidden_size=hidden_size, tokens=tokens, repeats=repeats,
                            warmup=warmup, dtype=dtype, widths=list(mohge.widths),
                            threads=torch.get_num_threads(), device=str(dev)),
                median_s=med, p10_s={b: percentile(t, 0.1) for b, t in times.items()},
                p90_s={b: percentile(t, 0.9) for b, t in times.items()},
                torch_over_local=med["torch"] / med["local"], paired=paired,
                loadavg=dict(before=load_before, after=load_after, cpus=os.cpu_count()))
