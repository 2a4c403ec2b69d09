"""Distributed-optimizer checkpoint of a MoHGE GPT: save in one layout / expert backend, resume
in another, optimizer state included.

``--mode save``: train ``--steps`` steps with the distributed optimizer, save model + optimizer
through the trainer's checkpoint functions (``training/checkpoint.py``), record the held-out
logits, then train ``--after`` more steps (the reference continuation). ``--mode load``: build
the model at this job's EP size and backend, load model + optimizer the same way, compare the
held-out logits and train the same ``--after`` steps: with the optimizer state restored they
reproduce the reference's losses and final held-out loss.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import checkpoint_worker as CW  # noqa: E402
import common as C  # noqa: E402
import equivalence_worker as EW  # noqa: E402

from megatron_mohge.training import checkpoint as ckpt_lib  # noqa: E402
from megatron_mohge.training import mcore_plumbing as M  # noqa: E402


def build(args):
    from megatron_mohge import get_mohge_decoder_block_spec

    mc = EW.mohge_config(backend=args.backend)
    tc = mc.apply_to(C.tiny_gpt_config(
        moe_token_dispatcher_type="alltoall" if args.ep > 1 else "allgather",
        moe_layer_freq=[1, 0, 1, 1], moe_aux_loss_coeff=0.0,
        moe_router_load_balancing_type="none"))
    model = C.build_gpt(tc, get_mohge_decoder_block_spec(tc, mc, use_te=False))
    model = C.wrap_ddp(model, tc, use_distributed_optimizer=True)
    return model, C.build_optimizer(model)


def state(model, opt, is_loading: bool) -> dict:
    model_sd = C.sharded_state_dict(model)
    return {"model": model_sd,
            "optimizer": ckpt_lib.optimizer_sharded_state_dict(opt, model_sd,
                                                               is_loading=is_loading)}


def optimizer_digest(opt) -> dict:
    """World sums of |state| per Adam state and the step counts: each element of a parameter's
    optimizer state lives on exactly one rank, so the sums do not depend on the layout."""
    sums, steps = {}, set()
    for sub in getattr(opt, "chained_optimizers", None) or [opt]:
        for st in sub.optimizer.state.values():
            for k, v in st.items():
                if k == "step":
                    steps.add(float(v))
                else:
                    sums[k] = sums.get(k, 0.0) + float(v.double().abs().sum())
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    all_steps = set().union(*C.all_gather_object(steps))
    return {"sums": dict(zip(keys, t.tolist())), "steps": sorted(all_steps)}


def continue_training(model, opt, first: int, steps: int) -> dict:
    losses = [C.train_step(model, opt, C.synthetic_batches(first + i)) for i in range(steps)]
    return {"losses_after": losses,
            "heldout_after": C.eval_loss(model, C.synthetic_batches(CW.HELDOUT_STEP))}


def main():
    args = C.parse_args(extra=lambda p: (
        p.add_argument("--mode", choices=["save", "load"], required=True),
        p.add_argument("--ckpt", required=True),
        p.add_argument("--ep", type=int, required=True),
        p.add_argument("--backend", default="local", help="expert backend"),
        p.add_argument("--steps", type=int, default=3),
        p.add_argument("--after", type=int, default=2)))
    C.init_distributed()
    C.init_layout(1, args.ep, 1)
    model, opt = build(args)
    root = Path(args.ckpt)
    result = dict(layout=C.layout(), backend=args.backend,
                  experts=type(C.unwrap(model).decoder.layers[0].mlp.experts.width_experts[0])
                  .__name__)
    if args.mode == "save":
        EW.spread_gates(model)
        result["losses"] = C.train(model, opt, None, args.steps)
        result["optimizer"] = optimizer_digest(opt)
        ckpt_lib.save(state(model, opt, False), root, args.steps)
        logits = CW.full_logits(model)
        if C.rank() == 0:
            torch.save(logits, root / "logits.pt")
    else:
        loaded = ckpt_lib.dist_load(state(model, opt, True), root / f"iter_{args.steps:07d}")
        M.load_model_state(model, loaded["model"])
        ckpt_lib.restore_optimizer(opt, loaded["optimizer"])
        result["optimizer"] = optimizer_digest(opt)
        logits = CW.full_logits(model)
        saved = torch.load(root / "logits.pt")
        result["logits_max_abs_diff"] = float((logits - saved).abs().max())
        result["logits_scale"] = float(saved.abs().max())
    result.update(continue_training(model, opt, args.steps, args.after))
    if args.mode == "save" and C.rank() == 0:
        (root / "reference.json").write_text(json.dumps(result))
    C.write_result(args, result)
    C.destroy_layout()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
