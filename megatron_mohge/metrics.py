"""Routing metrics measured from real routing (design note section 6).

Routers accumulate token counts per expert (canonical order) and per group while the model
runs; ``routing_metrics`` turns them into the figures the paper reports: activated
routed-expert parameters per token, group token share, mean chosen width, expert load CV
and max/mean, and (given an allocation plan) per-EP-rank expert FLOPs. Counts are local to
the rank; pass ``group`` to sum them over e.g. the data-parallel group first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Iterable, Optional

import torch
import torch.distributed as dist

from megatron_mohge.routing.base import GroupedExpertRouter


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


def routers(model) -> list[GroupedExpertRouter]:
    modules: Iterable = model if isinstance(model, (list, tuple)) else [model]
    return [m for chunk in modules for m in chunk.modules() if isinstance(m, GroupedExpertRouter)]


def reset_routing_counts(model) -> None:
    for r in routers(model):
        r.reset_routing_counts()


def _expert_sizes(router: GroupedExpertRouter, hidden_size: int, gated: bool):
    """(widths per expert, params per expert) in canonical order, or None if unknown."""
    mohge = getattr(router, "mohge", None)
    if mohge is not None:
        return mohge.expert_widths, mohge.routed_params_per_expert(hidden_size, gated)
    width = router.config.moe_ffn_hidden_size  # uniform stock experts
    n = router.num_experts
    return [width] * n, [(3 if gated else 2) * hidden_size * width] * n


def layer_routing(router: GroupedExpertRouter, group=None) -> LayerRouting:
    counts = torch.cat([router.tokens_per_expert_E.double(), router.tokens_per_group_G.double(),
                        router.tokens_seen.double().reshape(1)])
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(counts, group=group)
    E, G = router.num_experts, len(router.group_sizes)
    n_e, n_g, tokens = counts[:E], counts[E:E + G], float(counts[-1])
    cfg = router.config
    widths, params = _expert_sizes(router, cfg.hidden_size, bool(cfg.gated_linear_unit))
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
        expert_load_cv=float(n_e.std(unbiased=False) / mean) if float(mean) > 0 else 0.0,
        expert_load_max_over_mean=float(n_e.max() / mean) if float(mean) > 0 else 0.0,
    )
    plan = getattr(router, "plan", None)
    if plan is not None and plan.ep_size > 1 and assigned:
        flops = plan.rank_flops(n_e.tolist())
        out.rank_flops_max_over_mean = max(flops) / (sum(flops) / len(flops))
    return out


def routing_metrics(model, group=None) -> RoutingMetrics:
    """Figures of every MoHGE / noisy router in ``model`` (a module or list of chunks)."""
    return RoutingMetrics([layer_routing(r, group) for r in routers(model)])
