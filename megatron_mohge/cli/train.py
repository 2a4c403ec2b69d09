"""``mohge-train --config run.yaml [key.sub=value ...]``: train one run on megatron.core.

Single process by default; under ``torchrun`` the ranks form the TP/EP/PP layout of the
config's ``parallel`` section (gloo + CPU mode without a GPU, NCCL with GPUs). Writes logs,
TensorBoard events, checkpoints and ``summary.json`` under ``output_dir`` (``runs/<name>``).
Re-running the same command resumes from the latest complete checkpoint.

Exit codes: 0 done; 2 bad config, data or checkpoint, or the output folder is in use by
another run; 3 the run diverged (non-finite loss / grad norm, or a loss spike), stopped
before that step was saved; 1 a collective timed out or lost a peer (the stalled or dead
rank, named); 130 Ctrl-C
or SIGTERM (the latest complete checkpoint is intact).
"""

from __future__ import annotations

import sys

from megatron_mohge.cli import common
from megatron_mohge.util.usage_errors import report_usage_error

PROG = "mohge-train"
# A bad config, data, checkpoint or busy folder (found at run time too) ends as one line, once
# per job rather than once per rank (usage_errors.py).
parse_args, main = common.run_file_cli(
    PROG, __doc__, "override config fields, e.g. train.iters=50 parallel.expert_parallel=2",
    lambda run, args: _train(run, args), report=report_usage_error,
    flags={"--print-config": "print the validated config (all defaults filled in) and exit"})


def _train(run, args) -> int:
    if args.print_config:
        if run.layer_file is not None:  # a YAML comment: the output stays a valid run file
            print(f"# moe.mohge read from {run.layer_file}")
        print(run.to_yaml(), end="")
        return 0
    from megatron_mohge.training import mcore_plumbing as M
    from megatron_mohge.training import procs
    from megatron_mohge.training.health import TrainingDiverged
    from megatron_mohge.training.trainer import Trainer

    procs.sigterm_as_interrupt()
    trainer = None
    try:
        trainer = Trainer(run)
        summary = trainer.train()
    except TrainingDiverged as exc:  # nothing of the diverged step was saved or logged
        return _fail(M, f"{PROG}: {exc}", 3)
    except KeyboardInterrupt:
        return _fail(M, f"{PROG}: interrupted; the latest complete checkpoint in "
                        f"{run.save_dir} is intact, re-run the same command to resume", 130)
    except RuntimeError as exc:
        if trainer is None or not (procs.is_timeout(exc) or procs.is_peer_lost(exc)):
            raise
        # The job is ending: torchrun's SIGTERM to the survivors must not interrupt this
        # report or the exit (it raised KeyboardInterrupt inside atexit callbacks).
        import signal

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        # every surviving rank reports (the stalled or dead one cannot): one line each
        text = (trainer.describe_timeout(exc) if procs.is_timeout(exc) else
                procs.peer_lost_message(exc, trainer.heartbeat, trainer.rank,
                                        getattr(trainer, "phase", "?")))
        print(f"{PROG}: {text}", file=sys.stderr, flush=True)
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


if __name__ == "__main__":
    sys.exit(main())
