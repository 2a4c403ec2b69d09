"""Integration with Megatron-LM (the training framework around megatron-core) and Slurm.

* :mod:`~megatron_mohge.integration.megatron_lm` -- ``--mohge-config`` for Megatron-LM's
  ``pretrain_gpt.py`` at core_v0.16.1 and core_v0.19.0 (argument hook, model builders,
  aux-loss names, FLOPs correction, launcher; one module per job), used by
  ``examples/pretrain_mohge.py`` (no patch) and by ``patches/`` (a patched checkout).
* :mod:`~megatron_mohge.integration.flags` -- a run YAML (``RunConfig``) to Megatron-LM flags.
* :mod:`~megatron_mohge.integration.slurm` -- the exact ``srun``/``torchrun`` command lines of
  ``examples/slurm/*.sbatch``.

Analytic parameter counts, activated widths and memory figures (``mohge-check-config``,
FLOPs, the bench's token budget) are :mod:`megatron_mohge.accounting`, one layer below.

Nothing here imports torch, megatron.core or megatron.training at import time; the parts that
need them import them on first use, so the package works without a Megatron-LM checkout.
"""

__all__ = ["flags", "megatron_lm", "slurm"]
