"""``mohge-train --config run.yaml [key.sub=value ...]``: train one run on megatron.core.

Single process by default; under ``torchrun`` the ranks form the TP/EP/PP layout of the
config's ``parallel`` section (gloo + CPU mode without a GPU, NCCL with GPUs). Writes logs,
TensorBoard events, checkpoints and ``summary.json`` under ``output_dir`` (``runs/<name>``).
Re-running the same command resumes from the latest complete checkpoint.

Exit codes: 0 done; 2 bad config, data or checkpoint, or the output folder is in use by
another run; 3 the run diverged (non-finite loss / grad norm, or a loss spike), stopped
before that step was saved; 1 a collective timed out (a stalled rank, named); 130 Ctrl-C
or SIGTERM (the latest complete checkpoint is intact).
"""

from __future__ import annotations

import argparse
import sys
import warnings

from megatron_mohge.cli.usage_errors import report_usage_error
from megatron_mohge.config import ConfigError
from megatron_mohge.run_config import RunConfig


PROG = "mohge-train"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="run YAML (see examples/configs/)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value",
                   help="override config fields, e.g. train.iters=50 parallel.expert_parallel=2")
    p.add_argument("--print-config", action="store_true",
                   help="print the validated config (all defaults filled in) and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run = RunConfig.from_yaml(args.config, args.overrides)
    except ConfigError as exc:
        return report_usage_error(PROG, exc)
    if args.print_config:
        print(run.to_yaml(), end="")
        return 0
    # megatron-core warns at import that Apex / Transformer Engine are absent (expected on CPU).
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    from megatron_mohge.training import mcore as M
    from megatron_mohge.training import procs
    from megatron_mohge.training.health import TrainingDiverged
    from megatron_mohge.training.trainer import Trainer

    _sigterm_as_interrupt()
    trainer = None
    try:
        trainer = Trainer(run)
        summary = trainer.train()
    except ConfigError as exc:  # bad data / checkpoint / busy folder discovered at run time
        # Once per job, not once per rank (see usage_errors.py).
        return report_usage_error(PROG, exc)
    except TrainingDiverged as exc:  # nothing of the diverged step was saved or logged
        return _fail(M, f"mohge-train: {exc}", 3)
    except KeyboardInterrupt:
        return _fail(M, f"mohge-train: interrupted; the latest complete checkpoint in "
                        f"{run.save_dir} is intact, re-run the same command to resume", 130)
    except RuntimeError as exc:
        if trainer is None or not procs.is_timeout(exc):
            raise
        # every surviving rank reports (the stalled one cannot): one line each
        print(f"mohge-train: {trainer.describe_timeout(exc)}", file=sys.stderr, flush=True)
        return 1
    finally:
        if trainer is not None:
            trainer.release_locks()
    if M.rank() == 0:
        print(f"[{run.name}] done: held-out loss {summary['heldout_loss']:.4f} "
              f"(ppl {summary['heldout_ppl']:.3f}), {summary['total_params']:,} params, "
              f"{summary['activated_params_per_token']:,.0f} activated/token; "
              f"summary in {run.out_dir / 'summary.json'}")
    trainer.close()
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def _fail(M, message: str, code: int) -> int:
    """Print ``message`` once (rank 0; the errors here are the same on every rank)."""
    if M.rank() == 0:
        print(message, file=sys.stderr, flush=True)
    return code


def _sigterm_as_interrupt() -> None:
    """SIGTERM (torchrun stopping the job, Slurm pre-emption) ends the run as Ctrl-C does:
    Python unwinds, the folder lock is released and the checkpoint writers exit with the
    rank; a save in progress is left as an ignored ``.tmp`` directory."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())
