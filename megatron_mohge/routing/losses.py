"""MoHGE auxiliary losses, as pure functions (each loss's formula is in its docstring).

Like Megatron's ``switch_load_balancing_loss_func``, each loss is computed from *global*
token counts (all-reduced over the sequence/context-parallel group ``reduce_group``) and
*local* probability sums divided by the global token count. The per-rank values are
partial sums: adding them over ``reduce_group`` gives the full loss, and each rank's
autograd sees exactly its own tokens' share. Callers attach the result with
``MoEAuxLossAutoScaler`` and log it with ``reduce_group`` so the tracker sums the parts.

Each loss takes two sets of counts: ``counts`` (over ``reduce_group``, the tokens whose
probabilities this rank sums: they normalise ``P``) and ``load`` (the load fractions ``f``).
They are the same object by default; with global-batch statistics ``load`` holds the counts
all-reduced over the data-parallel group and averaged over the step's micro-batches
(:class:`GlobalBatchCounts`), as Megatron's ``global_aux_loss`` does.

Shape suffixes (``_TE``, ``_TG``, ...): see :mod:`megatron_mohge.routing`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_mohge.routing.functional import GroupIndex, segment_logsumexp


def global_sum(x: torch.Tensor, group) -> torch.Tensor:
    """Sum a (non-differentiable) count tensor over ``group``."""
    x = x.detach().clone()
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(x, group=group)
    return x


@dataclass
class TokenCounts:
    """Global routing counts a loss needs (no gradient)."""

    num_tokens: torch.Tensor  # scalar: valid tokens over the reduce group
    tokens_per_group_G: torch.Tensor  # tokens whose selected groups S include g
    tokens_per_expert_E: torch.Tensor  # tokens routed to each expert (canonical order)
    # tokens with at least one of their K experts in group g (a subset of the selections)
    tokens_using_group_G: Optional[torch.Tensor] = None

    def pack(self) -> torch.Tensor:
        """One flat vector (one all-reduce): tokens, per group, per expert[, used per group]."""
        parts = [self.num_tokens.reshape(1), self.tokens_per_group_G, self.tokens_per_expert_E]
        if self.tokens_using_group_G is not None:
            parts.append(self.tokens_using_group_G)
        return torch.cat(parts)

    @classmethod
    def unpack(cls, packed: torch.Tensor, num_groups: int, with_used: bool) -> "TokenCounts":
        g = num_groups
        end = packed.numel() - g if with_used else packed.numel()
        return cls(packed[0], packed[1:1 + g], packed[1 + g:end],
                   packed[end:] if with_used else None)

    def scaled(self, factor: float) -> "TokenCounts":
        return TokenCounts.unpack(self.pack() * factor, self.tokens_per_group_G.numel(),
                                  self.tokens_using_group_G is not None)

    def assignments_per_group(self, index: GroupIndex) -> torch.Tensor:
        """Token-expert assignments per group (what the group's experts compute), [G]."""
        return torch.zeros_like(self.tokens_per_group_G).index_add_(
            0, index.group_of_expert_E.to(self.tokens_per_expert_E.device),
            self.tokens_per_expert_E)


def count_tokens(group_mask_TG: torch.Tensor, routing_map_TE: torch.Tensor,
                 keep_T1: Optional[torch.Tensor], reduce_group,
                 index: Optional[GroupIndex] = None) -> TokenCounts:
    """Counts of one micro-batch summed over ``reduce_group``; ``index`` given: also the
    tokens that use each group (``tokens_using_group_G``)."""
    gm = group_mask_TG.float()
    rm = routing_map_TE.float()
    # [T, G]: 1 if any pick in g (only the per_group_used loss needs it)
    used = None if index is None else index.to_padded(rm, 0.0).amax(dim=-1)
    if keep_T1 is not None:
        gm, rm = gm * keep_T1, rm * keep_T1
        used = None if used is None else used * keep_T1
        local_tokens = keep_T1.sum()
    else:
        local_tokens = torch.tensor(float(rm.shape[0]), device=rm.device)
    local = TokenCounts(local_tokens, gm.sum(0), rm.sum(0),
                        None if used is None else used.sum(0))
    return TokenCounts.unpack(global_sum(local.pack(), reduce_group), gm.shape[1],
                              with_used=used is not None)


class GlobalBatchCounts:
    """Running mean of the global (data-parallel) counts over an optimizer step's micro-batches.

    ``add`` takes one micro-batch's counts reduced over the whole TP x DP x CP group and
    returns the mean so far; ``reset`` starts the next step (called at the end of each
    optimizer step, see :func:`megatron_mohge.routing.balance.end_of_step`)."""

    def __init__(self):
        self.sum: Optional[torch.Tensor] = None
        self.steps = 0

    def add(self, counts: TokenCounts) -> TokenCounts:
        packed = counts.pack()
        self.sum = packed if self.sum is None else self.sum + packed
        self.steps += 1
        return TokenCounts.unpack(self.sum / self.steps, counts.tokens_per_group_G.numel(),
                                  with_used=counts.tokens_using_group_G is not None)

    def reset(self) -> None:
        self.sum, self.steps = None, 0


def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` where ``den > 0``, else 0. Counts averaged over micro-batches (global-batch
    statistics) can be fractional: a ``clamp_min(1)`` on them would scale small loads down."""
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny),
                       torch.zeros_like(num))


def _group_probs(u_TG: torch.Tensor, counts: TokenCounts,
                 keep_T1: Optional[torch.Tensor]) -> torch.Tensor:
    """``P_g = mean_t softmax(u_t)_g`` (dense softmax even when the gate scores with sigmoid):
    this rank's part of the global mean."""
    p_TG = torch.softmax(u_TG.float(), dim=-1)
    if keep_T1 is not None:
        p_TG = p_TG * keep_T1
    return safe_div(p_TG.sum(0), counts.num_tokens)


def group_use(load: TokenCounts, count: str, group_topk: int, topk: int,
              index: GroupIndex) -> torch.Tensor:
    """``f_g``, each group's share of use: ``selections`` -> ``n_g / (T * Kg)`` (tokens whose
    Kg picked groups include g, the released count); ``assignments`` -> ``a_g / (T * K)``
    (token-expert assignments to g's experts: what the group computes)."""
    if count == "selections":
        return safe_div(load.tokens_per_group_G, load.num_tokens * group_topk)
    if count == "assignments":
        return safe_div(load.assignments_per_group(index), load.num_tokens * topk)
    raise ValueError(f"unknown group count {count!r}")


def group_aux_loss(u_TG: torch.Tensor, counts: TokenCounts, costs_G: torch.Tensor,
                   group_topk: int, coeff: float, keep_T1: Optional[torch.Tensor],
                   load: Optional[TokenCounts] = None, *, count: str = "selections",
                   topk: Optional[int] = None,
                   index: Optional[GroupIndex] = None) -> torch.Tensor:
    """Cost-weighted group-wise loss ``a_G * Ng * sum_g c_g f_g P_g``.

    ``f_g``: :func:`group_use` (``count``), ``P_g = mean_t softmax(u_t)_g``,
    ``c_g = 1 + (W_g - W_1)/Delta``. Minimising it steers tokens towards cheap groups.
    """
    load = counts if load is None else load
    f_G = group_use(load, count, group_topk, topk, index)
    return coeff * u_TG.shape[1] * torch.sum(costs_G * f_G * _group_probs(u_TG, counts, keep_T1))


def group_balance_loss(u_TG: torch.Tensor, counts: TokenCounts, index: GroupIndex,
                       group_sizes: Sequence[int], topk: int, coeff: float,
                       keep_T1: Optional[torch.Tensor],
                       load: Optional[TokenCounts] = None) -> torch.Tensor:
    """[ours] Group balance on actual use: ``a_B * sum_g f_g P_g / t_g``.

    ``f_g = a_g / (T * K)`` (share of expert assignments in group g), ``t_g = N_g / E`` (its
    share at balance: every expert equally loaded), ``P_g = mean_t softmax(u_t)_g``. 1 at
    perfect balance, as Megatron's aux loss. Unlike the cost loss it has no schedule: it
    keeps the groups in use from the first step, so no group's experts starve early.
    """
    load = counts if load is None else load
    sizes_G = torch.tensor([float(n) for n in group_sizes], device=u_TG.device)
    t_G = sizes_G / sizes_G.sum()
    f_G = group_use(load, "assignments", 1, topk, index)
    return coeff * torch.sum(f_G * _group_probs(u_TG, counts, keep_T1) / t_G)


def intra_group_loss_paper(probs_TE: torch.Tensor, counts: TokenCounts, topk: int,
                           group_topk: int, mean_group_size: float, coeff: float,
                           keep_T1: Optional[torch.Tensor],
                           load: Optional[TokenCounts] = None) -> torch.Tensor:
    """Released intra-group loss: one Switch loss over all experts, count ``N * Kg``.

    ``a_E * (N*Kg) * sum_e f_e P_e`` with ``f_e = n_e / (T*K)`` and ``P_e = mean_t w_{t,e}``
    (the sparse final weights). For unequal group sizes ``N`` is the mean group size.
    """
    w_TE = probs_TE.float()
    if keep_T1 is not None:
        w_TE = w_TE * keep_T1
    load = counts if load is None else load
    f_E = safe_div(load.tokens_per_expert_E, load.num_tokens * topk)
    P_E = safe_div(w_TE.sum(0), counts.num_tokens)
    return coeff * (mean_group_size * group_topk) * torch.sum(f_E * P_E)


def intra_group_loss_per_group(pi_TE: torch.Tensor, group_mask_TG: torch.Tensor,
                               counts: TokenCounts, index: GroupIndex,
                               group_sizes: Sequence[int], coeff: float,
                               keep_T1: Optional[torch.Tensor],
                               load: Optional[TokenCounts] = None,
                               routing_map_TE: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[ours] Switch loss inside each group over the tokens routed to it.

    For group ``g`` with tokens ``T_g``: ``L_g = N_g * sum_i f_{g,i} P_{g,i}``, ``f_{g,i}`` =
    share of the group's expert assignments that went to expert ``i``,
    ``P_{g,i} = mean_{t in T_g} pi_{t,g,i}`` (in-group softmax). ``L = a_E * sum_g share_g *
    L_g`` with ``share_g = |T_g| / sum_h |T_h|``. Each ``L_g`` is 1 when group ``g`` is
    balanced, so ``L / a_E`` is 1 at perfect balance.

    ``T_g``: the tokens that selected ``g`` (``per_group``); with ``routing_map_TE`` given,
    only those with at least one of their K experts in ``g`` (``per_group_used``: a token
    whose picks all went elsewhere says nothing about g's experts, yet would pull their
    in-group softmax towards uniform). Needs ``counts.tokens_using_group_G`` then.
    """
    g_of_e = index.group_of_expert_E
    if routing_map_TE is None:
        member_TE = group_mask_TG[:, g_of_e].float()
        members = lambda c: c.tokens_per_group_G  # noqa: E731
    else:
        member_TE = index.to_padded(routing_map_TE.float(), 0.0).amax(dim=-1)[:, g_of_e]
        members = lambda c: c.tokens_using_group_G  # noqa: E731
    if keep_T1 is not None:
        member_TE = member_TE * keep_T1
    load = counts if load is None else load
    n_E = load.tokens_per_expert_E
    f_E = safe_div(n_E, load.assignments_per_group(index)[g_of_e])
    P_E = safe_div((pi_TE.float() * member_TE).sum(0), members(counts)[g_of_e])
    n_G = members(load)
    share_G = safe_div(n_G, n_G.sum())
    sizes_E = torch.tensor([float(group_sizes[g]) for g in g_of_e.tolist()], device=pi_TE.device)
    return coeff * torch.sum(share_G[g_of_e] * sizes_E * f_E * P_E)


def z_loss_two_level(u_TG: torch.Tensor, z_TE: torch.Tensor, index: GroupIndex, coeff: float,
                     keep_T1: Optional[torch.Tensor]) -> torch.Tensor:
    """ST-MoE z-loss for both gates: ``coeff * mean_t[lse(u_t)^2 + mean_g lse(z_{t,g})^2]``.

    The expert gate's softmax runs inside each group, so its z-loss uses the in-group
    log-partition functions.
    """
    per_token = torch.logsumexp(u_TG.float(), dim=-1).square()
    per_token = per_token + segment_logsumexp(z_TE.float(), index).square().mean(dim=-1)
    if keep_T1 is not None:
        keep = keep_T1.squeeze(-1)
        return coeff * (per_token * keep).sum() / keep.sum().clamp_min(1.0)
    return coeff * per_token.mean()


def loss_free_bias_update(bias_E: torch.Tensor, load_E: torch.Tensor, index: GroupIndex,
                          rate: float) -> torch.Tensor:
    """Loss-free balancing inside each group: ``b_e + rate * sign(mean_{i in g(e)} n_i - n_e)``.

    ``load_E``: tokens routed to each expert over the global batch (canonical order). Experts
    above their group's mean load lose bias, those below gain it; the group means are
    separate, so groups that are used more (or less) are not pushed back.
    """
    g_of_e = index.group_of_expert_E.to(load_E.device)
    load = load_E.double()
    sum_G = torch.zeros(index.num_groups, dtype=torch.float64,
                        device=load.device).index_add_(0, g_of_e, load)
    size_G = torch.zeros_like(sum_G).index_add_(0, g_of_e, torch.ones_like(load))
    err_E = sum_G[g_of_e] / size_G[g_of_e] - load
    return bias_E + rate * torch.sign(err_E).to(bias_E.dtype)
