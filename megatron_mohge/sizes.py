"""Sizes of experts and groups: the parameter count of one FFN / expert (a leaf module: the
one place this formula lives) and the groups' offsets in the canonical expert order.

A Megatron MLP of width ``W`` on hidden size ``h`` has fc1 ``h x (2W | W)`` (gated: the
gate and up projections fused) and fc2 ``W x h``; with ``add_bias_linear`` fc1 has a bias of
``2W | W`` and fc2 one of ``h``. So ``params(W) = per_width * W + per_expert``.
"""

from __future__ import annotations


def ffn_matrices(gated: bool) -> int:
    """``h x W`` weight matrices of one FFN of width ``W``: gate + up + down (3) or up + down
    (2); also the GEMM count per token, hence FLOPs ``2 x ffn_matrices x h x W`` forward."""
    return 3 if gated else 2


def ffn_param_coeffs(hidden: int, gated: bool, bias: bool) -> tuple[int, int]:
    """``(per_width, per_expert)`` with ``params(W) = per_width * W + per_expert``."""
    per_width = hidden * ffn_matrices(gated) + ((2 if gated else 1) if bias else 0)
    return per_width, (hidden if bias else 0)


def ffn_params(hidden: int, width: int, gated: bool, bias: bool, etp: int = 1) -> int:
    """Weights (+ biases) of one FFN / expert of ``width``; with ``etp > 1`` the share of one
    expert-tensor-parallel rank (fc1 columns and fc2 rows split ``etp`` ways, fc2's bias
    replicated). For ``etp = 1`` this is ``per_width * width + per_expert``."""
    up = (2 * width if gated else width) // etp
    return hidden * up + (width // etp) * hidden + ((up + hidden) if bias else 0)


def group_offsets(experts_per_group) -> list[int]:
    """Exclusive prefix sums of the group sizes: canonical id of each group's first expert."""
    offsets, total = [], 0
    for n in experts_per_group:
        offsets.append(total)
        total += n
    return offsets
