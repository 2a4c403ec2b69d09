"""Megatron-LM core_v0.18+ (and the 0.19 wheels' ``megatron.training``): a hybrid model.

``pretrain()`` builds ``cfg_container.model`` with its config's builder; for a hybrid pattern
(``--hybrid-layer-pattern``) that is Megatron's own ``HybridModelConfig`` /
``HybridModelBuilder``, unchanged: ``HybridModelConfig.hybrid_stack_spec`` is settable, so our
one delta is the stack spec (MoHGE ``E`` layers with ``--mohge-config``, else the stock
``MoELayer`` with a counting router; the local variant where TE is not used).

core_v0.16/0.17 (``pretrain(provider, model_provider, ...)``) is refused in one line by the
callers (:func:`require_config_container`): their hybrid model is ``MambaModel`` built by
``pretrain_mamba.py``'s provider, which our launcher does not drive.
"""

from __future__ import annotations

from megatron_mohge.integration.megatron_lm.args import finalize_mohge_args
from megatron_mohge.integration.megatron_lm.gpt_builder import refuse_conflicting_args, use_te_for


def is_hybrid_args(args) -> bool:
    """Whether parsed Megatron-LM ``args`` describe a hybrid model (a layer pattern given)."""
    return bool(getattr(args, "hybrid_layer_pattern", None))


def hybrid_model_config(args):
    """``hybrid_config_from_args(args)`` (Megatron's ``HybridModelConfig``) with our stack spec;
    for ``--mohge-config`` its ``TransformerConfig`` passes through ``MoHGEConfig.apply_to``."""
    import torch
    from megatron.training.argument_utils import hybrid_config_from_args

    from megatron_mohge.hybrid_specs import (check_pattern_runs_here,
                                             get_mohge_hybrid_stack_spec,
                                             get_stock_hybrid_stack_spec)

    mohge = finalize_mohge_args(args)  # None without --mohge-config (stock MoE or dense)
    if mohge is not None:
        refuse_conflicting_args(args)
    cfg = hybrid_config_from_args(args)
    use_te = use_te_for(cfg.transformer.transformer_impl)
    check_pattern_runs_here(args.hybrid_layer_pattern, use_te, torch.cuda.is_available())
    if mohge is not None:
        cfg.transformer = mohge.apply_to(cfg.transformer)
        cfg.hybrid_stack_spec = get_mohge_hybrid_stack_spec(mohge, use_te)
    else:
        cfg.hybrid_stack_spec = get_stock_hybrid_stack_spec(cfg.transformer.num_moe_experts,
                                                            use_te)
    return cfg
