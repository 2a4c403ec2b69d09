"""The figures ``mohge-train`` reports: per-layer routing gathered over ranks, aux losses from
Megatron's tracker, layer and log-window balance means, and the finished run's summary.

Shape suffixes (``_TE``, ``_TG``, ...): see :mod:`megatron_mohge.routing`.
"""

from __future__ import annotations

import math
import resource
from typing import Optional

import torch
import torch.distributed as dist

from megatron_mohge.metrics import rank_flops_layouts, routers
from megatron_mohge.training import diagnostics
from megatron_mohge.training import mcore_plumbing as M
from megatron_mohge.util.numbers import mean_by_ep, mean_present, standard_error


def routing(chunks, ep: int) -> list[dict]:
    """Per-MoE-layer routing figures since the last reset, summed over all ranks of the
    stage (DP x TP: with sequence parallelism each TP rank routes its own tokens), with each
    router's extra state and the rank FLOPs of each layout at EP 2, 4, 8 and ``ep``."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_and_data_parallel_group()
    local = []
    for r in routers(chunks):
        layer = r.routing_figures(group)
        d = {**layer.figures(), **r.extra_figures()}
        d["rank_flops"] = {str(e): rank_flops_layouts(r, layer.tokens_per_expert, e)
                           for e in sorted({2, 4, 8, ep}) if e > 1
                           and len(layer.tokens_per_expert) % e == 0}
        local.append(d)
    merged = {}
    for layers in M.all_gather_object(local):
        for d in layers:
            merged.setdefault(d["layer_number"], d)
    return [merged[k] for k in sorted(merged, key=lambda x: (x is None, x))]


def aux_losses(steps: int, micro_batches: int, moe_layers: int) -> dict:
    """Mean per MoE layer and micro-batch of each tracked aux loss since the last call
    (Megatron's tracker, reduced over PP / DP as Megatron-LM's training log does)."""
    from megatron.core import parallel_state

    from megatron_mohge.compat.mcore import clear_metrics, metric_entries, reduce_metrics

    entries = metric_entries()
    if not entries:
        return {}
    names = sorted(entries)  # same order on every rank (collectives inside)
    reduce_metrics(names, parallel_state.get_pipeline_model_parallel_group(),
                   parallel_state.get_data_parallel_group(with_context_parallel=False))
    out = {name: float(entries[name].values.sum()) / (moe_layers * micro_batches * max(steps, 1))
           for name in names}
    clear_metrics()
    return out


def balance_figures(layers: list[dict]) -> dict:
    """Balance figures of a set of MoE layers, each the mean over layers: expert load CV and
    max/mean, MaxVio (micro-batch and global batch), load CV inside groups, and per-EP-size
    rank FLOPs max/mean of each layout
    (``rank_flops_by_ep = {"2": {"all_size_max_over_mean": .., "contiguous_max_over_mean": ..}}``)."""
    mean = mean_present
    out = dict(expert_load_cv=mean(l["expert_load_cv"] for l in layers),
               expert_load_max_over_mean=mean(l["expert_load_max_over_mean"] for l in layers),
               maxvio_micro=mean(l.get("maxvio_micro") for l in layers),
               maxvio_batch=mean(l.get("maxvio_batch") for l in layers),
               group_load_cv=mean(mean(l.get("group_load_cv") or []) for l in layers))
    out["rank_flops_by_ep"] = mean_by_ep(l.get("rank_flops") for l in layers)
    return out


def train_balance(history: list[dict], iters: int) -> dict:
    """Balance figures of the log windows in the last quarter of training, averaged."""
    recs = [h for h in history if h["iteration"] > 0.75 * iters] or history[-1:]
    out = {k: mean_present(h.get(k) for h in recs)
           for k in ("expert_load_cv", "maxvio_micro", "maxvio_batch", "group_load_cv")}
    out["rank_flops_by_ep"] = mean_by_ep(h.get("rank_flops_by_ep") for h in recs)
    return out


def mean_share(layers: list[dict]) -> Optional[list[float]]:
    """Group token share averaged over layers (None without MoE layers)."""
    if not layers:
        return None
    G = len(layers[0]["group_token_share"])
    return [sum(l["group_token_share"][g] for l in layers) / len(layers) for g in range(G)]


def peak_mem_bytes() -> int:
    """Peak memory, max over ranks: CUDA max allocated on GPUs, else the process peak RSS."""
    if M.use_cuda():
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    t = torch.tensor([float(peak)], dtype=torch.float64, device=M.device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def run_summary(run, state, counts: dict, layers: list[dict], final_loss: float,
                batch_losses: list, tokens_per_s: Optional[float]) -> dict:
    """Figures of the finished run; ``layers``: routing over the final evaluation."""
    per_token_routed = sum(l["activated_routed_params_per_token"] for l in layers)
    dense = counts["total_params"] - counts["routed_expert_params"]
    peak = peak_mem_bytes()
    return dict(
        name=run.name, kind=run.moe.result_kind, iterations=state.iteration,
        layout=M.layout(), **counts,
        activated_routed_params_per_token=per_token_routed,
        activated_params_per_token=dense + per_token_routed,
        heldout_loss=final_loss, heldout_ppl=math.exp(min(final_loss, 50)),
        # evaluation noise: the standard error of the loss across the held-out global
        # batches (global_batch_size x seq_length tokens each), and the batch losses
        heldout_loss_se=standard_error(batch_losses),
        heldout_batch_losses=list(batch_losses),
        heldout_tokens=len(batch_losses) * run.train.global_batch_size * run.model.seq_length,
        train_tokens_per_s=tokens_per_s, peak_mem_bytes=peak,
        group_token_share=mean_share(layers) or [],
        **balance_figures(layers),
        # the same figures measured on the training batches of the last quarter of training
        # (the GPU work of training; the held-out routing above has no optimizer steps)
        **{f"train_{k}": v for k, v in train_balance(state.history, run.train.iters).items()},
        # is the router learning? (training windows: same-group picks, gate gradients, ...)
        routing_diagnostics=diagnostics.run_diagnostics(state.history, run.train.iters),
        layers=layers, history=state.history, evals=state.evals,
    )
