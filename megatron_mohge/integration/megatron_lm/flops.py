"""The FLOPs correction: Megatron-LM's ``num_floating_point_operations`` for MoHGE widths.

Megatron counts the routed experts of each MoE layer as ``moe_router_topk`` experts of
``moe_ffn_hidden_size`` (the widest group for MoHGE): throughput and MFU would be overstated.
The correction replaces that routed term with the activated routed width
(:func:`activated_routed_width`) and is added to Megatron's figure -- by the patch inside
``num_floating_point_operations``, or by the launcher's wrapper around it (``hooks``).

Tokens: core_v0.16 counts ``batch_size x seq_length``; from core_v0.19 Megatron passes
``total_real_tokens_in_batch`` for packed (THD) batches (padding excluded), and so do we.
"""

from __future__ import annotations

from typing import Callable, Optional

from megatron_mohge.config import MoHGEConfig
from megatron_mohge.integration.megatron_lm.args import mohge_config_from_args
from megatron_mohge.sizes import ffn_matrices


def activated_routed_width(args, cfg: MoHGEConfig) -> float:
    """Summed width of the ``K`` routed experts per token used for FLOPs
    (``--mohge-flops-expectation`` / ``--mohge-flops-routed-width``)."""
    measured = getattr(args, "mohge_flops_routed_width", None)
    if measured:
        return cfg.topk * float(measured)
    from megatron_mohge.accounting import activated_widths

    which = getattr(args, "mohge_flops_expectation", None) or "uniform"
    return float(getattr(activated_widths(cfg), which))


def is_hybrid(args) -> bool:
    """A hybrid-model run: core_v0.19 tests ``args.hybrid_layer_pattern`` (HybridModel, which
    our launchers build with MoHGE ``E`` layers); core_v0.16 sets ``args.is_hybrid_model``
    (``pretrain_mamba.py``'s MambaModel, which they do not drive)."""
    return bool(getattr(args, "is_hybrid_model", False)
                or getattr(args, "hybrid_layer_pattern", None) is not None)


def moe_layer_count(args) -> int:
    """MoE layers as Megatron's FLOPs formula counts them: a hybrid model's ``E`` layers of
    the main pattern (its formula counts MTP layers in the logits only); a GPT's MoE layers,
    MTP layers included when the last layer is MoE."""
    pattern = getattr(args, "hybrid_layer_pattern", None)
    if pattern:
        return pattern.split("/")[0].count("E")
    freq, n = getattr(args, "moe_layer_freq", 1), args.num_layers
    pattern = [1 if i % freq == 0 else 0 for i in range(n)] if isinstance(freq, int) else list(freq)
    count = sum(pattern)
    mtp = getattr(args, "mtp_num_layers", None)
    if mtp and pattern and pattern[-1]:
        count += mtp  # Megatron counts MTP layers as MoE when the last layer is
    return count


def mohge_flops_correction(args, batch_size: int, mohge_cfg: Optional[MoHGEConfig] = None,
                           total_real_tokens_in_batch: Optional[float] = None) -> float:
    """What to add to Megatron-LM's ``num_floating_point_operations`` for heterogeneous widths.

    Same conventions as Megatron: 3 GEMM passes (fwd, wgrad, dgrad) x 2 FLOPs per MAC x
    (3 gated | 2) GEMM halves, over ``total_real_tokens_in_batch`` tokens (default
    ``batch_size x seq_length``, Megatron's own default).
    """
    cfg = mohge_cfg or mohge_config_from_args(args)
    if cfg is None or (is_hybrid(args) and not getattr(args, "hybrid_layer_pattern", None)):
        return 0.0  # core_v0.16's MambaModel: no MoHGE layers in it
    tokens = (batch_size * args.seq_length if total_real_tokens_in_batch is None
              else total_real_tokens_in_batch)
    stock_width = args.moe_ffn_hidden_size if args.moe_ffn_hidden_size is not None \
        else args.ffn_hidden_size
    ffn_factor = ffn_matrices(getattr(args, "swiglu", False))
    delta = activated_routed_width(args, cfg) - stock_width * args.moe_router_topk
    return 3 * 2 * tokens * args.hidden_size * ffn_factor * moe_layer_count(args) * delta


def mohge_num_floating_point_operations(args, batch_size: int,
                                        mohge_cfg: Optional[MoHGEConfig] = None,
                                        stock: Optional[Callable] = None, **kw) -> float:
    """Megatron-LM's FLOPs of one global batch, corrected for MoHGE widths.

    ``stock`` is Megatron's ``num_floating_point_operations`` (default: the one in
    ``megatron.training.training``, before ``hooks.install_megatron_lm_hooks``); ``kw`` are its
    core_v0.19 token-count arguments. A patched checkout already adds the correction, so its
    function is returned as is.
    """
    if stock is None:
        import megatron.training.training as T

        if getattr(T, "MOHGE_PATCH", None):
            return T.num_floating_point_operations(args, batch_size, **kw)
        fn = T.num_floating_point_operations
        stock = getattr(fn, "__mohge_stock__", fn)
    return stock(args, batch_size, **kw) + mohge_flops_correction(
        args, batch_size, mohge_cfg, kw.get("total_real_tokens_in_batch"))
