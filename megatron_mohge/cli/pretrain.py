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

import argparse
import sys
import time

from megatron_mohge.cli.usage_errors import report_usage_error
from megatron_mohge.config import ConfigError

_START = time.time()
PROG = "mohge-pretrain"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run YAML (see examples/configs/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="override config fields, e.g. train.iters=20 parallel.expert_parallel=2")
    p.add_argument("--print-args", action="store_true",
                   help="print the Megatron-LM command line pretrain() is given and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_mohge.compat.versions import MegatronTrainingMissing, require_megatron_training
    from megatron_mohge.run_config import RunConfig

    try:
        run = RunConfig.from_yaml(args.config, args.overrides)
        require_megatron_training(PROG)
    except MegatronTrainingMissing as exc:
        print(f"{PROG}: {exc}", file=sys.stderr, flush=True)
        return 2
    except ConfigError as exc:
        return report_usage_error(PROG, exc)
    import warnings

    # megatron-core warns at import that Apex / Transformer Engine are absent (expected on CPU).
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    from megatron_mohge.integration.megatron_training import launch

    try:
        if args.print_args:
            import shlex

            import torch

            cpu = not torch.cuda.is_available()
            print(shlex.join(launch.pretrain_argv(launch.cpu_run(run) if cpu else run, cpu)))
            return 0
        launch.run_pretrain(run, program_start=_START)
    except ConfigError as exc:
        return report_usage_error(PROG, exc)
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
