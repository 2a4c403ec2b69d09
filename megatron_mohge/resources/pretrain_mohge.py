#!/usr/bin/env python
"""Megatron-LM GPT pretraining with MoHGE layers -- no patch to Megatron-LM needed.

Run it with a Megatron-LM checkout (tag core_v0.16.1 or core_v0.19.0) on ``PYTHONPATH`` (or in
``$MEGATRON_LM_DIR``, or as the working directory) and megatron-mohge installed::

    PYTHONPATH=$MEGATRON_LM_DIR torchrun --nproc-per-node 8 examples/pretrain_mohge.py \
        <the usual pretrain_gpt.py flags> --mohge-config examples/configs/paper_3b_layer.yaml

It is ``pretrain_gpt.py``'s main block with three changes, all in
``megatron_mohge.integration.megatron_lm`` (``launcher.run_pretrain`` drives both ``pretrain()``
styles: core_v0.16's model provider, core_v0.19's config container with ``MoHGEGPTModelBuilder``):

* ``--mohge-config PATH`` (a MoHGE layer YAML, or a run YAML whose ``moe.mohge`` is used),
  overrides of its router and loss fields ``--mohge-<field>`` (e.g. ``--mohge-group-coeff``,
  ``--mohge-group-gradient``, ``--mohge-expert-bias-update-rate``; the list:
  ``integration.megatron_lm.args.CLI_OVERRIDE_FIELDS``), and ``--mohge-flops-expectation``,
  ``--mohge-flops-routed-width``;
* the model comes from ``get_mohge_decoder_block_spec`` (``--moe-layer-freq``, PP/VPP stage
  slicing, a MoHGE multi-token-prediction layer, Transformer Engine layers when
  ``--transformer-impl transformer_engine`` and TE is usable), and the forward step tells the
  routers the training progress (group-loss schedule);
* the MoHGE aux losses are reduced and logged like Megatron's own, and the FLOPs/throughput
  figures use the MoHGE activated width (``--mohge-flops-expectation``, default the
  uniform-routing expectation K x mean expert width).

``examples/slurm/*.sbatch`` build the whole command line from a run YAML.
"""

import os
import sys
import time

_START = time.time()


def main() -> None:
    from megatron_mohge.integration.megatron_lm import add_megatron_lm_to_path, run_pretrain

    if add_megatron_lm_to_path() is None:
        try:
            import pretrain_gpt  # noqa: F401  (already importable from PYTHONPATH)
        except ImportError:
            sys.exit("pretrain_mohge.py: cannot import Megatron-LM's pretrain_gpt; put a "
                     "Megatron-LM checkout (tag core_v0.16.1 or core_v0.19.0) on PYTHONPATH or set "
                     "MEGATRON_LM_DIR (see docs/megatron-lm.md in the megatron-mohge "
                     "repository).")
    # Megatron-LM silences warnings on ranks other than 0 (as pretrain_gpt.py does).
    if int(os.environ.get("RANK", "0")) != 0:
        import warnings

        warnings.filterwarnings("ignore", category=UserWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
    run_pretrain(program_start=_START)


if __name__ == "__main__":
    main()
