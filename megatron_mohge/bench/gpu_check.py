"""Offline GPU check: expert numerics, layer timings, GPT throughput, GEMM efficiency.

``scripts/gpu_check.sh [--wheels DIR] --out DIR [--device cuda|cpu]`` installs what is
missing from a folder of wheels (no network) and runs ``python -m
megatron_mohge.cli.gpu_check``. On one GPU (bf16) it measures, in a few minutes:

1. ``numerics``: a MoHGE layer's forward and backward with ``torch`` experts against
   ``local`` experts on the same weights (max relative difference of output, input gradient
   and expert weight gradients; pass at <= 2e-2);
2. ``layer_bench``: MoHGE vs Megatron's stock ``MoELayer`` fwd+bwd (CUDA events) at the
   paper-3B layer shape (hidden 1024; 8 groups x 8 experts of widths 384..1280, Kg 4, K 6;
   vs 64 x 1024 top-6, equal total and equal activated params), per expert backend
   (``local``, ``torch``, and ``te`` when Transformer Engine is usable), with the expert
   GEMMs' achieved TFLOP/s;
3. ``matmul``: an 8192^3 bf16 matmul's TFLOP/s in the same process, the ceiling for (2);
4. ``train``: 50 steps of a small GPT of each kind (stock MoE, MoHGE) with tokens/s.

``--device cpu`` runs the same steps at a tiny shape in fp32/bf16 on the CPU (CI runs it).
Writes ``results.json`` and ``results.md`` to ``--out``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

NUMERICS_TOL = 2e-2  # bf16, relative to the largest reference value (tests/test_torch_experts.py)

#: What each step runs at, per device: one row per knob, ``(cuda, cpu)``; cuda is the paper-3B
#: layer in bf16, cpu a tiny fp32 shape that CI runs in seconds.
_SIZES = {
    "numerics": (dict(hidden=1024, tokens=4096, width_scale=1),
                 dict(hidden=64, tokens=128, width_scale=1)),
    "layer": (dict(hidden_size=1024, tokens=8192, stock_num_experts=64, stock_width=1024,
                   stock_topk=6, repeats=20, warmup=5, dtype="bf16"),
              dict(hidden_size=64, tokens=128, stock_num_experts=16, stock_width=64,
                   stock_topk=2, repeats=1, warmup=1, dtype="fp32")),
    "matmul": (8192, 256),
    "train_iters": (50, 4),
    "train_model": (dict(num_layers=4, hidden_size=512, num_attention_heads=8, seq_length=1024,
                         precision="bf16"),
                    dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=64,
                         precision="fp32")),
    "train_batch": (dict(micro_batch_size=8, global_batch_size=8),
                    dict(micro_batch_size=4, global_batch_size=4)),
    "train_width_scale": (8, 1),
    "stock_width": (512, 64),
}
SHAPES = {device: {knob: sizes[i] for knob, sizes in _SIZES.items()}
          for i, device in enumerate(("cuda", "cpu"))}


def _layer_config(device: str):
    """The MoHGE layer timed: the paper's 3B layer on GPUs, tiny_mohge.yaml on CPU (no shared
    experts: the stock layers it is compared with have none)."""
    from megatron_mohge.config import MoHGEConfig
    from megatron_mohge.resources import config_path

    if device == "cuda":
        return MoHGEConfig.paper_3b(num_shared_experts=0, shared_expert_width=None)
    return MoHGEConfig.from_yaml(config_path("tiny_mohge.yaml"))


def check_numerics(device: str, shape: dict) -> dict:
    """torch vs local experts, bf16, same weights (local's copied into the stacked params)."""
    from megatron_mohge.bench.layer_models import build_mohge_layer, scale_widths

    cfg = scale_widths(_layer_config(device), shape["width_scale"])
    dev = torch.device(device, torch.cuda.current_device()) if device == "cuda" else "cpu"
    local = build_mohge_layer(cfg, shape["hidden"], "alltoall", backend="local",
                              dtype="bf16").to(dev)
    grouped = build_mohge_layer(cfg, shape["hidden"], "alltoall", backend="torch",
                                dtype="bf16").to(dev)
    with torch.no_grad():
        for run_l, run_t in zip(local.experts.width_experts, grouped.experts.width_experts):
            for name in ("linear_fc1", "linear_fc2"):
                getattr(run_t, name).weight.copy_(torch.stack(
                    [getattr(m, name).weight for m in run_l.local_experts]))
        grouped.router.load_state_dict(local.router.state_dict())
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape["tokens"], 1, shape["hidden"], generator=gen).to(dev, torch.bfloat16)
    res = {}
    for name, layer in (("local", local), ("torch", grouped)):
        xi = x.clone().requires_grad_(True)
        out, _ = layer(xi)
        out.float().square().mean().backward()
        res[name] = dict(out=out.detach().float(), dx=xi.grad.float())
    res["local"]["dw"] = [torch.stack([getattr(m, n).weight.grad for m in run.local_experts])
                          for run in local.experts.width_experts for n in ("linear_fc1",
                                                                           "linear_fc2")]
    res["torch"]["dw"] = [getattr(run, n).weight.grad for run in grouped.experts.width_experts
                          for n in ("linear_fc1", "linear_fc2")]

    def rel(a, b):
        return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))

    out = dict(dtype="bf16", hidden=shape["hidden"], tokens=shape["tokens"],
               out_rel=rel(res["torch"]["out"], res["local"]["out"]),
               dx_rel=rel(res["torch"]["dx"], res["local"]["dx"]),
               dw_rel=max(rel(a, b) for a, b in zip(res["torch"]["dw"], res["local"]["dw"])),
               tolerance=NUMERICS_TOL)
    out["passed"] = max(out["out_rel"], out["dx_rel"], out["dw_rel"]) <= NUMERICS_TOL
    return out


def matmul_tflops(n: int, device: str, repeats: int = 10) -> dict:
    """Achieved TFLOP/s of one ``n^3`` matmul (bf16 on GPUs, fp32 on CPU)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    dev = torch.device(device, torch.cuda.current_device()) if device == "cuda" else "cpu"
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        if device == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            a @ b
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e) / 1e3)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    med = sorted(times)[len(times) // 2]
    return dict(n=n, dtype=str(dtype).replace("torch.", ""), median_s=med,
                tflops=2 * n ** 3 / med / 1e12)


def layer_benches(device: str, shape: dict, log) -> dict:
    from megatron_mohge.bench.layer_bench import format_table, run_layer_bench
    from megatron_mohge.specs import te_available

    backends = ["local", "torch"] + (["te"] if te_available() else [])
    out = {}
    for backend in backends:
        if backend == "te":  # TE layers are not wired into the layer bench yet
            out["te"] = dict(skipped="TE layer timing is not implemented in the layer bench")
            continue
        log(f"[gpu_check] layer bench, {backend} experts")
        res = run_layer_bench(_layer_config(device), backend=backend, **shape["layer"])
        for k in res["kinds"].values():
            k.pop("times_s", None)
        log(format_table(res))
        out[backend] = res
    return out


def train_runs(device: str, shape: dict, out_dir: Path, log) -> dict:
    """``shape['train_iters']`` steps of a small stock-MoE GPT, the MoHGE GPT and the same
    MoHGE layers in a ``HybridModel`` (``*E`` per GPT layer; on a GPU with TE, Megatron's TE
    hybrid stack spec: the hybrid path's first GPU run)."""
    import dataclasses

    from megatron_mohge.bench.layer_models import scale_widths
    from megatron_mohge.bench.runner import train_run
    from megatron_mohge.resources import config_path
    from megatron_mohge.config import MoHGEConfig
    from megatron_mohge.config.run import RunConfig

    mohge = scale_widths(MoHGEConfig.from_yaml(config_path("tiny_mohge.yaml")),
                         shape["train_width_scale"])
    iters = shape["train_iters"]
    base = dict(model=dict(shape["train_model"]), data=dict(tokenizer="byte",
                                                            cache_dir=str(out_dir / "data"),
                                                            default_corpus_bytes=1_000_000),
                train=dict(iters=iters, lr_warmup_iters=max(1, iters // 10),
                           **shape["train_batch"]),
                eval=dict(interval=0, iters=2), logging=dict(interval=max(1, iters // 5),
                                                               progress_bar=False),
                checkpoint=dict(enabled=False))
    kinds = {"moe": dict(kind="stock", num_experts=16, expert_hidden_size=shape["stock_width"],
                         topk=2),
             "mohge": dict(kind="mohge", mohge=dataclasses.asdict(mohge))}
    kinds["mohge_hybrid"] = kinds["mohge"]
    out = {}
    for name, moe in kinds.items():
        d = json.loads(json.dumps(base))
        d.update(name=f"gpu_check_{name}", moe=moe, output_dir=str(out_dir / "runs" / name))
        if name == "mohge_hybrid":
            n = d["model"]["num_layers"]
            d["model"].update(kind="hybrid", hybrid_layer_pattern="*E" * n, num_layers=2 * n)
        summary = train_run(name, RunConfig.from_dict(d), 1, out_dir, log)
        out[name] = {k: summary.get(k) for k in ("train_tokens_per_s", "heldout_loss",
                                                 "total_params", "peak_mem_bytes", "wall_s")}
    return out


def markdown(results: dict) -> str:
    from megatron_mohge.bench.report import layer_bench_table

    env = results["env"]
    lines = [f"# megatron-mohge GPU check ({results['device']})", "",
             f"device: {env['device_name']}; torch {env['torch']}, megatron-core "
             f"{env['megatron_core']}, python {env['python']}; wall {results['wall_s']:.0f} s.", ""]
    n = results.get("numerics")
    if n:
        lines += ["## torch vs local experts (bf16, same weights)", "",
                  f"max relative difference: output {n['out_rel']:.2e}, input grad "
                  f"{n['dx_rel']:.2e}, expert weight grads {n['dw_rel']:.2e} (tolerance "
                  f"{n['tolerance']:.0e}): {'PASS' if n['passed'] else 'FAIL'}", ""]
    mm = results.get("matmul")
    if mm:
        lines += [f"Plain {mm['n']}^3 {mm['dtype']} matmul: {mm['tflops']:.3g} TFLOP/s.", ""]
    for backend, bench in (results.get("layer_bench") or {}).items():
        lines += [f"## MoE layer fwd+bwd, `{backend}` experts", ""]
        lines += [bench["skipped"]] if "skipped" in bench else [layer_bench_table(bench)]
        lines.append("")
    tr = results.get("train")
    if tr:
        lines += ["## Small GPT / HybridModel, one device", "",
                  "| kind | tokens/s | held-out loss | params |",
                  "|---|---|---|---|"]
        for kind, r in tr.items():
            tps = r.get("train_tokens_per_s")
            lines.append(f"| {kind} | {tps:,.0f} | {r.get('heldout_loss', float('nan')):.4f} | "
                         f"{r.get('total_params') or 0:,} |" if tps else f"| {kind} | - | - | - |")
    return "\n".join(lines) + "\n"
