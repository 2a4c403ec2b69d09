"""MoHGE in Megatron-LM's ``pretrain_gpt.py`` (tags core_v0.16.1 and core_v0.19.0).

One module per job:

* :mod:`.args` -- ``--mohge-config`` and its overrides (``extra_args_provider``), the MoE
  arguments it implies, their check (:func:`finalize_mohge_args`);
* :mod:`.gpt_builder` -- the MoHGE decoder / MTP specs, the callable ``transformer_layer_spec``
  (:func:`mohge_decoder_spec`) and the core_v0.16 builder (:func:`mohge_gpt_builder`);
  :mod:`.gpt_config` -- core_v0.18+'s ``MoHGEGPTModelConfig`` / ``MoHGEGPTModelBuilder``
  (imports ``megatron.training``, so it is not imported here);
* :mod:`.hooks` -- training progress for the loss schedules, aux-loss names reduced in the
  log, the run-time hooks of the unpatched launcher;
* :mod:`.flops` -- the heterogeneous-width FLOPs correction;
* :mod:`.launcher` -- ``examples/pretrain_mohge.py`` for both ``pretrain()`` styles.

Two ways in: ``examples/pretrain_mohge.py`` (no patch; :func:`run_pretrain`) and
``patches/megatron-lm-<tag>.patch`` (stock ``pretrain_gpt.py --mohge-config x.yaml``; the
patch calls only names exported here). Nothing here imports torch, megatron.core or
megatron.training at import time.
"""

from megatron_mohge.integration.megatron_lm.args import (
    ARG_GROUP_TITLE,
    CLI_OVERRIDES,
    FLOPS_EXPECTATIONS,
    add_mohge_args,
    compose_extra_args_providers,
    finalize_mohge_args,
    load_mohge_config,
    megatron_moe_args,
    mohge_config_from_args,
)
from megatron_mohge.integration.megatron_lm.flops import (
    activated_routed_width,
    mohge_flops_correction,
    mohge_num_floating_point_operations,
)
from megatron_mohge.integration.megatron_lm.hooks import (
    MEGATRON_LB_LOSS_NAMES,
    install_megatron_lm_hooks,
    mohge_aux_loss_names,
    mohge_forward_step,
    mohge_track_names,
    update_training_progress,
)
from megatron_mohge.integration.megatron_lm.launcher import (
    add_megatron_lm_to_path,
    pretrain_cfg_container,
    run_pretrain,
)
from megatron_mohge.integration.megatron_lm.gpt_builder import (
    build_mohge_gpt_model,
    mohge_decoder_spec,
    mohge_gpt_builder,
    mohge_mtp_block_spec,
    use_te_from_args,
)

__all__ = [
    "ARG_GROUP_TITLE", "CLI_OVERRIDES", "FLOPS_EXPECTATIONS", "MEGATRON_LB_LOSS_NAMES",
    "activated_routed_width", "add_megatron_lm_to_path", "add_mohge_args",
    "build_mohge_gpt_model", "compose_extra_args_providers", "finalize_mohge_args",
    "install_megatron_lm_hooks", "load_mohge_config", "megatron_moe_args",
    "mohge_aux_loss_names", "mohge_config_from_args", "mohge_decoder_spec",
    "mohge_flops_correction", "mohge_forward_step", "mohge_gpt_builder", "mohge_mtp_block_spec",
    "mohge_num_floating_point_operations", "mohge_track_names", "pretrain_cfg_container",
    "run_pretrain", "update_training_progress", "use_te_from_args",
]
