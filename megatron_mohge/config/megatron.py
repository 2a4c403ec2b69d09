"""Megatron ``TransformerConfig`` facts: options MoHGE refuses (they assume one expert width or
Megatron's own router), the FP8 token/width alignment, and the one mapping from a run's MoE
section (MoHGE or stock) to Megatron's MoE fields and Megatron-LM arguments."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from megatron_mohge.config.errors import ConfigError


#: ``TransformerConfig`` options (megatron-core 0.19) that assume one expert width or
#: Megatron's own router; each is refused for MoHGE with the reason. A field missing on the
#: installed release reads as off.
_UNIFORM_ONLY_FIELDS = (
    ("moe_single_grouped_weight", "stores all experts in one [E, ffn, hidden] weight (one width)"),
    ("moe_single_grouped_bias", "stores all expert biases in one [E, ffn] tensor (one width)"),
    ("moe_paged_stash", "stashes one 'grouped_mlp' per layer sized from the rank's token "
                        "capacity, but MoHGE runs one grouped MLP per width"),
    ("moe_ncclep_zero_copy", "has experts write into NCCL-EP buffers, which MoHGE's "
                             "per-width expert runs do not take"),
)


def _reject_uniform_only(tc) -> None:
    """One-line ``ConfigError`` for Megatron options MoHGE experts/routers cannot honour."""
    for name, why in _UNIFORM_ONLY_FIELDS:
        if getattr(tc, name, False):
            raise ConfigError(f"TransformerConfig.{name}: {why}; MoHGE has experts of several "
                              "widths, set it to False.")
    if getattr(tc, "moe_router_load_balancing_type", None) == "quantile_balancing":
        raise ConfigError("TransformerConfig.moe_router_load_balancing_type='quantile_balancing': "
                          "Megatron's per-expert quantile bias is not MoHGE's router; use 'none' "
                          "(MoHGE attaches its own balance losses).")


#: Token/width alignment of FP8 grouped GEMMs: 32 for MXFP8 recipes, 16 for the others.
FP8_ALIGN = {"default": 16, "mxfp8": 32}


def _fp8_align(recipe: Optional[str]) -> int:
    """:data:`FP8_ALIGN` of an FP8 recipe (``TransformerConfig.fp8_recipe``)."""
    return FP8_ALIGN["mxfp8" if "mxfp8" in str(recipe or "").lower() else "default"]


# ---------------------------------------------------------------------------------------
# The MoE fields of a run: the one mapping every consumer derives from.
# ``MoHGEConfig.apply_to`` (megatron.core), ``training.model_builder.transformer_config`` (mohge-train),
# the ``--mohge-config`` argument hook (Megatron-LM's ``args``) and the flag renderer
# (``integration.flags``) all take their MoE values from the functions below.

#: Megatron-LM argument (``args``) name of a ``TransformerConfig`` field, where they differ.
ARG_NAME = {"num_moe_experts": "num_experts"}
#: Router dtype of mohge-train's routers unless a MoHGE config says otherwise
#: (``router.fp32``): softmax/top-k in fp32 whatever the model precision.
ROUTER_DTYPE = "fp32"


def shared_intermediate_size(num_shared: int, width: Optional[int]) -> Optional[int]:
    """Megatron's ``moe_shared_expert_intermediate_size``: the shared experts run as one MLP
    ``num_shared x width`` wide (``None`` without shared experts)."""
    return num_shared * width if num_shared else None


def moe_transformer_fields(cfg) -> dict[str, Any]:
    """The ``TransformerConfig`` MoE fields of a MoHGE layer (``cfg``: ``MoHGEConfig``).

    ``moe_ffn_hidden_size`` is the widest group: Megatron reads it only for uniform experts
    and its memory/FLOPs estimates. Megatron's own load-balancing loss is off (MoHGE routers
    attach their own losses).
    """
    return dict(
        num_moe_experts=cfg.num_experts,
        moe_router_topk=cfg.topk,
        moe_ffn_hidden_size=max(cfg.widths),
        moe_shared_expert_intermediate_size=shared_intermediate_size(
            cfg.num_shared_experts, cfg.shared_expert_width),
        moe_router_dtype=ROUTER_DTYPE if cfg.router.fp32 else None,
        moe_router_load_balancing_type="none",
        moe_aux_loss_coeff=0.0,
        moe_z_loss_coeff=cfg.router.z_loss_coeff,
        moe_input_jitter_eps=cfg.router.input_jitter_eps,
        moe_router_topk_scaling_factor=None,
        # Megatron's config rejects top-1 with softmax-after-top-k (zero gradient); our routers
        # never run Megatron's routing (MoHGE's K=1 weight is q_chosen, pre-normalisation).
        moe_router_pre_softmax=cfg.topk == 1,
    )


def stock_moe_transformer_fields(moe) -> dict[str, Any]:
    """The ``TransformerConfig`` MoE fields of a stock layer (``moe``: the run's ``MoEConfig``
    with ``kind: moe``): uniform experts, Megatron's aux loss with ``router: topk`` when its
    coefficient is positive (``none`` otherwise; the noisy router attaches its own losses)."""
    aux = moe.aux_loss_coeff if moe.router == "topk" else 0.0
    return dict(  # in the order the Megatron-LM flags have always been rendered
        num_moe_experts=moe.num_experts,
        moe_ffn_hidden_size=moe.expert_hidden_size,
        moe_router_topk=moe.topk,
        moe_shared_expert_intermediate_size=shared_intermediate_size(
            moe.num_shared_experts, moe.shared_expert_width),
        moe_router_load_balancing_type="aux_loss" if aux > 0 else "none",
        moe_aux_loss_coeff=aux,
        moe_z_loss_coeff=moe.z_loss_coeff,
        moe_router_dtype=ROUTER_DTYPE,
    )


def run_moe_transformer_fields(moe) -> dict[str, Any]:
    """The MoE ``TransformerConfig`` fields of a run's ``moe`` section, any kind (dense: only
    the router dtype, which no layer reads)."""
    if moe.kind == "mohge":
        return moe_transformer_fields(moe.mohge)
    if moe.kind == "stock":
        return stock_moe_transformer_fields(moe)
    return {"moe_router_dtype": ROUTER_DTYPE}


def megatron_lm_args(fields: dict[str, Any]) -> dict[str, Any]:
    """``TransformerConfig`` fields as Megatron-LM argument names (``args.<name>``)."""
    return {ARG_NAME.get(name, name): value for name, value in fields.items()}


def routed_expert_widths(moe) -> list[int]:
    """Width of every routed expert of one MoE layer of a run's ``moe`` section, canonical
    (group-major) order; ``[]`` for dense."""
    if moe.kind == "mohge":
        return list(moe.mohge.expert_widths)
    if moe.kind == "stock":
        return [moe.expert_hidden_size] * moe.num_experts
    return []


def check_megatron_layout(cfg, *, ep: int = 1, etp: int = 1, fp8: bool = False,
                          fp4: bool = False, fp8_recipe: Optional[str] = None) -> None:
    """``ConfigError`` if the MoHGE layer ``cfg`` cannot run at expert-parallel size ``ep`` and
    expert-TP size ``etp`` (with FP8/FP4 as given): the checks ``apply_to`` makes against a
    ``TransformerConfig``, on explicit values (the argument hook has no config yet)."""
    if cfg.expert_backend == "torch" and (fp8 or fp4):
        raise ConfigError("MoHGEConfig.expert_backend=torch has no FP8/FP4 path; use te (or "
                          "auto with Transformer Engine), or turn off fp8/fp4.")
    cfg.check_parallel_layout(ep, etp, fp8=fp8, fp8_align=_fp8_align(fp8_recipe))


def reject_conflicting_fields(tc) -> None:
    """``ConfigError`` for ``TransformerConfig`` options MoHGE routers/experts cannot honour."""
    _reject_uniform_only(tc)
    if getattr(tc, "moe_router_enable_expert_bias", False):
        raise ConfigError(
            "TransformerConfig.moe_router_enable_expert_bias: aux-loss-free expert bias is not "
            "supported by MoHGE routers; disable it (MoHGE balances with its own losses).")
    if getattr(tc, "moe_expert_capacity_factor", None) is not None:
        raise ConfigError(
            "TransformerConfig.moe_expert_capacity_factor: MoHGE routing is dropless (every "
            "token gets exactly K experts); set it to None.")
    if getattr(tc, "moe_router_num_groups", None) or getattr(tc, "moe_router_group_topk", None):
        raise ConfigError(
            "TransformerConfig.moe_router_num_groups/moe_router_group_topk: Megatron's "
            "device-limited routing conflicts with MoHGE's group gate; leave them unset and use "
            "MoHGEConfig.group_topk.")
    if getattr(tc, "moe_latent_size", None):
        raise ConfigError("TransformerConfig.moe_latent_size: MoE latent projections are not "
                          "supported with MoHGE experts; leave it unset.")


def apply_moe_fields(cfg, tc):
    """``MoHGEConfig.apply_to``: refuse conflicting options, check the layout ``tc`` implies,
    and return ``tc`` with :func:`moe_transformer_fields`."""
    reject_conflicting_fields(tc)
    ep = int(getattr(tc, "expert_model_parallel_size", 1) or 1)
    etp = getattr(tc, "expert_tensor_parallel_size", None)
    etp = int(etp if etp is not None else getattr(tc, "tensor_model_parallel_size", 1))
    check_megatron_layout(cfg, ep=ep, etp=etp, fp8=bool(getattr(tc, "fp8", None)),
                          fp4=bool(getattr(tc, "fp4", None)),
                          fp8_recipe=getattr(tc, "fp8_recipe", None))
    return dataclasses.replace(tc, **moe_transformer_fields(cfg))
