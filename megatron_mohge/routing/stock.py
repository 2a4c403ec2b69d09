"""Megatron's ``TopKRouter`` that counts its routing: the stock baseline, measured like MoHGE.

:class:`CountedTopKRouter` is the one delta: after ``TopKRouter.forward`` it records the call's
``routing_map`` in a :class:`~megatron_mohge.routing.counters.RoutingCounter` (non-persistent:
the state dict, the RNG draws of ``__init__`` and the routing are ``TopKRouter``'s). It is also
the base of the package's own routers (``GroupedExpertRouter``), so everything that reads
routing -- the trainer, the bench, :mod:`megatron_mohge.metrics`, end-of-step balancing --
talks to one interface: ``counter``, ``group_sizes``, :meth:`~CountedTopKRouter.routed_layout`
and the no-op hooks :meth:`~CountedTopKRouter.end_step` and
:meth:`~CountedTopKRouter.extra_figures`, which routers with more state override.
``training.model_builder.decoder_spec`` swaps it into Megatron's stock spec
(:func:`megatron_mohge.specs.with_counted_router`).

Shape suffixes (``_TE``, ``_TG``, ...): see :mod:`megatron_mohge.routing`.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.core.transformer.moe.router import TopKRouter

from megatron_mohge.routing.counters import LayerRouting, RoutedLayout, RoutingCounter
from megatron_mohge.routing.functional import token_sums
from megatron_mohge.sizes import ffn_params


class CountedTopKRouter(TopKRouter):
    """``TopKRouter`` (same arguments, parameters and routing) with a routing counter."""

    #: MoHGE layer config and allocation plan of heterogeneous experts (None: uniform experts)
    mohge = None
    plan = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # uniform stock experts: one group (our routers replace both)
        self.group_sizes = [self.config.num_moe_experts]
        self.counter = RoutingCounter(self.config.num_moe_experts, 1)
        self.watch_gate_grad(self.weight, "expert")
        self.training_progress: Optional[float] = None

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        probs, routing_map = super().forward(input, padding_mask=padding_mask)
        keep_T1 = None
        if padding_mask is not None:  # Megatron: True marks padding
            keep_T1 = (~padding_mask.reshape(-1, 1).bool()).to(torch.float64)
        # routed under grad = a training forward (the counter itself runs without grad)
        E = self.counter.tokens_per_expert_E.numel()
        rm_TE = routing_map.reshape(-1, E)
        self.counter.record(rm_TE, None, keep_T1, training=self.training and torch.is_grad_enabled())
        self.counter.record_diagnostics(_stock_diagnostics(probs.reshape(-1, E), rm_TE, keep_T1))
        return probs, routing_map

    def watch_gate_grad(self, weight: torch.nn.Parameter, gate: str) -> None:
        """Count ``weight``'s gradient norm on every backward pass into ``self.counter``
        (``gate``: ``group`` or ``expert``). A tensor hook sees one backward call's gradient
        before it is accumulated, whatever wraps the model (DDP, distributed optimizer,
        Megatron-LM's loop); the counter is looked up when the hook fires, as subclasses
        replace it."""
        weight.register_hook(lambda grad: self.counter.add_gate_grad(gate, grad))

    # ------------------------------------------------------------- what readers see
    def routed_layout(self) -> RoutedLayout:
        """Expert widths and parameters (biases included) this router's counts weigh."""
        c = self.config
        gated, bias = bool(c.gated_linear_unit), bool(c.add_bias_linear)
        if self.mohge is not None:
            m = self.mohge
            return RoutedLayout(m.expert_widths, m.routed_params_per_expert(c.hidden_size, gated,
                                                                            bias),
                                list(self.group_sizes), m.widths, m.experts_per_group, self.plan)
        n, width = c.num_moe_experts, c.moe_ffn_hidden_size  # uniform stock experts
        return RoutedLayout([width] * n, [ffn_params(c.hidden_size, width, gated, bias)] * n,
                            list(self.group_sizes), [width], [n])

    def slot_widths(self) -> list[int]:
        """FFN width of the expert behind each output column of this router (slot order; the
        stock router's columns are its experts in order)."""
        return list(self.routed_layout().expert_widths)

    def routing_figures(self, group=None) -> LayerRouting:
        """Figures of the counting window, summed over ``group`` (see ``RoutingCounter``)."""
        return self.counter.metrics(self.routed_layout(), group, layer_number=self.layer_number)

    def set_training_progress(self, fraction: float) -> None:
        """Fraction of training done (loss schedules read it; the stock router has none)."""
        self.training_progress = float(fraction)

    def end_step(self, global_load_E: torch.Tensor) -> None:
        """Once per optimizer step with the global-batch load (loss-free balancing: MoHGE)."""

    def extra_figures(self) -> dict:
        """Router state reported beside the routing figures (MoHGE: the balance bias)."""
        return {}


@torch.no_grad()
def _stock_diagnostics(probs_TE: torch.Tensor, routing_map_TE: torch.Tensor,
                       keep_T1: Optional[torch.Tensor]) -> torch.Tensor:
    """``routing_diagnostics``' sums for one group of experts: only the weight gap of the
    picks is defined (same group and in-group max are left 0; the figures omit them)."""
    w_TE = probs_TE.double()
    hi_T = w_TE.masked_fill(~routing_map_TE, float("-inf")).amax(-1)
    lo_T = w_TE.masked_fill(~routing_map_TE, float("inf")).amin(-1)
    zero_T = torch.zeros_like(hi_T)
    return token_sums(keep_T1, zero_T, zero_T, hi_T - lo_T)
