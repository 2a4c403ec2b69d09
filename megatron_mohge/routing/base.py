"""Plumbing shared by our routers, on top of Megatron's ``TopKRouter``.

Deltas to ``TopKRouter`` (everything else, e.g. ``attach_and_log_load_balancing_loss``
and the aux-loss tracker, is Megatron's):

* routers compute in canonical expert order (group-major) and permute their outputs into
  the allocation plan's *slot* order, so the stock dispatchers deliver each rank the
  experts the plan placed there;
* gate linears run in the router dtype without Transformer Engine (megatron-core 0.16's
  ``router_gating_linear`` raises NameError when TE is absent);
* routing counts (tokens per expert, per group) are accumulated for metrics;
* a training-progress hook for loss schedules (``set_training_progress``);
* input jitter only while training (``jitter``).
"""

from __future__ import annotations

import warnings
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.router import TopKRouter

from megatron_mohge.routing.counters import RoutingCounter
from megatron_mohge.routing.functional import GroupIndex


def _default_pg_collection(pg_collection):
    if pg_collection is not None:
        return pg_collection
    return moe_utils.get_default_pg_collection()


class GroupedExpertRouter(TopKRouter):
    """Base router over experts organised in groups, emitting probs in slot order.

    Args:
        config: Megatron ``TransformerConfig`` (``num_moe_experts``, ``moe_router_topk``...).
        pg_collection: Megatron process groups (``None``: from ``parallel_state``).
        group_sizes: experts per group, canonical order (``[E]`` for one group).
        slot_to_canonical: canonical expert id held by each global slot (``None``: identity).
    """

    def __init__(self, config, pg_collection=None, *, group_sizes: Sequence[int],
                 slot_to_canonical: Optional[Sequence[int]] = None):
        pg_collection = _default_pg_collection(pg_collection)
        super().__init__(config=config, pg_collection=pg_collection)
        self.pg_collection = pg_collection
        self.group_sizes = [int(n) for n in group_sizes]
        if sum(self.group_sizes) != self.num_experts:
            raise ValueError(f"group sizes {self.group_sizes} do not add up to num_moe_experts="
                             f"{self.num_experts}")
        self._index = GroupIndex.build(self.group_sizes)
        perm = list(range(self.num_experts)) if slot_to_canonical is None else list(slot_to_canonical)
        if sorted(perm) != list(range(self.num_experts)):
            raise ValueError("slot_to_canonical must be a permutation of the expert ids")
        self.identity_layout = perm == list(range(self.num_experts))
        self.register_buffer("slot_to_canonical", torch.tensor(perm, dtype=torch.long),
                             persistent=False)
        # Routing counts for metrics and loss-free balancing (not checkpointed).
        self.counter = RoutingCounter(self.num_experts, len(self.group_sizes))
        self.training_progress: Optional[float] = None

    # ------------------------------------------------------------------ helpers
    def group_index(self, device) -> GroupIndex:
        """Group index tensors on ``device`` (moved once, then cached)."""
        if self._index.group_of_expert_E.device != torch.device(device):
            i = self._index
            self._index = GroupIndex(i.group_of_expert_E.to(device), i.padded_ids_GN.to(device),
                                     i.valid_GN.to(device), i.equal_sizes)
        return self._index

    @property
    def router_dtype(self) -> torch.dtype:
        if self.config.moe_router_dtype == "fp32":
            return torch.float32
        if self.config.moe_router_dtype == "fp64":
            return torch.float64
        return self.weight.dtype

    def new_gate_weight(self, rows: int) -> torch.nn.Parameter:
        """A gate weight like Megatron's router weight: fp32 storage, init_method, SP flag."""
        w = torch.nn.Parameter(torch.empty(rows, self.config.hidden_size, dtype=torch.float32,
                                           device=self.weight.device))
        if self.config.perform_initialization:
            self.config.init_method(w)
        w.data = w.data.to(dtype=self.config.params_dtype)
        setattr(w, "sequence_parallel", self.config.sequence_parallel)
        return w

    def gate(self, x: torch.Tensor, weight: torch.Tensor,
             bias: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``x W^T (+ b)`` in the router dtype. Uses Megatron's memory-lean gating function
        when it is usable (it needs ``te_general_gemm`` to be defined), plain torch otherwise."""
        dtype = self.router_dtype
        if weight.device != x.device:  # Router keeps fp32 CPU-initialised weights until used
            weight.data = weight.data.to(x.device)
            if bias is not None:
                bias.data = bias.data.to(x.device)
        if hasattr(moe_utils, "te_general_gemm"):
            return moe_utils.router_gating_linear(x, weight, bias, dtype)
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    def jitter(self, input: torch.Tensor) -> torch.Tensor:
        """Switch-style multiplicative input jitter (``moe_input_jitter_eps``), training only.

        Deliberate difference: Megatron's ``TopKRouter.apply_input_jitter`` also jitters in
        evaluation, which makes eval routing random; jitter is a training regulariser.
        """
        return self.apply_input_jitter(input) if self.training else input

    def to_slot_order(self, probs_TE: torch.Tensor, routing_map_TE: torch.Tensor):
        """Permute canonical columns into the allocation plan's slot order."""
        if self.identity_layout:
            return probs_TE, routing_map_TE
        idx = self.slot_to_canonical.to(probs_TE.device)
        return probs_TE.index_select(1, idx), routing_map_TE.index_select(1, idx)

    def record_counts(self, routing_map_TE: torch.Tensor, group_mask_TG: Optional[torch.Tensor],
                      keep_T1: Optional[torch.Tensor]) -> None:
        self.counter.record(routing_map_TE, group_mask_TG, keep_T1,
                            training=self.training and torch.is_grad_enabled())

    def reset_routing_counts(self) -> None:
        self.counter.reset_window()

    # the window counts, by the names the metrics and tests read
    tokens_per_expert_E = property(lambda self: self.counter.tokens_per_expert_E)
    tokens_per_group_G = property(lambda self: self.counter.tokens_per_group_G)
    tokens_seen = property(lambda self: self.counter.tokens_seen)

    def set_training_progress(self, fraction: float) -> None:
        self.training_progress = float(fraction)

    def log_aux(self, activation, coeff: float, loss: torch.Tensor, name: str,
                keep_T1: Optional[torch.Tensor]):
        """Attach ``loss`` to ``activation`` and log it under ``name`` (Megatron's tracker)."""
        valid = None if keep_T1 is None else keep_T1.sum()
        return self.attach_and_log_load_balancing_loss(
            activation, coeff, loss, name, self.tp_cp_group, valid_token_count=valid)


def set_training_progress(model, iteration: int, train_iters: int) -> None:
    """Report training progress to every MoHGE/noisy router in ``model`` (module or list).

    Loss schedules (e.g. the group loss switched on after ``group_start_fraction`` of
    training) read it. Call once per iteration from the training loop.
    """
    if train_iters <= 0:
        raise ValueError(f"train_iters must be positive, got {train_iters}")
    modules: Iterable = model if isinstance(model, (list, tuple)) else [model]
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, GroupedExpertRouter):
                sub.set_training_progress(iteration / train_iters)


_warned_progress = False


def warn_progress_unknown(start_fraction: float) -> None:
    global _warned_progress
    if not _warned_progress:
        _warned_progress = True
        warnings.warn(
            f"MoHGE group loss has losses.group_start_fraction={start_fraction} but training "
            "progress was never reported, so it stays off. Call "
            "megatron_mohge.set_training_progress(model, iteration, train_iters) every step "
            "(or set group_start_fraction: 0).", stacklevel=3)
