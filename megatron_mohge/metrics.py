"""Routing metrics measured from real routing.

Routers accumulate token counts per expert (canonical order) and per group while the model
runs; ``routing_metrics`` turns them into the figures the paper reports: activated
routed-expert parameters per token, group token share, mean chosen width, expert load CV
and max/mean, and (given an allocation plan) per-EP-rank expert FLOPs. Counts are local to
the rank; pass ``group`` to sum them over e.g. the data-parallel group first.

Megatron's stock ``TopKRouter`` keeps no counts; :func:`attach_stock_counters` adds the
same (non-persistent) count buffers to it through a forward hook, so a stock MoE baseline is
measured by the same code.

Shape suffixes (``_TE``, ``_TG``, ...): see :mod:`megatron_mohge.routing`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from megatron_mohge.config import group_offsets
from megatron_mohge.routing.base import GroupedExpertRouter
from megatron_mohge.routing.counters import RoutingCounter
from megatron_mohge.sizes import ffn_params


@dataclass
class LayerRouting:
    """Routing figures of one MoE layer over the counted tokens."""

    layer_number: Optional[int]
    tokens: float  # tokens routed (valid tokens, not token-expert pairs)
    tokens_per_expert: list[float]  # canonical (group-major) order
    group_token_share: list[float]  # f_g: share of group selections per group (sums to 1)
    mean_chosen_width: float  # mean FFN width over all (token, expert) assignments
    activated_routed_params_per_token: float  # sum over chosen experts of their weights
    expert_load_cv: float  # std/mean of tokens per expert (population std)
    expert_load_max_over_mean: float
    # load CV inside each group (canonical group order; one entry for stock experts)
    group_load_cv: list[float] = field(default_factory=list)
    # MaxVio = max load / mean load - 1 (arXiv 2408.15664): mean over forward calls of one
    # rank's micro-batch, and mean over optimizer steps of the global batch (training only)
    maxvio_micro: Optional[float] = None
    maxvio_batch: Optional[float] = None
    rank_flops_max_over_mean: Optional[float] = None  # with EP > 1


@dataclass
class RoutingMetrics:
    layers: list[LayerRouting] = field(default_factory=list)

    @property
    def activated_routed_params_per_token(self) -> float:
        """Summed over MoE layers: the routed-expert part of the activated parameters."""
        return sum(layer.activated_routed_params_per_token for layer in self.layers)

    def to_dict(self) -> dict:
        return dict(activated_routed_params_per_token=self.activated_routed_params_per_token,
                    layers=[asdict(layer) for layer in self.layers])


def _modules(model) -> Iterable[torch.nn.Module]:
    chunks: Iterable = model if isinstance(model, (list, tuple)) else [model]
    return (m for chunk in chunks for m in chunk.modules())


def routers(model) -> list:
    """MoHGE / noisy routers, and stock routers that have :func:`attach_stock_counters`."""
    return [m for m in _modules(model)
            if isinstance(m, GroupedExpertRouter) or isinstance(getattr(m, "counter", None),
                                                                RoutingCounter)]


def reset_routing_counts(model) -> None:
    for r in routers(model):
        r.counter.reset_window()


def snapshot_routing_counts(model) -> list:
    """Copies of every router's window counts, for :func:`restore_routing_counts`."""
    return [(r, r.counter.snapshot()) for r in routers(model)]


def restore_routing_counts(snapshot: list) -> None:
    for r, snap in snapshot:
        r.counter.restore(snap)


def attach_stock_counters(model) -> int:
    """Count the routing of Megatron's stock routers (uniform experts, one group).

    Gives each stock router a :class:`RoutingCounter` (``router.counter``, non-persistent:
    checkpoints are unchanged) and a forward hook that records each call's ``routing_map``,
    skipping padding tokens. Returns how many routers it found.
    """
    from megatron.core.transformer.moe.router import Router

    n = 0
    for m in _modules(model):
        if not isinstance(m, Router) or isinstance(m, GroupedExpertRouter):
            continue
        if not hasattr(m, "_stock_counter_hook"):
            m.add_module("counter", RoutingCounter(m.config.num_moe_experts, 1,
                                                   device=m.weight.device))
            m.group_sizes = [m.config.num_moe_experts]
            m._stock_counter_hook = m.register_forward_hook(_count_stock_routing,
                                                                 with_kwargs=True)
        n += 1
    return n


def _count_stock_routing(router, args, kwargs, output) -> None:
    # no @torch.no_grad() here: is_grad_enabled() tells training forwards from evaluation
    # (RoutingCounter.record runs without grad itself)
    routing_map = output[1].reshape(-1, router.counter.tokens_per_expert_E.numel())
    padding = args[1] if len(args) > 1 else kwargs.get("padding_mask")
    keep = None
    if padding is not None:  # Megatron: True marks padding
        keep = (~padding.reshape(-1, 1).bool()).to(torch.float64)
    router.counter.record(routing_map, None, keep,
                          training=router.training and torch.is_grad_enabled())


def _expert_sizes(router, hidden_size: int, gated: bool, bias: bool):
    """(widths per expert, params per expert incl. biases) in canonical order."""
    mohge = getattr(router, "mohge", None)
    if mohge is not None:
        return mohge.expert_widths, mohge.routed_params_per_expert(hidden_size, gated, bias)
    width = router.config.moe_ffn_hidden_size  # uniform stock experts
    n = router.config.num_moe_experts
    return [width] * n, [ffn_params(hidden_size, width, gated, bias)] * n


def layer_routing(router, group=None) -> LayerRouting:
    c = router.counter
    packed = c.window_vector()
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(packed, group=group)
    win = c.unpack_window(packed)
    n_e, n_g, tokens = win["tokens_per_expert_E"], win["tokens_per_group_G"], float(win["tokens_seen"])
    G = n_g.numel()
    cfg = router.config
    widths, params = _expert_sizes(router, cfg.hidden_size, bool(cfg.gated_linear_unit),
                                   bool(cfg.add_bias_linear))
    w = torch.tensor(widths, dtype=torch.float64)
    p = torch.tensor(params, dtype=torch.float64)
    assigned = float(n_e.sum())
    mean = n_e.mean()
    share = (n_g / n_g.sum()).tolist() if float(n_g.sum()) > 0 else [0.0] * G
    out = LayerRouting(
        layer_number=router.layer_number,
        tokens=tokens,
        tokens_per_expert=n_e.tolist(),
        group_token_share=share,
        mean_chosen_width=float((n_e * w).sum() / assigned) if assigned else 0.0,
        activated_routed_params_per_token=float((n_e * p).sum() / tokens) if tokens else 0.0,
        expert_load_cv=_cv(n_e),
        expert_load_max_over_mean=float(n_e.max() / mean) if float(mean) > 0 else 0.0,
        group_load_cv=[_cv(n_e[a:b]) for a, b in _group_bounds(router.group_sizes)],
        maxvio_micro=_ratio(win["maxvio_micro_sum"], win["maxvio_micro_n"]),
        maxvio_batch=_ratio(win["maxvio_batch_sum"], win["maxvio_batch_n"]),
    )
    plan = getattr(router, "plan", None)
    if plan is not None and plan.ep_size > 1 and assigned:
        flops = plan.rank_flops(n_e.tolist())
        out.rank_flops_max_over_mean = max(flops) / (sum(flops) / len(flops))
    return out


def _cv(load: torch.Tensor) -> float:
    """Population std / mean of a load vector (0 when empty)."""
    mean = load.double().mean()
    return float(load.double().std(unbiased=False) / mean) if float(mean) > 0 else 0.0


def _ratio(total: torch.Tensor, count: torch.Tensor) -> Optional[float]:
    return float(total / count) if float(count) > 0 else None


def _group_bounds(group_sizes) -> list[tuple[int, int]]:
    """``[first, end)`` canonical expert ids of each group."""
    starts = group_offsets(group_sizes)
    return list(zip(starts, starts[1:] + [sum(group_sizes)]))


def routing_metrics(model, group=None) -> RoutingMetrics:
    """Figures of every MoHGE / noisy router in ``model`` (a module or list of chunks)."""
    return RoutingMetrics([layer_routing(r, group) for r in routers(model)])


def rank_flops_layouts(router, tokens_per_expert: list[float], ep_size: int) -> dict:
    """Per-rank expert FLOPs at ``ep_size`` for the all-size allocation (MoHGE routers) and
    Megatron's contiguous layout (rank r owns canonical experts ``[r*E/ep, (r+1)*E/ep)``),
    each normalised to its mean, with max/mean."""
    from megatron_mohge.allocation import plan_allocation

    mohge = getattr(router, "mohge", None)
    if mohge is not None:
        widths, counts = mohge.widths, mohge.experts_per_group
    else:  # uniform stock experts: one group
        widths, counts = [router.config.moe_ffn_hidden_size], [router.config.num_moe_experts]
    # report even layouts the config would refuse (imbalance above its threshold)
    plan = plan_allocation(widths, counts, ep_size, allow_imbalance=True)
    layouts = {"contiguous": plan.rank_flops(tokens_per_expert, canonical=False)}
    if mohge is not None:
        layouts["all_size"] = plan.rank_flops(tokens_per_expert)
    out = {"ep": ep_size}
    for name, flops in layouts.items():
        mean = sum(flops) / len(flops)
        out[name] = [f / mean if mean else 0.0 for f in flops]
        out[f"{name}_max_over_mean"] = max(flops) / mean if mean else 0.0
    return out
