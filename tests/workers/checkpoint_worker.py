"""Dist-checkpoint of a MoHGE GPT saved at one EP size and loaded at another.

``--mode save``: train a few steps (so weights differ from init), save the checkpoint and
the logits of a held-out batch (gathered to rank 0). ``--mode load``: build the model at
this job's EP size, load the checkpoint and report the largest logits difference.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import common as C  # noqa: E402
import equivalence_worker as EW  # noqa: E402

HELDOUT_STEP = 99


def full_logits(model):
    """Logits of the held-out global batch, gathered over DP to every rank ([B, s, V])."""
    from megatron.core import parallel_state as ps

    local = EW.logits_pass(model, C.synthetic_batches(HELDOUT_STEP))
    parts = C.all_gather_object((ps.get_data_parallel_rank(), local))
    by_dp = {}
    for dp_rank, t in parts:
        if t is not None:
            by_dp[dp_rank] = t
    return torch.cat([by_dp[k] for k in sorted(by_dp)])


def main():
    args = C.parse_args(extra=lambda p: (
        p.add_argument("--mode", choices=["save", "load"], required=True),
        p.add_argument("--ckpt", required=True),
        p.add_argument("--ep", type=int, required=True),
        p.add_argument("--steps", type=int, default=3),
        p.add_argument("--backend", default="local", help="expert backend")))
    C.init_distributed()
    C.init_layout(1, args.ep, 1)
    mc = EW.mohge_config(backend=args.backend)
    model, tc = EW.build(mc, "alltoall" if args.ep > 1 else "allgather")
    result = dict(layout=C.layout(), backend=args.backend)
    if args.mode == "save":
        EW.spread_gates(model)
        opt = C.build_optimizer(model)
        result["losses"] = C.train(model, opt, tc, args.steps)
        C.save_checkpoint(model, os.path.join(args.ckpt, "model"))
        logits = full_logits(model)
        if C.rank() == 0:
            torch.save(logits, os.path.join(args.ckpt, "logits.pt"))
        result["heldout_loss"] = C.eval_loss(model, C.synthetic_batches(HELDOUT_STEP))
    else:
        C.load_checkpoint(model, os.path.join(args.ckpt, "model"))
        logits = full_logits(model)
        saved = torch.load(os.path.join(args.ckpt, "logits.pt"))
        result["logits_max_abs_diff"] = float((logits - saved).abs().max())
        result["logits_scale"] = float(saved.abs().max())
        result["heldout_loss"] = C.eval_loss(model, C.synthetic_batches(HELDOUT_STEP))
    C.write_result(args, result)
    C.destroy_layout()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
