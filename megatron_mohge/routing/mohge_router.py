"""The MoHGE two-level router as a Megatron router module (``MoESubmodules.router``)."""

from __future__ import annotations

from typing import Optional

import torch

from megatron_mohge.config import MoHGEConfig
from megatron_mohge.routing import losses as L
from megatron_mohge.routing.base import (
    GroupedExpertRouter,
    _default_pg_collection,
    warn_progress_unknown,
)
from megatron_mohge.routing.functional import two_level_route, valid_token_mask

GROUP_LOSS_NAME = "mohge_group_loss"
INTRA_GROUP_LOSS_NAME = "mohge_intra_group_loss"


class MoHGERouter(GroupedExpertRouter):
    """Group gate ``W_G`` (Ng x d) picks Kg groups, expert gate ``W_E`` (E x d, Megatron's
    router ``weight``) picks exactly K experts inside them; see ``two_level_route``.

    Attaches the cost-weighted group loss (``mohge_group_loss``, scheduled) and the
    intra-group experts loss (``mohge_intra_group_loss``) through Megatron's
    ``MoEAuxLossAutoScaler`` and aux-loss tracker (``GroupedExpertRouter.attach_loss``).
    Returns ``(probs, routing_map)`` in the allocation plan's slot order, as Megatron's
    dispatchers expect.
    """

    def __init__(self, config, pg_collection=None, is_mtp_layer: bool = False, *,
                 mohge_config: MoHGEConfig):
        mohge_config.check_transformer_config(config)
        pg_collection = _default_pg_collection(pg_collection)
        self.mohge = mohge_config
        self.plan = mohge_config.allocation_plan(pg_collection.ep.size())
        super().__init__(config, pg_collection, is_mtp_layer,
                         group_sizes=mohge_config.experts_per_group,
                         slot_to_canonical=self.plan.slot_to_canonical)
        self.group_weight = self.new_gate_weight(mohge_config.num_groups)
        self.register_buffer("group_costs_G", torch.tensor(mohge_config.group_costs),
                             persistent=False)

    def group_loss_active(self) -> bool:
        lo = self.mohge.losses
        if lo.group_coeff <= 0:
            return False
        if lo.group_start_fraction <= 0:
            return True
        if self.training_progress is None:
            warn_progress_unknown(lo.group_start_fraction)
            return False
        return self.training_progress >= lo.group_start_fraction

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        if self.training:  # Switch-style jitter regularises training (Megatron also jitters in eval)
            input = self.apply_input_jitter(input)
        x_TD = input.reshape(-1, input.shape[-1])
        u_TG = self.gate(x_TD, self.group_weight)
        z_TE = self.gate(x_TD, self.weight, self.bias)
        index = self.group_index(z_TE.device)
        keep_T1 = valid_token_mask(x_TD.shape[0], padding_mask, x_TD.device)
        training = self.training and torch.is_grad_enabled()

        if training and self.config.moe_z_loss_coeff:
            # Megatron divides by the TP*CP size: each SP/CP shard adds its own mean.
            coeff = self.config.moe_z_loss_coeff / self.tp_cp_group.size()
            z_loss = L.z_loss_two_level(u_TG, z_TE, index, coeff, keep_T1)
            z_TE = self.attach_z_loss(z_TE, z_loss, coeff, keep_T1)

        r = two_level_route(u_TG, z_TE, index, self.mohge.group_topk, self.mohge.topk,
                            self.mohge.router.group_score, self.mohge.router.expert_weighting)
        probs_TE = r.probs_TE
        if training:
            probs_TE = self._attach_losses(probs_TE, u_TG, r, keep_T1)
        self.record_counts(r.routing_map_TE, r.group_mask_TG, keep_T1)
        return self.to_slot_order(probs_TE, r.routing_map_TE)

    def _attach_losses(self, probs_TE, u_TG, r, keep_T1):
        lo = self.mohge.losses
        group_on = self.group_loss_active()
        if not group_on and lo.intra_group_coeff <= 0:
            return probs_TE
        counts = L.count_tokens(r.group_mask_TG, r.routing_map_TE, keep_T1, self.tp_cp_group)
        if group_on:
            loss = L.group_aux_loss(u_TG, counts, self.group_costs_G.to(u_TG.device),
                                    self.mohge.group_topk, lo.group_coeff, keep_T1)
            probs_TE = self.log_aux(probs_TE, lo.group_coeff, loss, GROUP_LOSS_NAME, keep_T1)
        if lo.intra_group_coeff > 0:
            if lo.intra_group_mode == "paper":
                mean_n = self.mohge.num_experts / self.mohge.num_groups
                loss = L.intra_group_loss_paper(probs_TE, counts, self.mohge.topk,
                                                self.mohge.group_topk, mean_n,
                                                lo.intra_group_coeff, keep_T1)
            else:
                loss = L.intra_group_loss_per_group(
                    r.in_group_probs_TE, r.group_mask_TG, counts,
                    self.group_index(probs_TE.device), self.group_sizes, lo.intra_group_coeff,
                    keep_T1)
            probs_TE = self.log_aux(probs_TE, lo.intra_group_coeff, loss, INTRA_GROUP_LOSS_NAME,
                                    keep_T1)
        return probs_TE
