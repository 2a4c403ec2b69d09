"""Routing metrics measured from real routing.

Routers accumulate token counts per expert (canonical order) and per group while the model
runs; ``routing_metrics`` turns them into the figures the paper reports: activated
routed-expert parameters per token, group token share, mean chosen width, expert load CV
and max/mean, and (given an allocation plan) per-EP-rank expert FLOPs. Counts are local to
the rank; pass ``group`` to sum them over e.g. the data-parallel group first.

Every router of the package counts, Megatron's stock ``TopKRouter`` included through
:class:`~megatron_mohge.routing.stock.CountedTopKRouter` (``training.model_builder`` swaps it into
the stock spec), so a stock MoE baseline is measured by the same code. The figures
themselves are :meth:`RoutingCounter.metrics <megatron_mohge.routing.counters.RoutingCounter.metrics>`;
this module loops over the routers of a model.

Shape suffixes (``_TE``, ``_TG``, ...): see :mod:`megatron_mohge.routing`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_mohge.routing.base import find_routers
from megatron_mohge.routing.counters import LayerRouting
from megatron_mohge.routing.counters import rank_flops_layouts as _rank_flops_layouts


@dataclass
class RoutingMetrics:
    layers: list[LayerRouting] = field(default_factory=list)

    @property
    def activated_routed_params_per_token(self) -> float:
        """Summed over MoE layers: the routed-expert part of the activated parameters."""
        return sum(layer.activated_routed_params_per_token for layer in self.layers)

    def to_dict(self) -> dict:
        return dict(activated_routed_params_per_token=self.activated_routed_params_per_token,
                    layers=[layer.figures() for layer in self.layers])


#: every counted router of a model (module or list of chunks): MoHGE, noisy and stock
routers = find_routers


def reset_routing_counts(model) -> None:
    for r in routers(model):
        r.counter.reset()


def snapshot_routing_counts(model) -> list:
    """Copies of every router's window counts, for :func:`restore_routing_counts`."""
    return [(r, r.counter.snapshot()) for r in routers(model)]


def restore_routing_counts(snapshot: list) -> None:
    for r, snap in snapshot:
        r.counter.restore(snap)


def layer_routing(router, group=None) -> LayerRouting:
    """``router``'s figures over its counting window, counts summed over ``group`` first."""
    return router.routing_figures(group)


def routing_metrics(model, group=None) -> RoutingMetrics:
    """Figures of every router in ``model`` (a module or list of chunks)."""
    return RoutingMetrics([layer_routing(r, group) for r in routers(model)])


def rank_flops_layouts(router, tokens_per_expert: list[float], ep_size: int) -> dict:
    """Per-rank expert FLOPs of ``router``'s experts at ``ep_size`` (all-size allocation for
    MoHGE experts, Megatron's contiguous layout), each normalised to its mean, with max/mean."""
    return _rank_flops_layouts(router.routed_layout(), tokens_per_expert, ep_size)
