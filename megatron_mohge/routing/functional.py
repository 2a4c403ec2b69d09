"""Pure routing math of the MoHGE two-level router (the formulas: :func:`two_level_route`).

Shape suffixes (``_TE``, ``_TG``, ...): see :mod:`megatron_mohge.routing`.
Everything here is differentiable where the paper's router is, and free of Megatron state,
so tests can check it against hand-computed values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


@dataclass
class GroupIndex:
    """Index tensors describing which experts belong to which group."""

    group_of_expert_E: torch.Tensor  # long [E]
    padded_ids_GN: torch.Tensor  # long [G, Nmax]: expert ids of each group, padded with 0
    valid_GN: torch.Tensor  # bool [G, Nmax]: False where padded
    equal_sizes: bool  # all groups the same size (fast reshape path)

    @classmethod
    def build(cls, group_sizes: Sequence[int], device=None) -> "GroupIndex":
        sizes = [int(n) for n in group_sizes]
        nmax = max(sizes)
        group_of = torch.tensor([g for g, n in enumerate(sizes) for _ in range(n)], dtype=torch.long)
        padded = torch.zeros(len(sizes), nmax, dtype=torch.long)
        valid = torch.zeros(len(sizes), nmax, dtype=torch.bool)
        start = 0
        for g, n in enumerate(sizes):
            padded[g, :n] = torch.arange(start, start + n)
            valid[g, :n] = True
            start += n
        return cls(group_of.to(device), padded.to(device), valid.to(device), len(set(sizes)) == 1)

    @property
    def num_groups(self) -> int:
        return self.padded_ids_GN.shape[0]

    def to_padded(self, x_TE: torch.Tensor, fill: float) -> torch.Tensor:
        """[T, E] -> [T, G, Nmax], padded entries set to ``fill``."""
        if self.equal_sizes:
            return x_TE.view(x_TE.shape[0], self.num_groups, -1)
        x_TGN = x_TE[:, self.padded_ids_GN]
        return x_TGN.masked_fill(~self.valid_GN, fill)

    def from_padded(self, x_TGN: torch.Tensor) -> torch.Tensor:
        """[T, G, Nmax] -> [T, E] (drops padding)."""
        if self.equal_sizes:
            return x_TGN.reshape(x_TGN.shape[0], -1)
        return x_TGN[:, self.valid_GN]


def segment_log_softmax(z_TE: torch.Tensor, index: GroupIndex) -> torch.Tensor:
    """Log-softmax of expert logits inside each group: log pi_{g,i} = log softmax_i(z_{g,.})."""
    return index.from_padded(torch.log_softmax(index.to_padded(z_TE, float("-inf")), dim=-1))


def segment_logsumexp(z_TE: torch.Tensor, index: GroupIndex) -> torch.Tensor:
    """logsumexp of expert logits inside each group: [T, G]."""
    return torch.logsumexp(index.to_padded(z_TE, float("-inf")), dim=-1)


@dataclass
class TwoLevelRouting:
    """Result of one two-level routing step, canonical expert order."""

    probs_TE: torch.Tensor  # final combine weights w (zero for unchosen experts)
    routing_map_TE: torch.Tensor  # bool, exactly K True per token, all inside the selected groups
    group_mask_TG: torch.Tensor  # bool, the Kg groups S picked by the group gate
    group_scores_TG: torch.Tensor  # s = sigmoid(u) or softmax(u)
    in_group_probs_TE: torch.Tensor  # pi, softmax inside each group
    expert_idx_TK: Optional[torch.Tensor] = None  # the K chosen experts (canonical ids)
    weights_TK: Optional[torch.Tensor] = None  # their combine weights (probs_TE's non-zeros)


def two_level_route(u_TG: torch.Tensor, z_TE: torch.Tensor, index: GroupIndex, group_topk: int,
                    topk: int, group_score: str = "sigmoid",
                    expert_weighting: str = "renorm",
                    selection_bias_E: Optional[torch.Tensor] = None,
                    group_gradient: str = "none") -> TwoLevelRouting:
    """MoHGE routing: group gate -> in-group softmax -> combined score -> exactly K experts.

    1. ``s = sigmoid(u)`` (or softmax); ``S`` = the Kg groups of largest ``s``, selected on
       the logits ``u`` (same order; ``sigmoid`` is 1.0 in fp32 above u ~ 17 and would tie).
    2. ``pi_{g,i} = softmax_i(z_{g,.})`` inside each group.
    3. ``q_{g,i} = s_g * 1[g in S] * pi_{g,i}``, normalised to sum 1 over all experts.
    4. top-K of ``q`` over all experts (no per-group quota), always inside ``S``.
    5. weights: ``renorm`` -> ``q_chosen / sum(q_chosen)``; ``paper`` -> ``softmax(q_chosen)``
       (the released code's softmax over probabilities); ``unnormalized`` -> ``q_chosen``
       (no re-normalisation over the chosen experts, as DeepSeek-V2's group-limited gate: the
       group factor ``s_g / sum_{h in S} s_h`` stays in the weights). With K=1 renorm and
       paper would be a constant 1 and give the gates no gradient (why Megatron rejects
       softmax-after-top-1), so the weight is ``q_chosen`` itself, as Megatron's pre-softmax
       top-1.

    Why the group gate can starve: with ``renorm`` and all K picks in one group ``g``,
    ``w = pi_i / sum_chosen pi`` -- ``s_g`` cancels and the LM loss sends the group gate no
    gradient (with Kg=1 always). ``group_gradient="straight_through"`` multiplies each chosen
    weight by ``exp(log s_g - stop_grad(log s_g))``: exactly 1 in value (forward unchanged),
    while the backward pass sees the output scaled by ``s_g`` (d out / d log s_g = the group's
    part of the output), so the group gate learns from the task in that case too.

    ``q`` is computed as ``log q = log s_g + log pi_{g,i} - logsumexp`` so that it stays exact
    and differentiable when ``s`` or ``pi`` underflow in fp32 (group logits below ~ -88, or
    in-group logit gaps above ~ 88); ``log q = -inf`` outside ``S``, so the K picks come from
    ``S`` whenever the Kg smallest groups hold >= K experts (``MoHGEConfig`` validates that).

    ``selection_bias_E`` (loss-free balancing, canonical order) is added to the expert
    logits ``z`` for the top-K *selection* only: experts are ranked by
    ``s_g * 1[g in S] * softmax_i(z_{g,.} + b_{g,.})``, whose sum over each group is still
    ``s_g``, so the bias moves load between the experts of a group and leaves the group-level
    (cost) steering alone. The combine weights come from the unbiased ``q``.
    """
    if group_score == "sigmoid":
        s_TG, log_s_TG = torch.sigmoid(u_TG), F.logsigmoid(u_TG)
    elif group_score == "softmax":
        s_TG, log_s_TG = torch.softmax(u_TG, dim=-1), torch.log_softmax(u_TG, dim=-1)
    else:
        raise ValueError(f"unknown group_score {group_score!r}")
    if expert_weighting not in ("renorm", "paper", "unnormalized"):
        raise ValueError(f"unknown expert_weighting {expert_weighting!r}")
    if group_gradient not in ("none", "straight_through"):
        raise ValueError(f"unknown group_gradient {group_gradient!r}")
    _, gidx_TK = torch.topk(u_TG, k=group_topk, dim=-1)  # s is monotone in u
    group_mask_TG = torch.zeros_like(u_TG, dtype=torch.bool).scatter(1, gidx_TK, True)

    log_pi_TE = segment_log_softmax(z_TE, index)
    group_of = index.group_of_expert_E
    if group_topk == 1:
        # q = pi inside the one selected group: s_g cancels exactly, so the group gate gets no
        # gradient through the weights (MoHGEConfig warns); skip the rounding noise.
        log_q_TE = log_pi_TE.masked_fill(~group_mask_TG[:, group_of], float("-inf"))
    else:
        log_q_TE = log_s_TG.masked_fill(~group_mask_TG, float("-inf"))[:, group_of] + log_pi_TE
        log_q_TE = log_q_TE - torch.logsumexp(log_q_TE, dim=-1, keepdim=True)

    # Expert selection score, kept apart from the weights: the loss-free bias re-normalises
    # inside each group (log s_g + log softmax(z + b)), so each group keeps its mass s_g;
    # -inf (outside S) stays -inf.
    if selection_bias_E is None:
        select_TE = log_q_TE
    else:
        zb_TE = z_TE + selection_bias_E.to(z_TE.dtype)
        log_pib_TE = segment_log_softmax(zb_TE, index)
        select_TE = log_s_TG.masked_fill(~group_mask_TG, float("-inf"))[:, group_of] + log_pib_TE
    _, eidx_TK = torch.topk(select_TE, k=topk, dim=-1)
    log_q_chosen_TK = log_q_TE.gather(1, eidx_TK)
    if topk == 1 or expert_weighting == "unnormalized":
        w_TK = log_q_chosen_TK.exp()
    elif expert_weighting == "renorm":
        w_TK = torch.softmax(log_q_chosen_TK, dim=-1)  # = q_chosen / sum(q_chosen)
    else:
        w_TK = torch.softmax(log_q_chosen_TK.exp(), dim=-1)
    if group_gradient == "straight_through":
        log_s_chosen_TK = log_s_TG.gather(1, group_of[eidx_TK])
        w_TK = w_TK * torch.exp(log_s_chosen_TK - log_s_chosen_TK.detach())  # == w_TK in value
    probs_TE = torch.zeros_like(z_TE).scatter(1, eidx_TK, w_TK)
    routing_map_TE = torch.zeros_like(z_TE, dtype=torch.bool).scatter(1, eidx_TK, True)
    return TwoLevelRouting(probs_TE, routing_map_TE, group_mask_TG, s_TG, log_pi_TE.exp(),
                           eidx_TK, w_TK)


@torch.no_grad()
def routing_diagnostics(r: TwoLevelRouting, index: GroupIndex,
                        keep_T1: Optional[torch.Tensor]) -> torch.Tensor:
    """Sums over this call's (valid) tokens of three per-token figures, as one float64
    vector ``[tokens, same_group, ingroup_max_prob, weight_gap]``:

    * ``same_group``: 1 when all K picks lie in one group (where ``renorm`` gives the group
      gate no LM gradient, see :func:`two_level_route`);
    * ``ingroup_max_prob``: the largest in-group probability ``max_i pi_{g,i}``, averaged
      over the token's Kg selected groups (``1/N_g`` is a flat expert gate);
    * ``weight_gap``: max - min combine weight of the chosen experts (0: the weights carry no
      preference among the picks).
    """
    g_TK = index.group_of_expert_E[r.expert_idx_TK]
    same_T = (g_TK == g_TK[:, :1]).all(dim=-1).double()
    pi_max_TG = index.to_padded(r.in_group_probs_TE.double(), 0.0).amax(dim=-1)
    gm_TG = r.group_mask_TG.double()
    inmax_T = (pi_max_TG * gm_TG).sum(-1) / gm_TG.sum(-1)
    w_TK = r.weights_TK.double()
    gap_T = w_TK.amax(dim=-1) - w_TK.amin(dim=-1)
    return token_sums(keep_T1, same_T, inmax_T, gap_T)


@torch.no_grad()
def token_sums(keep_T1: Optional[torch.Tensor], *per_token_T: torch.Tensor) -> torch.Tensor:
    """``[valid tokens, sum of each per-token figure over valid tokens]`` in float64."""
    figs = torch.stack(per_token_T, dim=-1).double()  # [T, figures]
    if keep_T1 is None:
        tokens = torch.tensor([float(figs.shape[0])], dtype=torch.float64, device=figs.device)
        return torch.cat([tokens, figs.sum(0)])
    keep = keep_T1.reshape(-1, 1).to(figs)
    return torch.cat([keep.sum().reshape(1), (figs * keep).sum(0)])


def valid_token_mask(num_tokens: int, padding_mask: Optional[torch.Tensor],
                     device) -> Optional[torch.Tensor]:
    """Flatten Megatron's padding mask (True = padding) into a float keep-mask [T, 1]."""
    if padding_mask is None:
        return None
    keep = (~padding_mask.reshape(-1).bool()).to(device)
    if keep.numel() != num_tokens:
        raise ValueError(f"padding_mask has {keep.numel()} entries for {num_tokens} tokens")
    return keep.unsqueeze(-1)
