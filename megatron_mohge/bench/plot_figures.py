"""The results.json figures of one run that only the research plots read
(:mod:`.plots_research`): per-layer rank load, the loss by chosen width, and the facts to
place the curves (tokens per step, where the group loss switches on)."""

from __future__ import annotations

import math
from typing import Optional


def plot_figures(summary: dict, run) -> dict:
    """``rank_flops_per_layer``, ``heldout_loss_by_width``, ``tokens_per_step`` and
    ``group_loss_start_iteration`` of one run (each only when it applies)."""
    out = {"tokens_per_step": run.train.global_batch_size * run.model.seq_length}
    per_layer = rank_flops_per_layer(summary.get("layers") or [])
    if per_layer:
        out["rank_flops_per_layer"] = per_layer
    if summary.get("heldout_loss_by_width"):
        out["heldout_loss_by_width"] = summary["heldout_loss_by_width"]
    start = group_loss_start(run)
    if start is not None:
        out["group_loss_start_iteration"] = start
    return out


def rank_flops_per_layer(layers: list[dict]) -> dict:
    """``{ep: {layout: {"ranks": [[FLOPs / mean per rank] per layer], "max_over_mean":
    [per layer]}}}`` from the summary's per-layer rank FLOPs (EP 2, 4, 8 and the run's).
    The layer mean of the per-rank vectors (``rank_flops``) hides which rank is hot in which
    layer and so understates the imbalance; the per-layer max/mean is what each step waits
    for."""
    out: dict = {}
    for layer in layers:
        for ep, entry in (layer.get("rank_flops") or {}).items():
            for name in ("all_size", "contiguous"):
                if name in entry:
                    d = out.setdefault(ep, {}).setdefault(name, {"ranks": [],
                                                                 "max_over_mean": []})
                    d["ranks"].append(list(entry[name]))
                    d["max_over_mean"].append(entry[f"{name}_max_over_mean"])
    return out


def group_loss_start(run) -> Optional[int]:
    """The iteration after which a MoHGE run's group loss is on: routers see progress
    ``steps done / iters`` and switch it on at ``>= losses.group_start_fraction``, so the
    first step with it starts after ``ceil(fraction x iters)`` steps. None when it is on
    from the start or the run has no group loss."""
    if run.moe.kind != "mohge":
        return None
    losses = run.moe.mohge.losses
    if losses.group_start_fraction <= 0 or not losses.group_coeff:
        return None
    return math.ceil(losses.group_start_fraction * run.train.iters)


__all__ = ["plot_figures", "rank_flops_per_layer", "group_loss_start"]
