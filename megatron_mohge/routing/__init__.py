"""Routers: the MoHGE two-level router and the sparsely-gated (noisy top-k) routers."""

from megatron_mohge.routing.base import GroupedExpertRouter, set_training_progress
from megatron_mohge.routing.mohge_router import (
    GROUP_LOSS_NAME,
    INTRA_GROUP_LOSS_NAME,
    MoHGERouter,
)

__all__ = ["GroupedExpertRouter", "MoHGERouter", "set_training_progress", "GROUP_LOSS_NAME",
           "INTRA_GROUP_LOSS_NAME"]
