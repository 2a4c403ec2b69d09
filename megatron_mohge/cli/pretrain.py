"""``mohge-pretrain --config run.yaml [key.sub=value ...]``: Megatron's own ``pretrain()``.

Same run YAML and overrides as ``mohge-train``, but the loop, logging, checkpoints
(``torch_dist`` under ``checkpoint.save``) and optimizer are Megatron's own, from the installed
``megatron.training`` (the 0.19 megatron-core wheels ship it). Under ``torchrun`` the ranks
form the ``parallel`` layout; gloo + CPU mode without a GPU, NCCL with GPUs. Re-running the
same command resumes from the latest checkpoint (``checkpoint.load``, default ``save``).
Megatron flags not covered by the YAML go in ``launch.extra_args``.

Exit codes: 0 done; 2 bad config or data, or megatron.training is not installed.
"""

from __future__ import annotations

import sys
import time

from megatron_mohge.cli import common
from megatron_mohge.util.usage_errors import print_error, report_usage_error

PROG = "mohge-pretrain"
parse_args, main = common.run_file_cli(
    PROG, __doc__, "override config fields, e.g. train.iters=20 parallel.expert_parallel=2",
    lambda run, args: _pretrain(run, args), report=report_usage_error,
    flags={"--print-args": "print the Megatron-LM command line pretrain() is given and exit"})
_START = time.time()


def _pretrain(run, args) -> int:
    from megatron_mohge.compat.versions import MegatronTrainingMissing, require_megatron_training

    try:
        require_megatron_training(PROG)
    except MegatronTrainingMissing as exc:
        return print_error(PROG, exc)
    # the module's names (the package re-exports the function run_pretrain under its name)
    from megatron_mohge.integration.megatron_training.run_pretrain import (
        cpu_run,
        pretrain_argv,
        run_pretrain,
    )

    if args.print_args:
        import shlex

        import torch

        cpu = not torch.cuda.is_available()
        shown = cpu_run(run) if cpu else run
        print(shlex.join(pretrain_argv(shown, cpu)))
        return 0
    run_pretrain(run, program_start=_START)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
