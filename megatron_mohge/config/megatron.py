"""Megatron ``TransformerConfig`` facts the MoHGE layer checks against: options that assume
one expert width or Megatron's own router, and the FP8 token/width alignment."""

from __future__ import annotations

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


def _fp8_align(tc) -> int:
    """:data:`FP8_ALIGN` of ``tc``'s FP8 recipe."""
    recipe = str(getattr(tc, "fp8_recipe", "") or "")
    return FP8_ALIGN["mxfp8" if "mxfp8" in recipe.lower() else "default"]
