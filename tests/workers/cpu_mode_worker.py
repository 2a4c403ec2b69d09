"""Train stock Megatron GPT + MoE on CPU / gloo under several layouts in one launch.

Launched by ``tests._launch.run_workers("cpu_mode_worker.py", nproc, *args)``; each
``--case`` is a comma-separated list of ``key=value`` (all optional)::

    --case "tp=2"  --case "ep=2,dispatcher=alltoall,steps=6"  --case "ep=2,ckpt=1,reload=tp2"

* ``tp``, ``ep``, ``pp``, ``etp``: the layout (``common.init_layout``); ``sp=0`` turns
  sequence parallel off (default: on when tp > 1);
* ``dispatcher``: ``allgather`` (default) or ``alltoall``; ``shared=1``: a shared expert;
* ``steps``: training steps (default 4); ``tied=1``: tied embedding / output weights;
* ``bf16=1`` / ``fp16=1``: half-precision params (``Float16Module`` + Megatron's
  mixed-precision optimizer; fp16 with dynamic loss scaling);
  ``distopt=1``: distributed optimizer; ``overlap=1``: DDP ``overlap_grad_reduce``;
  ``dropout=1``: hidden / attention dropout 0.1; ``recompute=1``: full activation
  recomputation (replays the dropout masks through Megatron's RNG tracker);
  ``recompute=2``: selective recompute of the norms (output-discarding checkpoints);
* ``ckpt=1``: after training, dist-checkpoint the model, rebuild it with another seed,
  load, and report whether parameters and the eval loss round-trip; ``fp=1`` uses the
  fully-parallel save / load strategies; ``reload=tp2/ep1/pp1`` also loads the checkpoint
  into a model built under that other layout and reports its eval loss.

Rank 0 writes ``{case: {"losses": [...], "layout": {...}, "ckpt": {...}, ...}}``.
"""

from __future__ import annotations

import time
from pathlib import Path

import common as C

_DEFAULTS = dict(tp=1, ep=1, pp=1, etp=None, sp=None, dispatcher="allgather", shared=0,
                 steps=4, tied=0, bf16=0, fp16=0, distopt=0, overlap=0, dropout=0, recompute=0,
                 ckpt=0, fp=0, reload=None)
_STRINGS = ("dispatcher", "reload")


def parse_case(text: str) -> dict:
    """``"tp=2,dispatcher=alltoall"`` -> the full case dict (defaults filled in)."""
    case = dict(_DEFAULTS)
    for item in filter(None, text.split(",")):
        key, _, value = item.partition("=")
        if key not in case:
            raise ValueError(f"unknown case key {key!r} in {text!r}")
        case[key] = value if key in _STRINGS else int(value)
    return case


def _parse_layout(text: str) -> dict:
    out = dict(tp=1, ep=1, pp=1, etp=None)
    for item in filter(None, text.split("/")):
        key = item.rstrip("0123456789")
        out[key] = int(item[len(key):])
    return out


def build(case: dict, seed: int = C.SEED):
    """Layout, then (DDP-wrapped stock GPT/MoE model, Megatron optimizer, config) for a case."""
    C.init_layout(tp=case["tp"], ep=case["ep"], pp=case["pp"], etp=case["etp"], seed=seed)
    overrides = dict(moe_token_dispatcher_type=case["dispatcher"], bf16=bool(case["bf16"]),
                     fp16=bool(case["fp16"]))
    if case["sp"] is not None:
        overrides["sequence_parallel"] = bool(case["sp"])
    if case["shared"]:
        overrides["moe_shared_expert_intermediate_size"] = 32
    if case["dropout"]:
        overrides.update(hidden_dropout=0.1, attention_dropout=0.1)
    if case["recompute"] == 1:
        overrides.update(recompute_granularity="full", recompute_method="uniform",
                         recompute_num_layers=1)
    elif case["recompute"] == 2:  # output-discarding checkpoints (0.19: share_storage)
        overrides.update(recompute_granularity="selective",
                         recompute_modules=["layernorm"])
    config = C.tiny_gpt_config(**overrides)
    gpt = C.build_gpt(config, share_embeddings_and_output_weights=bool(case["tied"]))
    model = C.wrap_ddp(gpt, config, use_distributed_optimizer=bool(case["distopt"]),
                       overlap_grad_reduce=bool(case["overlap"]))
    return model, C.build_optimizer(model), config


def _eval(model) -> float:
    return C.eval_loss(model, C.synthetic_batches(1000))


def run_case(name: str, case: dict, tmp: Path) -> dict:
    """Train one case (and optionally round-trip a checkpoint); returns its result dict."""
    t0 = time.time()
    model, optimizer, config = build(case)
    result = dict(layout=C.layout(), losses=C.train(model, optimizer, config, case["steps"]))
    if case["ckpt"]:
        fully_parallel = bool(case["fp"])
        result["eval_loss"] = _eval(model)
        before = C.param_digest(model)
        ckpt_dir = tmp / ("ckpt-" + "".join(c if c.isalnum() else "_" for c in name))
        C.save_checkpoint(model, ckpt_dir, fully_parallel=fully_parallel)

        fresh, _, _ = build(case, seed=C.SEED + 1)  # other initial weights
        differed = C.param_digest(fresh) != before
        C.load_checkpoint(fresh, ckpt_dir, fully_parallel=fully_parallel)
        result["ckpt"] = dict(
            fresh_model_differed=all(C.all_gather_object(differed)),
            params_equal=all(C.all_gather_object(C.param_digest(fresh) == before)),
            eval_loss=_eval(fresh),
        )
        if case["reload"]:
            other = {**case, **_parse_layout(case["reload"])}
            resharded, _, _ = build(other, seed=C.SEED + 2)
            C.load_checkpoint(resharded, ckpt_dir, fully_parallel=fully_parallel)
            result["ckpt"].update(reload_layout=C.layout(), reload_eval_loss=_eval(resharded))
    C.destroy_layout()
    result["seconds"] = round(time.time() - t0, 2)
    return result


def main() -> None:
    args = C.parse_args(extra=lambda p: p.add_argument("--case", action="append", default=[]))
    C.init_distributed()
    C.write_result(args, {name: run_case(name, parse_case(name), Path(args.tmp))
                          for name in args.case})


if __name__ == "__main__":  # required: dist-ckpt save starts helper processes with spawn
    main()
