"""Routers: the MoHGE two-level router and the sparsely-gated (noisy top-k) routers.

Tensor names end in a shape suffix, one letter per dimension (``z_TE`` is ``[T, E]``). The
legend, for every module of the package (stated here only):

======  ==============================================================================
suffix  dimension
======  ==============================================================================
T       tokens of this rank (sequence x micro-batch, flattened)
D       hidden size
G       expert groups
E       experts, in canonical (group-major) order
K       experts chosen per token
N       experts of one group (padded to the largest group, Nmax, in ``_GN`` / ``_TGN``)
W       expert width (FFN hidden size)
1       a singleton dimension (``keep_T1``: 1 for a real token, 0 for padding)
L       MoE layers (per-layer figures)
B       micro-batch (where a tensor keeps it apart from the sequence: ``mask_BS``)
S       sequence positions
======  ==============================================================================
"""

from megatron_mohge.routing.base import GroupedExpertRouter, find_routers, set_training_progress
from megatron_mohge.routing.mohge_router import (
    GROUP_BALANCE_LOSS_NAME,
    GROUP_LOSS_NAME,
    INTRA_GROUP_LOSS_NAME,
    MoHGERouter,
)
from megatron_mohge.routing.stock import CountedTopKRouter

__all__ = ["CountedTopKRouter", "GroupedExpertRouter", "MoHGERouter", "find_routers",
           "set_training_progress", "GROUP_BALANCE_LOSS_NAME", "GROUP_LOSS_NAME",
           "INTRA_GROUP_LOSS_NAME"]
