"""``examples/pretrain_mohge.py``: Megatron-LM's ``pretrain_gpt.py`` main block, with MoHGE.

It reuses ``pretrain_gpt``'s dataset provider, forward step and embedding-rank rule, adds
``--mohge-config`` (``args``), builds MoHGE layers (``gpt_builder``/``gpt_config``), tells the routers
the training progress (``hooks.mohge_forward_step``) and installs the logging and FLOPs hooks.
Both ``pretrain()`` call styles are driven, chosen by its signature
(``compat.versions.megatron_lm_pretrain_style``):

* ``args`` (core_v0.16/0.17): ``pretrain(provider, partial(model_provider, mohge_gpt_builder),
  model_type, forward_step, extra_args_provider=..., args_defaults=...)``;
* ``config_container`` (core_v0.18+): ``parse_and_validate_args(extra_args_provider=...)``, a
  ``MoHGEGPTModelConfig`` (built by ``MoHGEGPTModelBuilder``), ``pretrain_cfg_container_from_args``
  and ``pretrain(cfg_container, provider, model_type, forward_step)``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from megatron_mohge.integration.megatron_lm.args import add_mohge_args, compose_extra_args_providers
from megatron_mohge.integration.megatron_lm.hooks import (
    install_megatron_lm_hooks,
    mohge_forward_step,
)

#: What ``pretrain_gpt.py``'s main block passes as ``args_defaults`` (every tag so far).
ARGS_DEFAULTS = {"tokenizer_type": "GPT2BPETokenizer"}


def run_pretrain(program_start: Optional[float] = None) -> None:
    """Megatron-LM's GPT pretraining with MoHGE layers (checkout on ``sys.path``)."""
    import time

    start = program_start if program_start is not None else time.time()
    from megatron_mohge.compat.versions import (
        PRETRAIN_STYLE_CONFIG_CONTAINER,
        check_megatron_lm,
    )

    import pretrain_gpt  # noqa: E402  (Megatron-LM root on sys.path)
    from megatron.core.enums import ModelType
    from megatron.training import inprocess_restart, pretrain

    style = check_megatron_lm(pretrain)
    install_megatron_lm_hooks()
    try:
        from megatron.training import set_startup_timestamps

        set_startup_timestamps(program_start=start, main_entry=time.time())
    except ImportError:
        pass
    provider = pretrain_gpt.train_valid_test_datasets_provider
    provider.is_distributed = True  # as pretrain_gpt's __main__ does
    modelopt = pretrain_gpt.add_modelopt_args if pretrain_gpt.has_nvidia_modelopt else None
    extra_args_provider = compose_extra_args_providers(modelopt, add_mohge_args)
    pretrain_fn, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)
    common = dict(store=store, get_embedding_ranks=pretrain_gpt.get_embedding_ranks)
    if style == PRETRAIN_STYLE_CONFIG_CONTAINER:
        pretrain_fn(pretrain_cfg_container(extra_args_provider), provider,
                    ModelType.encoder_or_decoder, mohge_forward_step, **common)
        return
    if "--hybrid-override-pattern" in sys.argv or "--hybrid-layer-pattern" in sys.argv:
        from megatron_mohge.config import ConfigError

        raise ConfigError(
            "model.kind: hybrid: this Megatron-LM's pretrain(provider, model_provider, ...) "
            "builds hybrid models in pretrain_mamba.py, which examples/pretrain_mohge.py does "
            "not drive; use a checkout at core_v0.19.0, or mohge-train.")
    from functools import partial

    from model_provider import model_provider

    from megatron_mohge.integration.megatron_lm.gpt_builder import mohge_gpt_builder

    pretrain_fn(provider, partial(model_provider, mohge_gpt_builder),
                ModelType.encoder_or_decoder, mohge_forward_step, args_defaults=ARGS_DEFAULTS,
                extra_args_provider=extra_args_provider, **common)


def pretrain_cfg_container(extra_args_provider=None):
    """core_v0.18+: parse and validate the command line (sets Megatron's global args) and
    return the ``PretrainConfigContainer`` whose model is a ``MoHGEGPTModelConfig``."""
    from megatron.training.argument_utils import pretrain_cfg_container_from_args
    from megatron.training.arguments import parse_and_validate_args

    from megatron_mohge.integration.megatron_lm.gpt_config import mohge_gpt_model_config

    args = parse_and_validate_args(
        extra_args_provider=extra_args_provider or add_mohge_args, args_defaults=ARGS_DEFAULTS)
    import pretrain_gpt

    if getattr(pretrain_gpt, "has_nvidia_modelopt", False):  # as pretrain_gpt's main block
        pretrain_gpt.maybe_enable_modelopt(args)  # (ModelOpt + MoHGE is refused below)
    from megatron_mohge.integration.megatron_lm.hybrid_config import (hybrid_model_config,
                                                                      is_hybrid_args)

    if is_hybrid_args(args):  # --hybrid-layer-pattern: Megatron's HybridModelBuilder
        return pretrain_cfg_container_from_args(args, hybrid_model_config(args))
    return pretrain_cfg_container_from_args(args, mohge_gpt_model_config(args))


def add_megatron_lm_to_path(megatron_lm_dir: Optional[str] = None) -> Optional[str]:
    """Put a Megatron-LM checkout first on ``sys.path`` (argument, ``$MEGATRON_LM_DIR``, or
    the current directory when it holds ``pretrain_gpt.py``); returns the directory used."""
    import os

    candidates = [megatron_lm_dir, os.environ.get("MEGATRON_LM_DIR"), os.getcwd()]
    for c in candidates:
        if c and (Path(c) / "pretrain_gpt.py").is_file():
            c = str(Path(c).resolve())
            if c not in sys.path:
                sys.path.insert(0, c)
            return c
    return None
