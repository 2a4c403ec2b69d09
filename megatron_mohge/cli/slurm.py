"""``python -m megatron_mohge.cli.slurm RUN.yaml [key.sub=value ...] --shape torchrun``: the
Slurm command lines of :mod:`megatron_mohge.integration.slurm` (``--print-env``: the
``export`` lines of the run's environment; ``--sbatch-args``: the ``sbatch`` options from the
``launch`` section; ``--flags``: the Megatron-LM flags). The sbatch scripts in
``examples/slurm/`` evaluate these lines, or just print them with ``DRY_RUN=1``."""

from __future__ import annotations

import os
import shlex
import sys

from megatron_mohge.cli import common
from megatron_mohge.integration.flags import megatron_lm_flags, write_mohge_config
from megatron_mohge.integration.slurm import SHAPES, render_commands, render_env, sbatch_args
from megatron_mohge.resources import launcher_path

PROG = "python -m megatron_mohge.cli.slurm"


def _add_args(p) -> None:
    p.add_argument("--shape", choices=SHAPES, default=None,
                   help="torchrun (one task per node) or srun (one task per GPU); default "
                        "launch.shape")
    p.add_argument("--script", default=None,
                   help="training script (default: the pretrain_mohge.py shipped in the "
                        "package, see python -m megatron_mohge.cli.resources; a patched "
                        "checkout's $MEGATRON_LM_DIR/pretrain_gpt.py works too)")
    p.add_argument("--python", default="python", help="interpreter of the srun shape's tasks")
    p.add_argument("--mohge-pretrain", action="store_true",
                   help="launch mohge-pretrain --config RUN.yaml (Megatron's loop from the "
                        "installed megatron.training, megatron-core 0.19; no checkout needed)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--print-env", action="store_true", help="print the export lines")
    what.add_argument("--sbatch-args", action="store_true",
                      help="print the sbatch options of the launch section on one line")
    what.add_argument("--flags", action="store_true", help="print only the Megatron-LM flags")
    p.add_argument("--no-write", action="store_true",
                   help="do not write <output_dir>/mohge_layer.yaml (MoHGE runs)")


def _print_lines(run, args) -> int:
    if args.print_env:
        print("\n".join(render_env(run)))
        return 0
    if args.sbatch_args:
        print(" ".join(sbatch_args(run, args.shape)))
        return 0
    if run.moe.kind == "mohge" and not args.no_write:
        write_mohge_config(run)
    if args.flags:
        print(shlex.join(megatron_lm_flags(run)))
        return 0
    script, script_args = args.script or str(launcher_path()), None
    if args.mohge_pretrain:
        import shutil

        script = args.script or shutil.which("mohge-pretrain") or "mohge-pretrain"
        script_args = ["--config", os.path.abspath(args.config), *args.overrides]
    for line in render_commands(run, script, os.environ, shape=args.shape,
                                python=args.python, script_args=script_args):
        print(line)
    return 0


# errors name the module (the prefix this tool has always used), usage names the command
parse_args, main = common.run_file_cli(
    PROG, __doc__, "override run fields, e.g. launch.nodes=2 train.iters=100", _print_lines,
    add_args=_add_args, name="run", help="run YAML (RunConfig)",
    error_prog="megatron_mohge.cli.slurm")


if __name__ == "__main__":
    sys.exit(main())
