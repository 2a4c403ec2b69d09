"""CPU mode: run stock Megatron-Core (GPT + MoE) on CPU with the gloo backend.

"Develop and test MoE layers on a laptop": after :func:`enable_cpu_mode`, megatron-core
(0.16.x and 0.19.x) builds, trains (forward, backward, Megatron DDP +
``finalize_model_grads``, the Megatron optimizer incl. grad clipping) and dist-checkpoints a
GPTModel with MoE on CPU, in one process or under ``torchrun`` with gloo, with TP
(+ sequence parallel), EP, PP and their combinations::

    from megatron_mohge.compat import enable_cpu_mode

    enable_cpu_mode()                       # before building models; True when applied
    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel(...)   # then stock Megatron code

It is **opt-in**: importing this package changes nothing. :func:`enable_cpu_mode` applies
the patches below once (a second call is a no-op), in place on megatron's modules and
classes, so it works whether megatron was imported before or after. It refuses
megatron-core releases outside the tested lines
(:func:`megatron_mohge.compat.versions.require_tested_mcore`), and on a machine where CUDA
is available it only warns and patches nothing. The patches are process-wide and permanent
(restart the process to get stock behaviour). Parts: ``proxy`` (the ``torch`` stand-in),
``redirect`` / ``moe`` / ``training`` (the fixes), ``patches`` (the table, written once).

Patches (name -- target: what fails on CPU; then what we do), rendered from
:data:`megatron_mohge.compat.cpu.patches.PATCHES`:

{table}

``enable_cpu_mode(megatron_training=True)`` also lets Megatron's own loop
(``megatron.training.pretrain()``, ``mohge-pretrain``) run on CPU with
``--distributed-backend gloo`` (:mod:`megatron_mohge.compat.cpu.megatron_training`):

{training_table}

Known limits on CPU (not patched; CUDA-only features): Transformer Engine / apex kernels,
``moe_grouped_gemm`` (needs TE or the CUDA ``grouped_gemm`` package), CUDA graphs, fused
kernels (``moe_permute_fusion``, fused rope / cross-entropy), the flex / DeepEP / NCCL-EP
dispatchers, paged stash, Megatron FSDP, the persistent async checkpoint worker,
NCCL-specific options (SHARP, user buffers).
"""

from __future__ import annotations

import logging
import threading
import warnings
from typing import List, Tuple

import torch

from megatron_mohge.compat.cpu.patches import (
    PATCHED_MODULES,
    PATCHES,
    TRAINING_PATCHES,
    CpuModePatch,
    describe,
)
from megatron_mohge.compat.cpu.redirect import REDIRECTED_MODULES, check_redirect_targets, module
from megatron_mohge.compat.versions import require_tested_mcore

__doc__ = __doc__.replace("{table}", describe()).replace("{training_table}",
                                                          describe(TRAINING_PATCHES))
__all__ = ["enable_cpu_mode", "is_cpu_mode_enabled", "cpu_mode_patches", "CpuModePatch",
           "PATCHES", "TRAINING_PATCHES", "REDIRECTED_MODULES"]

log = logging.getLogger(__name__)
_LOCK = threading.Lock()
_ENABLED = False
_TRAINING_ENABLED = False
_APPLIED: List[CpuModePatch] = []


def is_cpu_mode_enabled() -> bool:
    """True once :func:`enable_cpu_mode` has applied its patches in this process."""
    return _ENABLED


def cpu_mode_patches() -> Tuple[CpuModePatch, ...]:
    """The patches applied by :func:`enable_cpu_mode` (empty before, or on a CUDA machine)."""
    return tuple(_APPLIED)


def enable_cpu_mode(megatron_training: bool = False) -> bool:
    """Patch megatron-core in place so that it runs on CPU with gloo.

    Returns True when patches were applied by this call, False when CPU mode was
    already enabled (no-op) or CUDA is available (a warning is emitted, nothing is
    patched: use the real GPU code paths there). Raises
    :class:`~megatron_mohge.compat.versions.UnsupportedMegatronVersion` for a
    megatron-core release CPU mode was not validated on.
    ``megatron_training=True`` also applies :data:`TRAINING_PATCHES` (Megatron's own loop;
    needs ``megatron.training``), now or on top of an earlier plain call.
    """
    global _ENABLED
    with _LOCK:
        if _ENABLED:
            return _enable_training() if megatron_training else False
        if torch.cuda.is_available():
            warnings.warn("megatron_mohge CPU mode was requested but CUDA is available; nothing "
                          "was patched (Megatron's GPU code paths are used).", RuntimeWarning,
                          stacklevel=2)
            return False
        require_tested_mcore("CPU mode")
        if _APPLIED:  # an earlier call failed half-way: never wrap anything twice
            raise RuntimeError("megatron_mohge CPU mode failed earlier in this process and is "
                               "partially applied; restart the process")
        # Preflight: import every target and decide which patches this release needs before
        # patching anything.
        for name in PATCHED_MODULES:
            module(name)
        check_redirect_targets()
        todo = [p for p in PATCHES if p.needed()]
        for patch in todo:
            patch.apply()
            _APPLIED.append(patch)
        _ENABLED = True
        log.info("megatron_mohge CPU mode enabled: %s", ", ".join(p.name for p in _APPLIED))
        if megatron_training:
            _enable_training()
        return True


def _enable_training() -> bool:
    """Apply :data:`TRAINING_PATCHES` once (CPU mode is on; called under ``_LOCK``)."""
    global _TRAINING_ENABLED
    if _TRAINING_ENABLED:
        return False
    from megatron_mohge.compat.cpu.megatron_training import TRAINING_REDIRECTED_MODULES, module
    from megatron_mohge.compat.versions import require_megatron_training

    require_megatron_training("CPU mode for megatron.training")
    for name in (*TRAINING_REDIRECTED_MODULES, "initialize"):  # preflight, as for megatron.core
        if module(name).__dict__.get("torch") is not torch:
            raise RuntimeError(f"CPU mode: {name}.torch is not the torch module; cannot redirect")
    for patch in TRAINING_PATCHES:
        if patch.needed():
            patch.apply()
            _APPLIED.append(patch)
    _TRAINING_ENABLED = True
    return True
