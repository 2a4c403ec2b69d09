"""End-of-step balancing: loss-free bias updates and global-batch figures, once per step.

Megatron-Core updates its own expert bias inside ``finalize_model_grads`` (after the
gradient all-reduce, before the optimizer step). Its bias cannot serve MoHGE: it needs
sigmoid scores and stacks every router's bias, so all MoE layers must have equally long
bias vectors (NVIDIA/Megatron-LM#5573). We hook the same place instead:
:func:`wrap_finalize_model_grads` wraps Megatron's function so that, after it, every
router's local step counts (all micro-batches of the step) are summed over the stage's
TP x DP x CP group in **one** all-reduce, then each router updates its bias
(``MoHGERouter.end_step``), the counters record the global-batch MaxVio, and the step
counters restart. ``mohge-train`` installs it through ``training.mcore_plumbing``, the Megatron-LM
launcher through ``integration``; a custom loop calls :func:`end_of_step` after its
backward passes, on every rank.

Shape suffixes (``_TE``, ``_TG``, ...): see :mod:`megatron_mohge.routing`.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.distributed as dist

from megatron_mohge.routing.base import find_routers


@torch.no_grad()
def end_of_step(model) -> None:
    """Collective over the stage's TP x DP x CP group (call on every rank once per step)."""
    rs = find_routers(model)
    if not rs:  # a pipeline stage without MoE layers (same on all ranks of its group)
        return
    local = torch.cat([r.counter.step_tokens_per_expert_E for r in rs])
    group = rs[0].tp_dp_cp_group  # TopKRouter's, on every supported line
    if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(local, group=group)
    for r, load_E in zip(rs, torch.split(local, [r.counter.step_tokens_per_expert_E.numel()
                                                 for r in rs])):
        r.counter.add_batch(load_E)
        r.end_step(load_E)
        r.counter.reset_step()


def wrap_finalize_model_grads(finalize: Callable) -> Callable:
    """``finalize`` (Megatron's ``finalize_model_grads(model, ...)``) followed by
    :func:`end_of_step` on the same model chunks. Idempotent: wrapping twice is a no-op."""
    if getattr(finalize, "_mohge_end_of_step", False):
        return finalize

    @functools.wraps(finalize)
    def finalize_and_balance(model, *args, **kwargs):
        out = finalize(model, *args, **kwargs)
        end_of_step(model)
        return out

    finalize_and_balance._mohge_end_of_step = True
    return finalize_and_balance
