"""Megatron's own training loop from the installed ``megatron.training`` (``mohge-pretrain``).

The 0.19 megatron-core wheels ship ``megatron.training`` -- ``pretrain(cfg_container, ...)``,
``GPTModelConfig`` / ``GPTModelBuilder``, checkpointing, logging, the distributed optimizer --
but not Megatron-LM's ``pretrain_gpt.py``. With only ``pip install megatron-core
megatron-mohge`` a run YAML trains MoHGE with Megatron's real loop:

* :mod:`.run_pretrain` -- run YAML -> Megatron-LM flags (``integration.flags``, the one mapping) ->
  ``parse_and_validate_args`` -> ``PretrainConfigContainer`` (``MoHGEGPTModelConfig`` from
  ``integration.megatron_lm.gpt_config``) -> ``pretrain()``, hooks from
  ``integration.megatron_lm.hooks``; CPU mode without a GPU;
* :mod:`.steps` -- what ``pretrain_gpt.py`` would supply: the dataset provider (our
  ``GPTDataset`` front end on prepared data or the default corpus), the forward step (training
  progress for the routers) and the embedding ranks.

A Megatron-LM checkout keeps its own path (``examples/pretrain_mohge.py``,
``integration.megatron_lm``). Nothing here imports megatron.training at import time.
"""

from megatron_mohge.integration.megatron_training.run_pretrain import (
    CPU_FLAGS,
    cfg_container,
    cpu_run,
    parse_megatron_args,
    pretrain_argv,
    run_pretrain,
)

__all__ = ["CPU_FLAGS", "cfg_container", "cpu_run", "parse_megatron_args", "pretrain_argv",
           "run_pretrain"]
