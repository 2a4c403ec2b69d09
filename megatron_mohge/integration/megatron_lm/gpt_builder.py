"""The MoHGE GPT model for Megatron-LM: decoder spec, MTP block, and the core_v0.16 builder.

Megatron-LM builds the GPT model in one of two ways, and MoHGE plugs into both:

* up to core_v0.17 ``pretrain_gpt.py`` passes ``partial(model_provider, gpt_builder)``:
  :func:`mohge_gpt_builder` is a drop-in for ``gpt_builders.gpt_builder`` (same signature);
* from core_v0.18 the model comes from a ``GPTModelConfig`` and its ``GPTModelBuilder``
  (``gpt_config``). Its ``transformer_layer_spec`` may be a callable ``(cfg, vp_stage=)``:
  :func:`mohge_decoder_spec` is one, enough for a model without multi-token prediction.

Why MTP needs more than a spec: Megatron builds the MTP layer from the *last decoder layer of
its stock spec* (``get_gpt_decoder_layer_specs(...)[-1]``), which for an MoE model is a uniform
``moe_ffn_hidden_size`` MoE layer -- a silently different model. :func:`mohge_mtp_block_spec`
builds it from the MoHGE layer instead; the callable spec refuses MTP rather than let Megatron's
builder do the wrong thing.
"""

from __future__ import annotations

import warnings
from typing import Optional

from megatron_mohge.config import ConfigError, MoHGEConfig
from megatron_mohge.integration.megatron_lm.args import finalize_mohge_args

#: Megatron-LM arguments that pick another decoder spec: each conflicts with --mohge-config.
CONFLICTING_ARGS = (("use_legacy_models", "--use-legacy-models"), ("spec", "--spec"),
                    ("yaml_cfg", "--yaml-cfg"),
                    ("heterogeneous_layers_config_path", "--heterogeneous-layers-config-path"),
                    ("experimental_attention_variant", "--experimental-attention-variant"),
                    ("modelopt_enabled", "ModelOpt (--export-*/--restore-modelopt-state...)"))


def use_te_for(transformer_impl: Optional[str]) -> bool:
    """Transformer Engine layers for ``transformer_impl == "transformer_engine"`` when TE is
    usable (TE + a GPU); otherwise the local (torch) layers, with a warning if TE was asked for."""
    if transformer_impl != "transformer_engine":
        return False
    from megatron_mohge.specs import te_available

    if te_available():
        return True
    warnings.warn("megatron-mohge: --transformer-impl transformer_engine but Transformer Engine "
                  "is not usable here; building the local (torch) layers instead.", stacklevel=3)
    return False


def use_te_from_args(args) -> bool:
    """:func:`use_te_for` of ``args.transformer_impl``."""
    return use_te_for(getattr(args, "transformer_impl", "local"))


def refuse_conflicting_args(args) -> None:
    """A clear error for Megatron-LM options that choose another decoder spec."""
    for name, what in CONFLICTING_ARGS:
        if getattr(args, name, None):
            raise ConfigError(f"{what} cannot be combined with --mohge-config (the MoHGE builder "
                              "makes the decoder spec itself).")


# ====================================================================== specs
def mohge_block_spec(tc, mohge_cfg: MoHGEConfig, use_te: bool, vp_stage: Optional[int] = None):
    """The pipeline-stage decoder block spec (``--moe-layer-freq``, PP/VPP slicing)."""
    from megatron_mohge.specs import get_mohge_decoder_block_spec

    return get_mohge_decoder_block_spec(tc, mohge_cfg, use_te=use_te, vp_stage=vp_stage)


def mohge_mtp_block_spec(tc, mohge_cfg: MoHGEConfig, use_te: bool,
                         vp_stage: Optional[int] = None):
    """Multi-token prediction block whose layer is the decoder's last layer (MoHGE if MoE);
    ``None`` without ``tc.mtp_num_layers``. Same rule as Megatron's builders, MoHGE layer."""
    if not getattr(tc, "mtp_num_layers", None):
        return None
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_layer_specs,
        get_gpt_mtp_block_spec,
    )

    from megatron_mohge.specs import get_mohge_moe_module_spec, is_moe_layer, replace_moe_mlp

    last = get_gpt_decoder_layer_specs(tc, use_transformer_engine=use_te,
                                       normalization=tc.normalization, vp_stage=vp_stage)[-1]
    if is_moe_layer(last):
        last = replace_moe_mlp(last, get_mohge_moe_module_spec(mohge_cfg, use_te))
    return get_gpt_mtp_block_spec(tc, last, use_transformer_engine=use_te, vp_stage=vp_stage)


def mohge_decoder_spec(config, vp_stage: Optional[int] = None):
    """``GPTModelConfig.transformer_layer_spec`` callable (core_v0.18+): the MoHGE decoder block.

    ``config`` is the ``GPTModelConfig``; the MoHGE config is its ``mohge`` field
    (``MoHGEGPTModelConfig``) or, for a stock ``GPTModelConfig`` (``pretrain_gpt.py --spec
    megatron_mohge.integration.megatron_lm.gpt_builder mohge_decoder_spec`` in a patched checkout),
    ``--mohge-config``. Refuses multi-token prediction: Megatron's ``GPTModelBuilder`` would
    build the MTP layer from its stock uniform-expert spec (use ``MoHGEGPTModelBuilder``).
    """
    mohge_cfg = getattr(config, "mohge", None)
    if mohge_cfg is None:
        from megatron.training import get_args

        mohge_cfg = finalize_mohge_args(get_args())
        if mohge_cfg is None:
            raise ConfigError("mohge_decoder_spec: no MoHGE config (pass --mohge-config, or use "
                              "MoHGEGPTModelConfig from megatron_mohge.integration.megatron_lm)")
        if getattr(config, "mtp_num_layers", None):
            raise ConfigError(
                "--mtp-num-layers with the callable MoHGE --spec: Megatron's GPTModelBuilder "
                "builds the MTP layer from its stock (uniform-expert) decoder spec. Use "
                "examples/pretrain_mohge.py or the patched pretrain_gpt.py --mohge-config, whose "
                "MoHGEGPTModelBuilder builds a MoHGE MTP layer.")
    tc = config.transformer
    mohge_cfg.check_transformer_config(tc)
    return mohge_block_spec(tc, mohge_cfg, use_te_for(tc.transformer_impl), vp_stage)


# ====================================================================== core_v0.16 builder
def gpt_model_kwargs_from_args(args) -> dict:
    """The ``GPTModel`` arguments Megatron-LM's ``gpt_builder`` takes from ``args``."""
    return dict(
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        fp16_lm_cross_entropy=getattr(args, "fp16_lm_cross_entropy", False),
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=getattr(args, "rotary_percent", 1.0),
        rotary_base=getattr(args, "rotary_base", 10000),
        rope_scaling=getattr(args, "use_rope_scaling", False),
    )


def build_mohge_gpt_model(args, config, mohge_cfg: MoHGEConfig, pre_process: bool = True,
                          post_process: bool = True, vp_stage: Optional[int] = None,
                          pg_collection=None, use_te: Optional[bool] = None):
    """A megatron.core ``GPTModel`` whose MoE layers are MoHGE layers (megatron.core only).

    ``config`` is the ``TransformerConfig`` from the arguments (Megatron-LM's
    ``core_transformer_config_from_args``); ``args`` supplies the ``GPTModel`` arguments
    Megatron-LM's ``gpt_builder`` passes (vocabulary, positions, embeddings tying...). The
    decoder spec honours ``moe_layer_freq`` and pipeline / virtual-pipeline slicing.
    """
    from megatron.core.models.gpt import GPTModel

    tc = mohge_cfg.apply_to(config)
    if use_te is None:
        use_te = use_te_from_args(args)
    if getattr(args, "mtp_num_layers", None) and not tc.mtp_num_layers:
        raise ConfigError(f"--mtp-num-layers={args.mtp_num_layers} but the TransformerConfig has "
                          "mtp_num_layers unset; build it with core_transformer_config_from_args")
    return GPTModel(
        config=tc,
        transformer_layer_spec=mohge_block_spec(tc, mohge_cfg, use_te, vp_stage),
        mtp_block_spec=mohge_mtp_block_spec(tc, mohge_cfg, use_te, vp_stage),
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
        **gpt_model_kwargs_from_args(args),
    )


def mohge_gpt_builder(args, pre_process, post_process, vp_stage=None, config=None,
                      pg_collection=None):
    """Drop-in for Megatron-LM's ``gpt_builders.gpt_builder`` (same signature, every tag)."""
    cfg = finalize_mohge_args(args)
    if cfg is None:
        raise ConfigError("mohge_gpt_builder: --mohge-config is required (a MoHGE layer YAML or "
                          "a run YAML with moe.kind: mohge).")
    refuse_conflicting_args(args)
    if config is None:
        from megatron.training.arguments import core_transformer_config_from_args

        config = core_transformer_config_from_args(args)
    print_rank_0(f"building MoHGE GPT model ({cfg.num_groups} groups x "
                 f"{cfg.experts_per_group} experts, widths {cfg.widths}, Kg={cfg.group_topk}, "
                 f"K={cfg.topk}) ...")
    return build_mohge_gpt_model(args, config, cfg, pre_process, post_process, vp_stage,
                                 pg_collection)


def print_rank_0(msg: str) -> None:
    try:
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_rank() != 0:
            return
    except ImportError:
        pass
    print(msg, flush=True)
