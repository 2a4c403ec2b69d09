"""The MoHGE two-level router as a Megatron router module (``MoESubmodules.router``).

Shape suffixes (``_TE``, ``_TG``, ...): see :mod:`megatron_mohge.routing`.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_mohge.config import MoHGEConfig
from megatron_mohge.routing import losses as L
from megatron_mohge.routing.base import (
    GroupedExpertRouter,
    _default_pg_collection,
    warn_once,
    warn_progress_unknown,
)
from megatron_mohge.routing.functional import (
    routing_diagnostics,
    two_level_route,
    valid_token_mask,
)

GROUP_LOSS_NAME = "mohge_group_loss"
GROUP_BALANCE_LOSS_NAME = "mohge_group_balance_loss"
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
        self.watch_gate_grad(self.group_weight, "group")
        self.register_buffer("group_costs_G", torch.tensor(mohge_config.group_costs),
                             persistent=False)
        lo = mohge_config.losses
        self.bias_update_rate = float(lo.expert_bias_update_rate)
        if self.bias_update_rate > 0:
            # Loss-free balancing state: fp32, canonical order (so it reshards across EP
            # sizes like any replicated tensor), checkpointed with the router.
            self.register_buffer("balance_bias_E", torch.zeros(self.num_experts,
                                                               dtype=torch.float32))
        else:
            self.balance_bias_E = None
        self.global_counts = L.GlobalBatchCounts() if lo.global_batch_stats else None

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
        input = self.jitter(input)
        x_TD = input.reshape(-1, input.shape[-1])
        u_TG = self.gate(x_TD, self.group_weight)
        z_TE = self.gate(x_TD, self.weight, self.bias)
        index = self.group_index(z_TE.device)
        keep_T1 = valid_token_mask(x_TD.shape[0], padding_mask, x_TD.device)
        training = self.training and torch.is_grad_enabled()

        z_TE = self.apply_z_loss(z_TE, keep_T1, u_TG)

        ro = self.mohge.router
        r = two_level_route(u_TG, z_TE, index, self.mohge.group_topk, self.mohge.topk,
                            ro.group_score, ro.expert_weighting,
                            selection_bias_E=self._selection_bias(),
                            group_gradient=ro.group_gradient)
        probs_TE = r.probs_TE
        if training:
            probs_TE = self._attach_losses(probs_TE, u_TG, r, keep_T1)
        self.record_counts(r.routing_map_TE, r.group_mask_TG, keep_T1)
        self.counter.record_diagnostics(routing_diagnostics(r, index, keep_T1))
        return self.to_slot_order(probs_TE, r.routing_map_TE)

    def _attach_losses(self, probs_TE, u_TG, r, keep_T1):
        lo = self.mohge.losses
        group_on = self.group_loss_active()
        if not group_on and lo.intra_group_coeff <= 0 and lo.group_balance_coeff <= 0:
            return probs_TE
        index = self.group_index(probs_TE.device)
        if self.global_counts is None:
            counts = L.count_tokens(r.group_mask_TG, r.routing_map_TE, keep_T1, self.tp_cp_group,
                                    index)
            load = None
        else:
            # f from the step's global counts; P normalised by this micro-batch's global counts
            # per data-parallel replica, so that DDP's gradient mean over DP equals the
            # gradient of one rank seeing the whole batch.
            glob = L.count_tokens(r.group_mask_TG, r.routing_map_TE, keep_T1,
                                  self.tp_dp_cp_group, index)
            counts = glob.scaled(self.tp_cp_group.size() / self.tp_dp_cp_group.size())
            if self.counter.step_forwards >= _STEP_FORWARDS_WARN:
                warn_global_stats_never_reset(self.counter.step_forwards)
            load = self.global_counts.add(glob)
        m = self.mohge
        if group_on:
            loss = L.group_aux_loss(u_TG, counts, self.group_costs_G.to(u_TG.device),
                                    m.group_topk, lo.group_coeff, keep_T1, load,
                                    count=lo.group_loss_count, topk=m.topk, index=index)
            probs_TE = self.log_aux(probs_TE, lo.group_coeff, loss, GROUP_LOSS_NAME, keep_T1)
        if lo.group_balance_coeff > 0:
            loss = L.group_balance_loss(u_TG, counts, index, self.group_sizes, m.topk,
                                        lo.group_balance_coeff, keep_T1, load)
            probs_TE = self.log_aux(probs_TE, lo.group_balance_coeff, loss,
                                    GROUP_BALANCE_LOSS_NAME, keep_T1)
        if lo.intra_group_coeff > 0:
            if lo.intra_group_mode == "paper":
                mean_n = m.num_experts / m.num_groups
                loss = L.intra_group_loss_paper(probs_TE, counts, m.topk, m.group_topk, mean_n,
                                                lo.intra_group_coeff, keep_T1, load)
            else:
                used = r.routing_map_TE if lo.intra_group_mode == "per_group_used" else None
                loss = L.intra_group_loss_per_group(
                    r.in_group_probs_TE, r.group_mask_TG, counts, index, self.group_sizes,
                    lo.intra_group_coeff, keep_T1, load, routing_map_TE=used)
            probs_TE = self.log_aux(probs_TE, lo.intra_group_coeff, loss, INTRA_GROUP_LOSS_NAME,
                                    keep_T1)
        return probs_TE

    # ------------------------------------------------------------------ balancing
    def _selection_bias(self) -> Optional[torch.Tensor]:
        if self.balance_bias_E is None:
            return None
        self._keep_bias_fp32()
        if self.counter.step_forwards >= _STEP_FORWARDS_WARN:
            warn_bias_never_updated(self.counter.step_forwards)
        return self.balance_bias_E

    def _keep_bias_fp32(self) -> None:
        # Float16Module casts buffers to bf16/fp16; the bias moves in steps of the update rate,
        # which bf16 cannot resolve around 1 (as Megatron's _maintain_float32_expert_bias).
        if self.balance_bias_E is not None and self.balance_bias_E.dtype != torch.float32:
            self.balance_bias_E.data = self.balance_bias_E.data.float()

    @torch.no_grad()
    def end_step(self, global_load_E: torch.Tensor) -> None:
        """End of an optimizer step: update the loss-free bias from the global batch's load
        (canonical order, summed over every rank and micro-batch) and start the next step's
        global-batch statistics."""
        if self.balance_bias_E is not None:  # an empty step moves nothing: sign(0 - 0) = 0
            self._keep_bias_fp32()
            index = self.group_index(self.balance_bias_E.device)
            self.balance_bias_E.copy_(L.loss_free_bias_update(
                self.balance_bias_E, global_load_E.to(self.balance_bias_E), index,
                self.bias_update_rate))
        if self.global_counts is not None:
            self.global_counts.reset()

    def extra_figures(self) -> dict:
        """The loss-free balancing bias (canonical order), when enabled."""
        return {} if self.balance_bias_E is None else {"balance_bias": self.balance_bias_E.tolist()}

    def _load_from_state_dict(self, *args, **kwargs):
        self._keep_bias_fp32()  # load into fp32 storage, not the bf16 copy
        return super()._load_from_state_dict(*args, **kwargs)

    def _save_to_state_dict(self, *args, **kwargs):
        self._keep_bias_fp32()
        return super()._save_to_state_dict(*args, **kwargs)


# A training loop that never runs end_of_step keeps accumulating step counts: say so once.
_STEP_FORWARDS_WARN = 10_000
_END_OF_STEP_HINT = (
    "Wrap Megatron's finalize_model_grads with "
    "megatron_mohge.routing.balance.wrap_finalize_model_grads (mohge-train and the "
    "Megatron-LM launcher do), or call megatron_mohge.routing.balance.end_of_step(model) "
    "once per optimizer step.")


def warn_bias_never_updated(forwards: int) -> None:
    warn_once("bias", f"MoHGE loss-free balancing: {forwards} training forward passes without "
                      f"an update of the expert bias. {_END_OF_STEP_HINT}")


def warn_global_stats_never_reset(forwards: int) -> None:
    # without a bias the statistics are the only per-step state: their window is the run
    warn_once("global_stats", f"MoHGE losses.global_batch_stats: {forwards} training forward "
                              f"passes in one step window, so the aux losses' statistics cover "
                              f"the whole run instead of one global batch. {_END_OF_STEP_HINT}")
