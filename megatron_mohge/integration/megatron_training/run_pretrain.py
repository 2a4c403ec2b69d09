"""Run Megatron's own ``pretrain()`` (the installed ``megatron.training``) for a run YAML.

The run YAML becomes Megatron-LM flags through the one mapping (``integration.flags``), minus
``--data-path``: the dataset provider reads ``run.data`` itself (``steps``). Megatron parses
and validates them (``parse_and_validate_args`` with ``--mohge-config``), the model config is
``MoHGEGPTModelConfig`` (``moe.kind: mohge``, built by ``MoHGEGPTModelBuilder``) or Megatron's
own ``GPTModelConfig`` (stock MoE / dense), and ``pretrain(cfg_container, ...)`` runs Megatron's
loop with the hooks of ``megatron_lm.hooks`` installed (end-of-step router balancing, MoHGE
losses reduced in the log, the FLOPs correction).

Without a GPU: CPU mode, including its ``megatron.training`` patches
(``enable_cpu_mode(megatron_training=True)``), the gloo backend, local (non-TE) layers, CPU
weight init and no fused kernels (:data:`CPU_FLAGS`). With GPUs: NCCL and the run's own choices.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Optional

#: Megatron-LM flags of CPU mode: gloo, CPU weight init (layout-independent, as mohge-train),
#: no CUDA-only fused kernels, no data-loader worker processes.
CPU_FLAGS = ("--distributed-backend", "gloo", "--use-cpu-initialization",
             "--no-gradient-accumulation-fusion", "--no-persist-layer-norm",
             "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion",
             "--no-rope-fusion", "--num-workers", "0")


def cpu_run(run):
    """``run`` with local (non-Transformer-Engine) layers: what CPU mode can build."""
    if run.moe.use_te is False:
        return run
    from megatron_mohge.config.run import RunConfig

    if run.moe.kind == "mohge" and run.moe.mohge.expert_backend == "te":
        from megatron_mohge.config import ConfigError

        raise ConfigError("moe.mohge.expert_backend: te needs a GPU and Transformer Engine; "
                          "use local or auto on CPU.")
    data = run.to_dict()
    data["moe"]["use_te"] = False
    return RunConfig.from_dict(data)


def pretrain_argv(run, cpu: bool) -> list[str]:
    """Megatron-LM's command line for ``run`` (writes ``<output_dir>/mohge_layer.yaml`` for
    MoHGE runs, the file ``--mohge-config`` names)."""
    from megatron_mohge.compat.versions import mcore_version
    from megatron_mohge.integration.flags import (
        OPTIM_FULLY_RESHARDABLE,
        defines_arg,
        megatron_lm_flags,
        write_mohge_config,
    )
    from megatron_mohge.integration.megatron_training.steps import DATASET_FLAGS

    path = write_mohge_config(run) if run.moe.kind == "mohge" else None
    flags = megatron_lm_flags(run, path, mcore_version(), data=False,  # the installed loop's
                              optim_fully_reshardable=defines_arg(OPTIM_FULLY_RESHARDABLE,
                                                                  installed=True),
                              installed=True)
    if run.logging.interval > run.train.iters:  # a short run still prints its iteration log
        flags[flags.index("--log-interval") + 1] = str(run.train.iters)
    extra = list(run.launch.extra_args)  # last: they override anything (argparse keeps the last)
    base = flags[:len(flags) - len(extra)] if extra else flags
    return [*base, *DATASET_FLAGS, *(CPU_FLAGS if cpu else ()), *extra]


def _single_process_env() -> None:
    """Outside torchrun: a 1-rank job on a free local port (Megatron initialises env://)."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def use_prebuilt_dataset_helpers() -> bool:
    """``initialize_megatron`` runs ``make`` in ``megatron/core/datasets`` to build the C++
    dataset helpers, and exits when that fails. The wheels ship them prebuilt
    (``helpers_cpp``) and no Makefile, so ``make`` always fails there (CPU or GPU): when the
    prebuilt module imports and there is nothing to build, compiling is skipped. True when
    skipped."""
    import importlib
    from pathlib import Path

    utils = importlib.import_module("megatron.core.datasets.utils")
    if (Path(utils.__file__).parent / "Makefile").is_file():
        return False  # a source tree (Megatron-LM checkout): let Megatron build them
    try:
        importlib.import_module("megatron.core.datasets.helpers_cpp")
    except ImportError:
        return False  # nothing prebuilt: Megatron's own error explains it

    def compile_helpers():  # noqa: D401  (what initialize_megatron calls)
        """Prebuilt in the wheel (megatron.core.datasets.helpers_cpp): nothing to compile."""

    utils.compile_helpers = compile_helpers
    return True


def parse_megatron_args(argv: list[str]):
    """Megatron's ``parse_and_validate_args`` on ``argv`` with ``--mohge-config`` known (it
    reads ``sys.argv``; restored afterwards); sets Megatron's global args, tokenizer, timers."""
    from megatron.training.arguments import parse_and_validate_args

    from megatron_mohge.integration.megatron_lm.args import add_mohge_args

    saved = sys.argv
    sys.argv = ["mohge-pretrain", *argv]
    try:
        return parse_and_validate_args(extra_args_provider=add_mohge_args)
    finally:
        sys.argv = saved


def cfg_container(run, args):
    """The ``PretrainConfigContainer`` of parsed ``args``: for ``model.kind: hybrid`` Megatron's
    ``HybridModelConfig`` with our stack spec (``hybrid_config``; built by its own
    ``HybridModelBuilder``), else a ``MoHGEGPTModelConfig`` for MoHGE runs (checked against
    ``--mohge-config``), Megatron's ``GPTModelConfig`` otherwise."""
    from megatron.training.argument_utils import (
        gpt_config_from_args,
        pretrain_cfg_container_from_args,
    )

    if run.is_hybrid:
        from megatron_mohge.integration.megatron_lm.hybrid_config import hybrid_model_config

        model = hybrid_model_config(args)
    elif run.moe.kind == "mohge":
        from megatron_mohge.integration.megatron_lm.gpt_config import mohge_gpt_model_config

        model = mohge_gpt_model_config(args)
    else:
        model = gpt_config_from_args(args)
    return pretrain_cfg_container_from_args(args, model)


def run_pretrain(run, program_start: Optional[float] = None) -> None:
    """Train ``run`` with Megatron's ``pretrain()`` (collective: every rank calls it)."""
    import time

    from megatron_mohge.compat.versions import (
        PRETRAIN_STYLE_CONFIG_CONTAINER,
        UnsupportedMegatronVersion,
        check_megatron_lm,
        require_megatron_training,
    )

    require_megatron_training()
    import torch

    cpu = not torch.cuda.is_available()
    if cpu:
        from megatron_mohge.compat.cpu import enable_cpu_mode

        run = cpu_run(run)
        enable_cpu_mode(megatron_training=True)
        # validate_args asks for it with TP/CP > 1 before Blackwell (device-arch: CPU is 0)
        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    from megatron.core.enums import ModelType
    from megatron.training import pretrain, set_startup_timestamps

    from megatron_mohge.integration.megatron_lm.hooks import install_megatron_lm_hooks
    from megatron_mohge.integration.megatron_training.steps import (
        dataset_provider,
        forward_step,
        get_embedding_ranks,
    )

    if check_megatron_lm(pretrain) != PRETRAIN_STYLE_CONFIG_CONTAINER:
        raise UnsupportedMegatronVersion(
            "mohge-pretrain drives pretrain(cfg_container, ...) (megatron.training from "
            "core_v0.18); this megatron.training has the older pretrain(provider, ...): run "
            "examples/pretrain_mohge.py from its Megatron-LM checkout instead.")
    _single_process_env()
    use_prebuilt_dataset_helpers()
    install_megatron_lm_hooks()
    args = parse_megatron_args(pretrain_argv(run, cpu))
    container = cfg_container(run, args)
    set_startup_timestamps(program_start=program_start or time.time(), main_entry=time.time())
    pretrain(container, dataset_provider(run), ModelType.encoder_or_decoder, forward_step,
             get_embedding_ranks=get_embedding_ranks)


__all__ = ["CPU_FLAGS", "cfg_container", "cpu_run", "parse_megatron_args", "pretrain_argv",
           "run_pretrain"]
