"""``python -m megatron_mohge.cli.layer_bench``: the MoE-layer microbenchmark of
:mod:`megatron_mohge.bench.layer_bench` as a command (``--help`` lists the options)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from megatron_mohge.bench import layer_bench
from megatron_mohge.bench.backend_compare import compare_expert_backends
from megatron_mohge.bench.layer_bench import format_table, run_layer_bench
from megatron_mohge.bench.layer_models import BACKENDS, DISPATCHERS, DTYPES, scale_widths
from megatron_mohge.cli.common import main_status
from megatron_mohge.config import MoHGEConfig


def main(argv: Optional[list] = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m megatron_mohge.cli.layer_bench",
                                description=layer_bench.__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="MoHGE YAML (e.g. examples/configs/tiny_mohge.yaml)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size (default 64)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens per forward (default 1024)")
    p.add_argument("--stock-experts", type=int, default=16, help="baseline experts (default 16)")
    p.add_argument("--stock-width", type=int, default=64, help="baseline expert width (default 64)")
    p.add_argument("--stock-topk", type=int, default=2, help="baseline top-k (default 2)")
    p.add_argument("--repeats", type=int, default=20, help="timed rounds (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds (default 3)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--dispatcher", choices=DISPATCHERS, default="allgather")
    p.add_argument("--backend", choices=BACKENDS, default="local",
                   help="expert GEMMs of every layer: local (SequentialMLP) or torch (grouped)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    p.add_argument("--width-scale", type=int, default=1,
                   help="multiply the MoHGE widths (and shared width) by this, e.g. 4 for the "
                        "representative hidden-256 shape from a hidden-64 config")
    p.add_argument("--compare-backends", action="store_true",
                   help="only time the MoHGE layer with local vs torch experts, interleaved")
    p.add_argument("--out", type=Path, help="write the result dict as JSON here")
    args = p.parse_args(argv)

    from megatron_mohge.training.mcore_plumbing import destroy_layout, init_distributed, init_layout

    import torch.distributed as dist

    cfg = scale_widths(MoHGEConfig.from_yaml(args.config), args.width_scale)
    own_group = not dist.is_initialized()
    init_distributed()
    init_layout(seed=args.seed)
    try:
        if args.compare_backends:
            result = compare_expert_backends(cfg, hidden_size=args.hidden, tokens=args.tokens,
                                             repeats=args.repeats, warmup=args.warmup,
                                             seed=args.seed, dispatcher=args.dispatcher,
                                             dtype=args.dtype)
            shown = {k: result[k] for k in ("median_s", "p10_s", "p90_s", "torch_over_local",
                                             "loadavg")}
            shown["paired"] = {k: v for k, v in result["paired"].items() if k != "ratios"}
            print(json.dumps(shown, indent=1))
            if args.out is not None:
                args.out.write_text(json.dumps(result, indent=2))
            return result
        result = run_layer_bench(cfg, hidden_size=args.hidden, tokens=args.tokens,
                                 stock_num_experts=args.stock_experts,
                                 stock_width=args.stock_width, stock_topk=args.stock_topk,
                                 repeats=args.repeats, warmup=args.warmup, seed=args.seed,
                                 dispatcher=args.dispatcher, backend=args.backend,
                                 dtype=args.dtype)
    finally:
        destroy_layout()
        if own_group:
            dist.destroy_process_group()
    print(format_table(result))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        from megatron_mohge.training.health import dumps

        args.out.write_text(dumps(result, indent=2))
        print(f"wrote {args.out}")
    return result


def cli(argv: Optional[list] = None) -> int:
    """``main`` as a command: a bad ``--config`` is one line and exit status 2."""
    return main_status("python -m megatron_mohge.cli.layer_bench", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
