"""What ``mohge-bench`` says while it works: "run 3/6" and an ETA in its per-run lines, and
one line before the layer microbenchmark (what it times, about how long)."""

from __future__ import annotations

import math
from typing import Optional


def duration(seconds: float) -> str:
    """``45 s``, ``12 min``, ``2.5 h``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """Counts the runs of a bench (``total``, up to ``jobs`` at once) as they start and end.

    The ETA is the mean wall time of the finished runs times the rounds of ``jobs`` runs
    still to finish (the runs in flight count as whole runs): rough -- run kinds differ in
    cost -- but it needs nothing but what the bench measured."""

    def __init__(self, total: int, jobs: int = 1):
        self.total, self.jobs = total, max(1, jobs)
        self.started = 0
        self.walls: list[float] = []

    def start(self) -> str:
        """``run 3/6`` for the next run to start."""
        self.started += 1
        return f"run {self.started}/{self.total}"

    def finish(self, wall_s: Optional[float]) -> str:
        """``run 3/6 done`` and, while runs remain, ``ETA ...`` (from finished wall times)."""
        if wall_s is not None:
            self.walls.append(float(wall_s))
        done = len(self.walls)
        text = f"run {done}/{self.total} done"
        eta = self.eta_s()
        if eta is not None:
            text += f", ETA {duration(eta)}"
        return text

    def eta_s(self) -> Optional[float]:
        left = self.total - len(self.walls)
        if not self.walls or left <= 0:
            return None
        return sum(self.walls) / len(self.walls) * math.ceil(left / self.jobs)


# Rough throughput of one MoE layer's forward + backward, FLOP/s (what the committed layer
# benches measured: ~8-50 GFLOP/s on one CPU thread by shape; GPUs far more). Only for the
# "about how long" of the line below, never reported as a result.
_CPU_FLOPS, _GPU_FLOPS = 2e10, 2e13
_STARTUP_S = 15.0  # a fresh Python process importing megatron-core and building the layers
_KINDS = 5  # MoHGE, stock baseline, equal-total and equal-activated stock, plain matmul


def layer_bench_line(lb: dict, backend: str, cuda: bool) -> str:
    """One line saying what the layer microbenchmark times, on which shape and backend, and
    about how long it takes: forward + backward of ``_KINDS`` layers over ``warmup +
    repeats`` rounds, at the stock baseline's FLOPs (3 matrices of hidden x width per
    chosen expert, 2 FLOPs per multiply-add, x3 for the backward)."""
    rounds = lb["repeats"] + lb["warmup"]
    flops = 6 * lb["tokens"] * lb["stock_topk"] * 3 * lb["hidden_size"] * lb["stock_width"]
    seconds = _STARTUP_S + _KINDS * rounds * flops / (_GPU_FLOPS if cuda else _CPU_FLOPS)
    scale = lb.get("width_scale", 1)
    return (f"layer microbenchmark: one MoE layer forward + backward, hidden "
            f"{lb['hidden_size']}, {lb['tokens']} tokens, MoHGE (widths x{scale}) vs stock "
            f"{lb['stock_num_experts']} x width {lb['stock_width']} top-{lb['stock_topk']} "
            f"and its equal-total / equal-activated variants, {backend} experts, "
            f"{lb['warmup']} + {lb['repeats']} rounds; about {duration(seconds)}")


__all__ = ["Progress", "duration", "layer_bench_line"]
