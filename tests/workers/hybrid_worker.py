"""A HybridModel with MoHGE ``E`` layers (built as mohge-train builds it) at one EP size.

``--mode train``: start from the initial weights in ``CKPT/init`` (``--save-init``: spread
the gates and save them there first), train ``--steps`` steps (loss-free bias on), report the
losses and expert biases, save the checkpoint and the held-out logits (gathered to rank 0).
``--mode load``: load a ``train`` checkpoint at this job's EP size and report the largest
logits difference.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import checkpoint_worker as CW  # noqa: E402
import common as C  # noqa: E402
import equivalence_worker as EW  # noqa: E402

MOHGE = dict(widths=[16, 32, 48, 64], experts_per_group=2, group_topk=2, topk=2,
             losses=dict(group_start_fraction=0.0, expert_bias_update_rate=1e-2))


def run_config(ep: int):
    from megatron_mohge.config.run import RunConfig

    return RunConfig.from_dict({
        "model": dict(kind="hybrid", hybrid_layer_pattern="*E-E", num_layers=4, hidden_size=32,
                      num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
                      seq_length=C.SEQ_LENGTH, vocab_size=C.VOCAB_SIZE),
        "moe": {"kind": "mohge", "mohge": MOHGE},
        "parallel": {"expert_parallel": ep}})


def expert_biases(model) -> list:
    return [b.tolist() for name, b in C.unwrap(model).named_buffers()
            if name.endswith("balance_bias_E")]


def main():
    args = C.parse_args(extra=lambda p: (
        p.add_argument("--mode", choices=["train", "load"], required=True),
        p.add_argument("--save-init", action="store_true"),
        p.add_argument("--ckpt", required=True),
        p.add_argument("--ep", type=int, required=True),
        p.add_argument("--steps", type=int, default=4)))
    from megatron_mohge.training import model_builder as model_lib

    C.init_distributed()
    C.init_layout(1, args.ep, 1)
    run = run_config(args.ep)
    model, tc = model_lib.build_model(run, C.VOCAB_SIZE)
    result = dict(layout=C.layout(), model=type(C.unwrap(model)).__name__)
    if args.mode == "train":
        if args.save_init:
            EW.spread_gates(model)
            C.save_checkpoint(model, os.path.join(args.ckpt, "init"))
        C.load_checkpoint(model, os.path.join(args.ckpt, "init"))
        opt = C.build_optimizer(model)
        result["losses"] = C.train(model, opt, tc, args.steps)
        result["expert_biases"] = expert_biases(model)
        out = os.path.join(args.ckpt, f"ep{args.ep}")
        C.save_checkpoint(model, os.path.join(out, "model"))
        logits = CW.full_logits(model)
        if C.rank() == 0:
            torch.save(logits, os.path.join(out, "logits.pt"))
    else:
        C.load_checkpoint(model, os.path.join(args.ckpt, "model"))
        logits = CW.full_logits(model)
        saved = torch.load(os.path.join(args.ckpt, "logits.pt"))
        result["logits_max_abs_diff"] = float((logits - saved).abs().max())
        result["logits_scale"] = float(saved.abs().max())
    C.write_result(args, result)
    C.destroy_layout()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
