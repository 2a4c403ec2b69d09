"""Megatron-LM core_v0.18+: the MoHGE ``GPTModelConfig`` and its builder.

From core_v0.18 ``pretrain()`` builds the model from ``cfg_container.model`` through the
config's ``builder`` (``GPTModelBuilder`` for GPT). ``MoHGEGPTModelConfig`` is Megatron's
``GPTModelConfig`` plus the MoHGE layer config, with :func:`model.mohge_decoder_spec` as its
``transformer_layer_spec``; ``MoHGEGPTModelBuilder`` differs from ``GPTModelBuilder`` in one
place: the MTP block is built from the MoHGE layer (``model.mohge_mtp_block_spec``), not from
Megatron's stock decoder spec.

Imports ``megatron.training`` at import time: only for Megatron-LM checkouts at core_v0.18+.
"""

from dataclasses import dataclass
from typing import ClassVar, Optional

from megatron.core.models.gpt import GPTModel
from megatron.core.pipeline_parallel.utils import (
    is_pp_first_stage,
    is_pp_last_stage,
    is_vp_first_stage,
    is_vp_last_stage,
)
from megatron.training.models.gpt import GPTModelBuilder, GPTModelConfig
from megatron.training.vocab_utils import calculate_padded_vocab_size

from megatron_mohge.config import ConfigError, MoHGEConfig
from megatron_mohge.integration.megatron_lm.args import finalize_mohge_args
from megatron_mohge.integration.megatron_lm.gpt_builder import (
    mohge_block_spec,
    mohge_decoder_spec,
    mohge_mtp_block_spec,
    refuse_conflicting_args,
    use_te_for,
)

BUILDER_PATH = "megatron_mohge.integration.megatron_lm.gpt_config.MoHGEGPTModelBuilder"


@dataclass(kw_only=True)
class MoHGEGPTModelConfig(GPTModelConfig):
    """``GPTModelConfig`` whose MoE layers (and MTP layer) are MoHGE layers."""

    builder: ClassVar[str] = BUILDER_PATH
    #: The MoHGE layer; ``transformer`` must come from ``mohge.apply_to(...)``.
    mohge: Optional[MoHGEConfig] = None

    def finalize(self) -> None:
        if self.mohge is None:
            raise ConfigError("MoHGEGPTModelConfig.mohge: a MoHGEConfig is required")
        self.mohge.check_transformer_config(self.transformer)
        super().finalize()


class MoHGEGPTModelBuilder(GPTModelBuilder):
    """``GPTModelBuilder`` with MoHGE decoder and MTP layers (core_v0.19.0's ``build_model``
    otherwise: same ``GPTModel`` arguments, same pre/post-process rule)."""

    def build_model(self, pg_collection, pre_process: Optional[bool] = None,
                    post_process: Optional[bool] = None, vp_stage: Optional[int] = None):
        mc = self._model_config
        tc, mohge = mc.transformer, mc.mohge
        if mohge is None:
            raise ConfigError("MoHGEGPTModelBuilder needs a MoHGEGPTModelConfig with .mohge set")
        use_te = use_te_for(tc.transformer_impl)
        if mc.transformer_layer_spec not in (None, mohge_decoder_spec):
            raise ConfigError("MoHGEGPTModelConfig.transformer_layer_spec: leave it unset (the "
                              "MoHGE builder makes the decoder spec itself)")
        spec = mohge_block_spec(tc, mohge, use_te, vp_stage)
        assert mc.vocab_size is not None, "vocab_size must be configured before build_model()"
        vocab = (calculate_padded_vocab_size(mc.vocab_size, mc.make_vocab_size_divisible_by,
                                             tc.tensor_model_parallel_size)
                 if mc.should_pad_vocab else mc.vocab_size)
        vp_size = tc.virtual_pipeline_model_parallel_size
        if pre_process is None:
            pre_process = (is_vp_first_stage(vp_stage=vp_stage, vp_size=vp_size)
                           and is_pp_first_stage(pg_collection.pp))
        if post_process is None:
            post_process = (is_vp_last_stage(vp_stage=vp_stage, vp_size=vp_size)
                            and is_pp_last_stage(pg_collection.pp))
        return GPTModel(
            config=tc,
            transformer_layer_spec=spec,
            mtp_block_spec=mohge_mtp_block_spec(tc, mohge, use_te, vp_stage),
            vocab_size=vocab,
            max_sequence_length=mc.seq_length,
            fp16_lm_cross_entropy=mc.fp16_lm_cross_entropy,
            parallel_output=mc.parallel_output,
            share_embeddings_and_output_weights=mc.share_embeddings_and_output_weights,
            position_embedding_type=mc.position_embedding_type,
            rotary_percent=mc.rotary_percent,
            rotary_base=mc.rotary_base,
            rope_scaling=mc.rope_scaling,
            rope_scaling_factor=mc.rope_scaling_factor,
            seq_len_interpolation_factor=mc.seq_len_interpolation_factor,
            scatter_embedding_sequence_parallel=mc.scatter_embedding_sequence_parallel,
            pre_process=pre_process,
            post_process=post_process,
            pg_collection=pg_collection,
            vp_stage=vp_stage,
        )


def mohge_gpt_model_config(args, config=None) -> MoHGEGPTModelConfig:
    """``pretrain_gpt.py``'s ``gpt_config_from_args(args)`` for a MoHGE run (after
    ``parse_and_validate_args``): checks and mirrors the MoE arguments first, so the
    ``TransformerConfig`` Megatron derives from them is the one MoHGE builds."""
    from megatron.training.argument_utils import gpt_config_from_args

    mohge = finalize_mohge_args(args)
    if mohge is None:
        raise ConfigError("mohge_gpt_model_config: --mohge-config is required (a MoHGE layer "
                          "YAML or a run YAML with moe.kind: mohge).")
    refuse_conflicting_args(args)
    model_cfg = gpt_config_from_args(args, config=config, model_config_cls=MoHGEGPTModelConfig)
    model_cfg.transformer = mohge.apply_to(model_cfg.transformer)
    model_cfg.mohge = mohge
    model_cfg.transformer_layer_spec = mohge_decoder_spec
    return model_cfg
