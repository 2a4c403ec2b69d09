"""Reference checkpoints for the Hugging Face export parity tests.

For each case of ``--cases`` (a JSON list of ``{"name", "ep", "run"}``, ``run`` a RunConfig
mapping) at its EP size (data parallel over the rest of the job's ranks): build mohge-train's model (``training.model_builder.build_model``), spread its
weights so routing is far from ties (and set a random loss-free bias where it has one), save
a dist-checkpoint exactly as ``Trainer.save`` does (model + optimizer + scheduler state, the
run file beside it) and, on rank 0, the plugin model's reference outputs: fp32 logits of
fixed tokens and a 32-token greedy continuation (full recompute per token).
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import common as C  # noqa: E402

PROMPT_LEN, NEW_TOKENS = 8, 32


def spread(model, seed: int) -> None:
    """Weights of a trained-looking model: gates spread far from ties, every other weight
    perturbed (replicated tensors identically on every rank; each rank's experts its own)."""
    from megatron.core import parallel_state as ps

    for name, p in C.unwrap(model).named_parameters():
        local = ".experts." in name and "shared_experts" not in name
        gen = torch.Generator().manual_seed(
            seed + (1000 * ps.get_expert_model_parallel_rank() if local else 0)
            + sum(map(ord, name)))
        with torch.no_grad():
            if name.endswith("router.weight") or name.endswith("router.group_weight"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            else:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    for name, b in C.unwrap(model).named_buffers():
        if name.endswith("balance_bias_E"):
            gen = torch.Generator().manual_seed(seed + 7)
            b.copy_(torch.randn(b.shape, generator=gen) * 2.0)


def forward_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    with torch.no_grad():
        return C.unwrap(model)(tokens, pos, None).float()


def main():
    args = C.parse_args(extra=lambda p: (
        p.add_argument("--cases", required=True), p.add_argument("--root", required=True)))
    from megatron_mohge.data import load_tokenizer
    from megatron_mohge.config.run import RunConfig
    from megatron_mohge.training import checkpoint as ckpt_lib
    from megatron_mohge.training.model_builder import build_model, build_optimizer_and_scheduler

    C.init_distributed()
    results = {}
    for i, case in enumerate(json.loads(open(args.cases).read())):
        run_dict = dict(case["run"])
        ep = int(case.get("ep", 1))
        run_dict["parallel"] = {**run_dict.get("parallel", {}), "expert_parallel": ep}
        run_dict["output_dir"] = os.path.join(args.root, case["name"])
        run = RunConfig.from_dict(run_dict)
        C.init_layout(1, ep, 1, seed=run.train.seed)
        vocab = run.padded_vocab_size(load_tokenizer(run.data.tokenizer).vocab_size)
        model, tc = build_model(run, vocab)
        spread(model, 100 + i)
        model.eval()
        opt, sched = build_optimizer_and_scheduler(run, model)
        model_sd = C.sharded_state_dict(model)
        state = {"model": model_sd,
                 "optimizer": ckpt_lib.optimizer_sharded_state_dict(opt, model_sd,
                                                                    is_loading=False),
                 "opt_param_scheduler": sched.state_dict(), "iteration": 3,
                 "train_state": {"history": [], "evals": []}}
        ckpt = ckpt_lib.save(state, run.save_dir, 3, files={ckpt_lib.RUN_FILE: run.to_yaml()})
        gen = torch.Generator().manual_seed(5)
        tokens = torch.randint(0, 256, (2, run.model.seq_length), generator=gen)
        logits = forward_logits(model, tokens)
        seq = tokens[:1, :PROMPT_LEN]
        for _ in range(NEW_TOKENS):
            nxt = forward_logits(model, seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
        if C.rank() == 0:
            ref = os.path.join(args.root, f"{case['name']}.ref.pt")
            torch.save({"tokens": tokens, "logits": logits, "greedy": seq}, ref)
            results[case["name"]] = {"ckpt": str(ckpt), "ref": ref, "vocab": vocab,
                                     "layout": C.layout()}
        C.destroy_layout()
    C.write_result(args, results)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
