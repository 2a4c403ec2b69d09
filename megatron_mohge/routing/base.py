"""Plumbing shared by our routers, on top of Megatron's ``TopKRouter``.

Deltas to ``TopKRouter`` (everything else, e.g. ``MoEAuxLossAutoScaler`` and the aux-loss
tracker, is Megatron's):

* routers compute in canonical expert order (group-major) and permute their outputs into
  the allocation plan's *slot* order, so the stock dispatchers deliver each rank the
  experts the plan placed there;
* gate linears run in the router dtype without Transformer Engine (megatron-core 0.16's
  ``router_gating_linear`` raises NameError when TE is absent);
* aux losses are attached and logged by :meth:`GroupedExpertRouter.attach_loss` with one
  rule on every supported megatron-core line (see there);
* routing counts (tokens per expert, per group) are accumulated for metrics, through the
  interface every counted router shares (:class:`~megatron_mohge.routing.stock.CountedTopKRouter`,
  the base class: ``counter``, ``routed_layout``, ``end_step``, ``extra_figures``);
* a training-progress hook for loss schedules (``set_training_progress``);
* input jitter only while training (``jitter``).

Shape suffixes (``_TE``, ``_TG``, ...): see :mod:`megatron_mohge.routing`.
"""

from __future__ import annotations

import warnings
import weakref
from typing import Iterable, Optional, Sequence

import torch
import torch.nn.functional as F

from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.router import TopKRouter

from megatron_mohge.compat.mcore import record_metric, supported_kwargs
from megatron_mohge.routing import losses as L
from megatron_mohge.routing.counters import RoutingCounter
from megatron_mohge.routing.functional import GroupIndex
from megatron_mohge.routing.stock import CountedTopKRouter


def _default_pg_collection(pg_collection):
    if pg_collection is not None:
        return pg_collection
    return moe_utils.get_default_pg_collection()


class GroupedExpertRouter(CountedTopKRouter):
    """Base router over experts organised in groups, emitting probs in slot order.

    Args:
        config: Megatron ``TransformerConfig`` (``num_moe_experts``, ``moe_router_topk``...).
        pg_collection: Megatron process groups (``None``: from ``parallel_state``).
        group_sizes: experts per group, canonical order (``[E]`` for one group).
        slot_to_canonical: canonical expert id held by each global slot (``None``: identity).
        is_mtp_layer: the router belongs to a multi-token-prediction layer (passed by
            ``MoELayer`` from megatron-core 0.19; always False before).
    """

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, *,
                 group_sizes: Sequence[int], slot_to_canonical: Optional[Sequence[int]] = None):
        pg_collection = _default_pg_collection(pg_collection)
        super().__init__(config=config, pg_collection=pg_collection,
                         **supported_kwargs(TopKRouter.__init__, is_mtp_layer=is_mtp_layer))
        self.is_mtp_layer = bool(is_mtp_layer)
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

    def slot_widths(self) -> list[int]:
        """FFN width of the expert held by each global slot (the all-size allocation permutes
        the canonical, group-major experts into slots)."""
        canonical = list(self.routed_layout().expert_widths)
        return [canonical[int(c)] for c in self.slot_to_canonical]

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

    # the window counts, by the names the metrics and tests read
    tokens_per_expert_E = property(lambda self: self.counter.tokens_per_expert_E)
    tokens_per_group_G = property(lambda self: self.counter.tokens_per_group_G)
    tokens_seen = property(lambda self: self.counter.tokens_seen)

    def metric_layer(self) -> tuple:
        """``(layer_number, num_layers)`` of this router in Megatron's tracker: MTP layers are
        counted after the decoder layers, as megatron-core 0.19 does."""
        num_layers = self.config.num_layers + (self.config.mtp_num_layers or 0)
        layer = self.layer_number
        if self.is_mtp_layer and layer is not None:
            layer += self.config.num_layers
        return layer, num_layers

    def mtp_repeats(self) -> int:
        """How often this router's layer runs per step: an MTP layer repeated
        ``mtp_num_layers`` times (megatron-core 0.19's ``mtp_use_repeated_layer``) adds its
        losses that often, so they are divided by it."""
        if self.is_mtp_layer and getattr(self.config, "mtp_use_repeated_layer", False):
            return int(self.config.mtp_num_layers or 1)
        return 1

    def attach_loss(self, activation: torch.Tensor, loss: torch.Tensor, coeff: float, name: str,
                    local_tokens, *, reduce_group=None, avg_group=None,
                    replicated: bool = False) -> torch.Tensor:
        """Attach ``loss`` (already multiplied by ``coeff``) to ``activation``'s backward and
        log ``loss / coeff`` under ``name``. One rule on every supported megatron-core line:

        * with ``calculate_per_token_loss`` ``finalize_model_grads`` divides every gradient
          by the global token count = micro-batches x DP x CP x (TP x router tokens), so the
          loss is pre-multiplied by ``local_tokens x TP*CP`` to leave the target 1 / (micro-
          batches x DP). (megatron-core 0.19's router does this; 0.16's omits the TP*CP
          factor, shrinking aux gradients by TP*CP. We apply the 0.19 rule on both lines.)
        * a repeated MTP layer divides by its repeat count (:meth:`mtp_repeats`).

        ``replicated``: every rank of ``reduce_group`` holds the whole loss (not a part), so
        each logs 1/size of it and the tracker's sum counts it once.
        """
        loss = loss / self.mtp_repeats()
        layer, num_layers = self.metric_layer()
        logged = loss.detach() / coeff
        if replicated and reduce_group is not None:
            logged = logged / reduce_group.size()
        record_metric(name, logged, layer, num_layers, reduce_group=reduce_group,
                      avg_group=avg_group)
        if not loss.requires_grad:  # e.g. a hard-count load: logged only
            return activation
        if self.calculate_per_token_loss:
            loss = loss * local_tokens * self.tp_cp_group.size()
        return moe_utils.MoEAuxLossAutoScaler.apply(activation, loss)

    def log_aux(self, activation, coeff: float, loss: torch.Tensor, name: str,
                keep_T1: Optional[torch.Tensor]):
        """Attach a TP*CP-global loss (each rank holds a part; the tracker sums them)."""
        tokens = activation.shape[0] if keep_T1 is None else keep_T1.sum()
        return self.attach_loss(activation, loss, coeff, name, tokens,
                                reduce_group=self.tp_cp_group)

    def apply_z_loss(self, z_TE: torch.Tensor, keep_T1: Optional[torch.Tensor],
                     u_TG: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ST-MoE z-loss on the gate logits, training only and when ``moe_z_loss_coeff`` is set:
        two-level (group softmax and in-group softmaxes, :func:`losses.z_loss_two_level`) when
        the group logits ``u_TG`` are given, else Megatron's flat ``z_loss_func``. Returns the
        logits with the loss attached to their backward."""
        if not (self.training and torch.is_grad_enabled() and self.config.moe_z_loss_coeff):
            return z_TE
        # Megatron divides by the TP*CP size: each SP/CP shard adds its own mean.
        coeff = self.config.moe_z_loss_coeff / self.tp_cp_group.size()
        if u_TG is not None:
            z_loss = L.z_loss_two_level(u_TG, z_TE, self.group_index(z_TE.device), coeff, keep_T1)
        else:
            pad_T = None if keep_T1 is None else ~keep_T1.squeeze(-1).bool()
            z_loss = moe_utils.z_loss_func(z_TE, coeff, pad_T)
        return self.attach_z_loss(z_TE, z_loss, coeff, keep_T1)

    def attach_z_loss(self, z_TE: torch.Tensor, z_loss: torch.Tensor, coeff: float,
                      keep_T1: Optional[torch.Tensor]) -> torch.Tensor:
        """Attach a z-loss computed on this rank's tokens with ``coeff`` already divided by
        TP*CP (as Megatron's ``apply_z_loss``); logged as the mean over TP x CP x DP."""
        tokens = z_TE.shape[0] if keep_T1 is None else keep_T1.sum()
        return self.attach_loss(z_TE, z_loss, coeff, "z_loss", tokens, avg_group=self.tp_cp_group)


_ROUTERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def find_routers(model) -> list:
    """Every counted router (:class:`CountedTopKRouter`: MoHGE, noisy and stock) of ``model``
    (a module or a list of model chunks), in module order. The walk of each chunk is done
    once and cached (the training loops call this every step), so a chunk's modules must not
    change after the first call (as for a built model)."""
    chunks: Iterable = model if isinstance(model, (list, tuple)) else [model]
    out = []
    for chunk in chunks:
        found = _ROUTERS.get(chunk)
        if found is None:
            found = [m for m in chunk.modules() if isinstance(m, CountedTopKRouter)]
            _ROUTERS[chunk] = found
        out.extend(found)
    return out


def set_training_progress(model, iteration: int, train_iters: int) -> None:
    """Report training progress to every router in ``model`` (module or list of chunks).

    Loss schedules (e.g. the group loss switched on after ``group_start_fraction`` of
    training) read it. Call once per iteration from the training loop.
    """
    if train_iters <= 0:
        raise ValueError(f"train_iters must be positive, got {train_iters}")
    for r in find_routers(model):
        r.set_training_progress(iteration / train_iters)


_WARNED: set = set()


def warn_once(key: str, message: str) -> None:
    """``warnings.warn(message)`` the first time ``key`` is seen in this process."""
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, stacklevel=3)


def warn_progress_unknown(start_fraction: float) -> None:
    warn_once("progress",
        f"MoHGE group loss has losses.group_start_fraction={start_fraction} but training "
        "progress was never reported, so it stays off. Call "
        "megatron_mohge.set_training_progress(model, iteration, train_iters) every step "
        "(or set group_start_fraction: 0).")
