"""Sparsely-gated MoE router (Shazeer et al. 2017, "Outrageously Large Neural Networks").

Flat gate (``router.type: noisy_topk``)::

    H(x)_i = (x W_g)_i + N(0,1) * (softplus((x W_noise)_i) + eps)      (training only)
    G(x)   = softmax(KeepTopK(H(x), k))

Hierarchical gate (``hierarchical_noisy_topk``, paper appendix B): a primary noisy top-Kg gate
over groups and, inside each chosen group ``i``, a secondary noisy top-(K/Kg) gate ``G_i`` over
the group's experts (the group's rows of ``W_g``/``W_noise``); the weight of expert ``(i, j)``
is ``G_primary(x)_i * G_i(x)_j``.

Balancing losses (training only)::

    L_imp  = w_imp  * CV(Importance)^2,  Importance_i = sum_x G(x)_i
    L_load = w_load * CV(Load)^2,        Load_i = sum_x P(x, i)
    P(x, i) = Phi(((x W_g)_i - kth_excluding(H(x), k, i)) / (softplus((x W_noise)_i) + eps))
    hierarchical: Importance_H(X)_{i,j} = sum_x G_primary(x)_i G_i(x)_j
                  Load_H(X)_{i,j} = Load_primary(X)_i * Load_i(X^(i))_j / |X^(i)|

``CV^2 = var / mean^2`` over the experts with the *population* variance (divide by E), as the
paper's tensor2tensor ``cv_squared``: the experts are the whole population, not a sample, and
``CV^2`` of a one-hot load is then exactly ``E - 1``. Without noise the load uses the hard
routing counts like tensor2tensor's ``_gates_to_load``; it has no gradient, so it is only
logged.

CV^2 is not a sum over tokens, so the per-expert sums are all-reduced over the TP x CP group
(sequence-parallel / context-parallel shards of the same sequences) with Megatron's
``reduce_from_tensor_model_parallel_region`` (forward all-reduce, backward identity): every rank
computes the same global loss and back-propagates ``dL/dSum`` into its own tokens only; the
SP-flagged router grads are summed over TP and Megatron's aux-loss scale undoes the CP average,
so the summed gradient is the full ``dL/dW``.

Shape suffixes (``_TE``, ``_TG``, ...): see :mod:`megatron_mohge.routing`.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

from megatron_mohge.config import MoHGEConfig, NoisyGatingConfig
from megatron_mohge.routing.base import GroupedExpertRouter, _default_pg_collection
from megatron_mohge.routing.counters import RoutingCounter
from megatron_mohge.routing.functional import valid_token_mask

IMPORTANCE_LOSS_NAME = "noisy_importance_loss"
LOAD_LOSS_NAME = "noisy_load_loss"
_CV_EPS = 1e-10  # tensor2tensor's epsilon in cv_squared


def cv_squared(x_E: torch.Tensor) -> torch.Tensor:
    """``var(x) / (mean(x)^2 + 1e-10)`` with the population variance (1/E)."""
    x = x_E.float()
    mean = x.mean()
    return (x - mean).square().mean() / (mean.square() + _CV_EPS)


def keep_topk_softmax(h: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``G = softmax(KeepTopK(h, k))`` along the last dim; returns (gates, chosen mask)."""
    top_v, top_i = torch.topk(h, k, dim=-1)
    chosen = torch.zeros_like(h, dtype=torch.bool).scatter(-1, top_i, True)
    return torch.zeros_like(h).scatter(-1, top_i, torch.softmax(top_v, dim=-1)), chosen


def kth_excluding(h: torch.Tensor, k: int, chosen: torch.Tensor) -> torch.Tensor:
    """k-th greatest entry of ``h`` other than ``h_i``, for every ``i`` (last dim).

    For ``i`` in the top k that is the (k+1)-th greatest overall, otherwise the k-th; ``-inf``
    when fewer than k other entries exist (``i`` is then always kept).
    """
    n = h.shape[-1]
    top = torch.topk(h, min(k + 1, n), dim=-1).values
    if k + 1 > n:
        top = F.pad(top, (0, k + 1 - n), value=float("-inf"))
    return torch.where(chosen, top[..., k:k + 1], top[..., k - 1:k])


def noise_stddev(noise_logits: torch.Tensor, epsilon: float) -> torch.Tensor:
    """``softplus(x W_noise) + eps``, floored at the dtype's machine epsilon.

    softplus underflows to 0 for large negative inputs; a zero std makes ``prob_in_topk``
    divide by zero (NaN gradients). ``NoisyGatingConfig`` requires eps > 0; the floor also
    keeps a tiny eps from overflowing ``1/std^2`` in the backward.
    """
    sd = F.softplus(noise_logits) + epsilon
    return sd.clamp_min(torch.finfo(sd.dtype).eps)


def prob_in_topk(clean: torch.Tensor, h: torch.Tensor, stddev: torch.Tensor,
                 chosen: torch.Tensor, k: int) -> torch.Tensor:
    """Smooth load estimator ``P(x,i) = Phi((clean_i - kth_excluding(h, k, i)) / stddev_i)``:
    the chance that ``i`` is in the top k when only its own noise is redrawn."""
    thr = kth_excluding(h, k, chosen)
    finite = torch.isfinite(thr)
    # A -inf threshold means "always kept"; keep the math finite so the backward has no inf*0.
    z = (clean - thr.masked_fill(~finite, 0.0)) / stddev
    return torch.where(finite, torch.special.ndtr(z), torch.ones_like(z))


class NoisyTopKRouter(GroupedExpertRouter):
    """Noisy top-k gating (flat or hierarchical) with the paper's importance and load losses.

    The constructor serves uniform experts (Megatron's stock ``MoELayer``);
    :meth:`for_mohge` builds the router of a MoHGE layer (heterogeneous experts).

    Args:
        config: Megatron ``TransformerConfig``; ``moe_router_topk`` is K (exactly K experts/token).
        pg_collection: Megatron process groups (``None``: from ``parallel_state``).
        gating: ``NoisyGatingConfig`` (default: the paper's settings).
        group_sizes: experts per group (canonical order); required when ``hierarchical``.
        group_topk: Kg, groups per token; required when ``hierarchical``.
        hierarchical: the paper's two-level gate (appendix B) instead of the flat one.
        slot_to_canonical: the canonical expert id of each EP slot (``None``: identity).
    """

    #: the MoHGE layer and its allocation plan (:meth:`for_mohge`); ``None`` otherwise.
    mohge: Optional[MoHGEConfig] = None
    plan = None

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, *,
                 gating: Optional[NoisyGatingConfig] = None,
                 group_sizes: Optional[Sequence[int]] = None, group_topk: Optional[int] = None,
                 hierarchical: bool = False, slot_to_canonical: Optional[Sequence[int]] = None):
        pg_collection = _default_pg_collection(pg_collection)
        if hierarchical and (group_sizes is None or group_topk is None):
            raise ValueError("NoisyTopKRouter(hierarchical=True) needs group_sizes (experts per "
                             "group) and group_topk (groups per token).")
        if group_sizes is None:
            group_sizes = [config.num_moe_experts]
        super().__init__(config, pg_collection, is_mtp_layer, group_sizes=group_sizes,
                         slot_to_canonical=slot_to_canonical)
        self.gating = gating if gating is not None else NoisyGatingConfig()
        self.gating.validate()
        self.hierarchical = bool(hierarchical)
        self._check_supported(group_topk)
        self.group_topk = int(group_topk) if self.hierarchical else None
        self.topk_in_group = self.topk // self.group_topk if self.hierarchical else None
        noise = self.gating.noise
        self.noise_weight = self.new_gate_weight(self.num_experts) if noise else None  # W_noise
        if self.hierarchical:  # primary gate over groups: clean and noise weights [Ng, d]
            self.group_weight = self.new_gate_weight(len(self.group_sizes))
            self.group_noise_weight = (self.new_gate_weight(len(self.group_sizes)) if noise
                                       else None)
        self.counter = RoutingCounter(self.num_experts, len(self.group_sizes), importance=True)
        self.reset_parameters()

    @classmethod
    def for_mohge(cls, config, pg_collection=None, is_mtp_layer: bool = False, *,
                  mohge_config: MoHGEConfig) -> "NoisyTopKRouter":
        """The router of a MoHGE layer whose ``router.type`` is ``noisy_topk`` or
        ``hierarchical_noisy_topk``: the gating options, groups, Kg and the allocation plan's
        slot order all come from ``mohge_config`` (``MoESubmodules.router``:
        ``partial(NoisyTopKRouter.for_mohge, mohge_config=...)``)."""
        if mohge_config.router.type not in ("noisy_topk", "hierarchical_noisy_topk"):
            raise ValueError(f"NoisyTopKRouter: router.type={mohge_config.router.type!r}; use "
                             "MoHGERouter for the MoHGE router.")
        mohge_config.check_transformer_config(config)
        pg_collection = _default_pg_collection(pg_collection)
        plan = mohge_config.allocation_plan(pg_collection.ep.size())
        router = cls(config, pg_collection, is_mtp_layer, gating=mohge_config.noisy_gating,
                     group_sizes=mohge_config.experts_per_group,
                     group_topk=mohge_config.group_topk,
                     hierarchical=mohge_config.router.type == "hierarchical_noisy_topk",
                     slot_to_canonical=plan.slot_to_canonical)
        router.mohge, router.plan = mohge_config, plan
        return router

    def _check_supported(self, group_topk: Optional[int]) -> None:
        c = self.config
        if (self.is_aux_loss_enabled() or c.moe_router_enable_expert_bias
                or c.moe_expert_capacity_factor is not None):
            raise ValueError("NoisyTopKRouter: Megatron's aux losses, expert bias and token "
                             "dropping are not applied by this router; set "
                             "moe_router_load_balancing_type='none' (or moe_aux_loss_coeff=0), "
                             "moe_router_enable_expert_bias=False and "
                             "moe_expert_capacity_factor=None.")
        if not self.hierarchical:
            return
        ng, k = len(self.group_sizes), self.topk
        if not 1 <= group_topk <= ng:
            raise ValueError(f"NoisyTopKRouter: group_topk={group_topk} must be in [1, {ng}].")
        if k % group_topk or k // group_topk > min(self.group_sizes):
            raise ValueError(
                f"NoisyTopKRouter: the hierarchical gate picks K/group_topk experts in each of "
                f"group_topk groups, so moe_router_topk={k} must be a multiple of "
                f"group_topk={group_topk} with K/group_topk <= the smallest group "
                f"({min(self.group_sizes)}).")

    def reset_parameters(self) -> None:
        """Zero-initialise every gate (paper): all experts start equal and noise spreads tokens."""
        super().reset_parameters()  # dtype cast and sequence_parallel flags, as Megatron
        for name in ("weight", "bias", "noise_weight", "group_weight", "group_noise_weight"):
            p = getattr(self, name, None)
            if p is not None:
                with torch.no_grad():
                    p.zero_()

    # Importance_e over the counting window (reset with the other counts)
    importance_E = property(lambda self: self.counter.importance_E)

    # ------------------------------------------------------------------ forward
    def _noisy(self, x_TD: torch.Tensor, clean: torch.Tensor, noise_weight, noisy: bool):
        """``(H, stddev)``, ``H = clean + N(0,1) * stddev`` while training, else ``(clean, None)``.
        """
        if not noisy:
            return clean, None
        sd = noise_stddev(self.gate(x_TD, noise_weight), self.gating.noise_epsilon)
        return clean + torch.randn_like(clean) * sd, sd

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        input = self.jitter(input)
        x_TD = input.reshape(-1, input.shape[-1])
        keep_T1 = valid_token_mask(x_TD.shape[0], padding_mask, x_TD.device)
        training = self.training and torch.is_grad_enabled()
        noisy = self.gating.noise and self.training
        z_TE = self.gate(x_TD, self.weight, self.bias)  # x W_g, canonical order
        if self.hierarchical:
            index = self.group_index(z_TE.device)
            u_TG = self.gate(x_TD, self.group_weight)  # primary gate, clean
            z_TE = self.apply_z_loss(z_TE, keep_T1, u_TG)  # MoHGE's two-level z-loss
        else:
            z_TE = self.apply_z_loss(z_TE, keep_T1)  # Megatron's z-loss on the clean logits
        # Noise after the z-loss hook so the routing consumes the hooked logits.
        h_TE, sd_TE = self._noisy(x_TD, z_TE, self.noise_weight, noisy)
        if not self.hierarchical:
            probs_TE, routing_map_TE = keep_topk_softmax(h_TE, self.topk)
            group_mask_TG = None
            if training:
                load_TE = (routing_map_TE.float() if sd_TE is None
                           else prob_in_topk(z_TE, h_TE, sd_TE, routing_map_TE, self.topk))
                probs_TE = self._attach_losses(probs_TE, [load_TE], keep_T1)
        else:
            hu_TG, sdu_TG = self._noisy(x_TD, u_TG, self.group_noise_weight, noisy)
            g_TG, group_mask_TG = keep_topk_softmax(hu_TG, self.group_topk)  # G_primary
            gi_TGN, chosen_TGN = keep_topk_softmax(index.to_padded(h_TE, float("-inf")),
                                                   self.topk_in_group)  # G_i, every group
            group_of = index.group_of_expert_E
            in_group_TE = group_mask_TG[:, group_of]
            probs_TE = g_TG[:, group_of] * index.from_padded(gi_TGN)  # zero outside chosen groups
            routing_map_TE = index.from_padded(chosen_TGN) & in_group_TE
            if training:
                if sdu_TG is None:  # hard counts: Load_H reduces to tokens per expert
                    load_parts = [group_mask_TG.float(), routing_map_TE.float()]
                else:
                    p_TG = prob_in_topk(u_TG, hu_TG, sdu_TG, group_mask_TG, self.group_topk)
                    p_TGN = prob_in_topk(index.to_padded(z_TE, 0.0),
                                         index.to_padded(h_TE, float("-inf")),
                                         index.to_padded(sd_TE, 1.0), chosen_TGN,
                                         self.topk_in_group)
                    # P_i(x, j) only counts tokens x in X^(i) (routed to group i).
                    load_parts = [p_TG, index.from_padded(p_TGN) * in_group_TE]
                load_parts.append(group_mask_TG.float())  # |X^(i)|
                probs_TE = self._attach_losses(probs_TE, load_parts, keep_T1)
        with torch.no_grad():
            w_TE = probs_TE.detach() if keep_T1 is None else probs_TE.detach() * keep_T1
            self.counter.add_importance(w_TE)
        self.record_counts(routing_map_TE, group_mask_TG, keep_T1)
        return self.to_slot_order(probs_TE, routing_map_TE)

    # ------------------------------------------------------------------ losses
    def _attach_losses(self, probs_TE: torch.Tensor, load_parts: list[torch.Tensor],
                       keep_T1: Optional[torch.Tensor]) -> torch.Tensor:
        """``load_parts``: per-token ``[P(x,i)]`` (flat) or ``[P_primary(x,g), P_i(x,j) 1[x in
        X^(i)], 1[x in X^(i)]]`` (hierarchical); hard 0/1 counts without noise."""
        w_imp, w_load = self.gating.importance_coeff, self.gating.load_coeff
        if w_imp <= 0 and w_load <= 0:
            return probs_TE
        parts = [probs_TE] + load_parts
        if keep_T1 is not None:
            parts = [p * keep_T1 for p in parts]
        sizes = [p.shape[1] for p in parts]
        # Global per-expert sums over the SP/CP shards; differentiable (backward: identity).
        sums = reduce_from_tensor_model_parallel_region(
            torch.cat([p.float().sum(0) for p in parts]), group=self.tp_cp_group)
        importance_E, *loads = torch.split(sums, sizes)
        if self.hierarchical:
            load_G, load_in_group_E, count_G = loads
            g = self.group_index(sums.device).group_of_expert_E
            load_E = load_G[g] * load_in_group_E / count_G.detach()[g].clamp_min(1.0)
        else:
            (load_E,) = loads
        local_tokens = probs_TE.shape[0] if keep_T1 is None else keep_T1.sum()
        for coeff, cv2, name in ((w_imp, cv_squared(importance_E), IMPORTANCE_LOSS_NAME),
                                 (w_load, cv_squared(load_E), LOAD_LOSS_NAME)):
            if coeff > 0:
                # Every TP x CP rank holds the same global loss (replicated: logged 1/size
                # each, so the tracker's sum counts it once; then averaged over DP).
                probs_TE = self.attach_loss(probs_TE, coeff * cv2, coeff, name, local_tokens,
                                            reduce_group=self.tp_cp_group, replicated=True)
        return probs_TE
