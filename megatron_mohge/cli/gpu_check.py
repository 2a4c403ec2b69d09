"""``python -m megatron_mohge.cli.gpu_check --out DIR``: the one-GPU check of
:mod:`megatron_mohge.bench.gpu_check` (``scripts/gpu_check.sh`` runs it)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from megatron_mohge.bench import gpu_check
from megatron_mohge.bench.gpu_check import (
    SHAPES,
    check_numerics,
    layer_benches,
    markdown,
    matmul_tflops,
    train_runs,
)


def main(argv: Optional[list] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m megatron_mohge.cli.gpu_check",
                                description=gpu_check.__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="writes results.json / results.md")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--skip-train", action="store_true", help="no GPT training runs")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device visible to torch (use --device cpu for the tiny "
                "CPU run)")
    if args.device == "cpu" and torch.cuda.is_available():
        p.error("--device cpu with a visible GPU: run with CUDA_VISIBLE_DEVICES= "
                "(scripts/gpu_check.sh does)")
    args.out.mkdir(parents=True, exist_ok=True)
    shape = SHAPES[args.device]

    def log(msg):
        print(msg, flush=True)

    import torch.distributed as dist

    from megatron_mohge.bench.environment import environment
    from megatron_mohge.training.mcore_plumbing import destroy_layout, init_distributed, init_layout

    env = environment()
    results = {"device": args.device, "env": dict(env, device_name=env.pop("device", None))}
    t0 = time.perf_counter()
    init_distributed()
    init_layout()
    try:
        log("[gpu_check] numerics: torch vs local experts")
        results["numerics"] = check_numerics(args.device, shape["numerics"])
        log(json.dumps(results["numerics"]))
        results["matmul"] = matmul_tflops(shape["matmul"], args.device)
        log(json.dumps(results["matmul"]))
        results["layer_bench"] = layer_benches(args.device, shape, log)
    finally:
        destroy_layout()
        dist.destroy_process_group()
    if not args.skip_train:
        results["train"] = train_runs(args.device, shape, args.out, log)
    results["wall_s"] = time.perf_counter() - t0
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    (args.out / "results.md").write_text(markdown(results))
    verdict = "PASS" if results["numerics"]["passed"] else "FAIL"
    log(f"[gpu_check] wrote {args.out / 'results.json'} and results.md "
        f"({results['wall_s']:.0f} s); numerics {verdict}")
    return results


if __name__ == "__main__":
    res = main(sys.argv[1:])
    sys.exit(0 if res["numerics"]["passed"] else 1)
