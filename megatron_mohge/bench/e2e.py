"""End-to-end comparison: train every run of a preset with ``mohge-train`` (same data, seed
and token budget; each run in its own process tree, ``torchrun`` when the preset uses
several ranks), run the layer microbenchmark, and assemble ``results.json``.

``results.json`` (the contract users rely on) has ``runs``: run name -> ``total_params``,
``routed_expert_params``, ``activated_params_per_token`` (non-routed params + routed params
activated per token, measured from the routing of the held-out batches),
``heldout_loss``, ``heldout_ppl``, ``train_tokens_per_s``, ``peak_mem_bytes``,
``group_token_share``, ``expert_load_cv``, ``expert_load_max_over_mean``, and with EP>1
``rank_flops_max_over_mean`` (all-size allocation; the contiguous layout side by side in
``rank_flops``); plus ``layer_bench`` with ``median_s`` per layer kind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

from megatron_mohge.bench.presets import Preset
from megatron_mohge.config import ConfigError
from megatron_mohge.run_config import RunConfig


def resolve_data(data: list[str], tokenizer: str, out_dir: Path, log=print) -> list[str]:
    """Dataset prefixes for ``--data``: indexed-dataset prefixes are used as they are; text
    files / folders are tokenized once into ``out_dir/data/corpus``."""
    from megatron_mohge.data import check_dataset, load_tokenizer, prepare_data

    if not data:
        return []
    prefixes, texts = [], []
    for item in data:
        base = item[:-4] if item.endswith((".bin", ".idx")) else item
        if Path(base + ".bin").is_file() and Path(base + ".idx").is_file():
            check_dataset(base, tokenizer)
            prefixes.append(str(Path(base).resolve()))
        else:
            texts.append(item)
    if texts:
        prefix = out_dir / "data" / "corpus"
        prefix.parent.mkdir(parents=True, exist_ok=True)
        meta = prepare_data(texts, prefix, load_tokenizer(tokenizer), progress=True)
        log(f"tokenized {meta['num_documents']} documents, {meta['num_tokens']:,} tokens "
            f"-> {prefix}")
        prefixes.append(str(prefix.resolve()))
    return prefixes


def run_configs(preset: Preset, out_dir: Path, *, names: Optional[list[str]] = None,
                data: Optional[list[str]] = None, tokenizer: Optional[str] = None,
                seed: Optional[int] = None, iters: Optional[int] = None) -> dict[str, RunConfig]:
    """Validated RunConfigs of the preset's runs with the command-line choices applied."""
    runs = {}
    for name, d in preset.run_dicts(names).items():
        d["output_dir"] = str(out_dir / "runs" / name)
        d.setdefault("data", {})
        d["data"]["cache_dir"] = str(out_dir / "data")
        if data:
            d["data"]["path"] = list(data)
        if tokenizer:
            d["data"]["tokenizer"] = tokenizer
        if seed is not None:
            d["train"]["seed"] = seed
        if iters is not None:
            d["train"]["iters"] = iters
            d["train"]["lr_warmup_iters"] = min(d["train"]["lr_warmup_iters"], max(iters // 10, 1))
            d["eval"]["interval"] = 0
            d["logging"]["interval"] = max(1, min(d["logging"]["interval"], iters // 4 or 1))
        try:
            runs[name] = RunConfig.from_dict(d)
        except ConfigError as exc:
            raise ConfigError(f"preset {preset.name}, run {name}: {exc}") from exc
    return runs


def launch_command(config_path: Path, nproc: int) -> list[str]:
    """``mohge-train`` for one run: plain Python for one rank, else torchrun (gloo on CPU)."""
    train = ["-m", "megatron_mohge.cli.train", "--config", str(config_path)]
    if nproc == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc-per-node={nproc}", *train]


def train_run(name: str, run: RunConfig, nproc: int, out_dir: Path, log=print) -> dict:
    cfg_path = out_dir / "configs" / f"{name}.yaml"
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    run.to_yaml(cfg_path)
    summary_path = run.out_dir / "summary.json"
    if summary_path.exists():
        summary_path.unlink()
    env = dict(os.environ)
    # One BLAS thread per rank when several ranks share the cores (torchrun's own default).
    if nproc > 1:
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("PYTHONWARNINGS", "ignore")
    cmd = launch_command(cfg_path, nproc)
    log(f"[bench] {name}: {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0 or not summary_path.is_file():
        raise RuntimeError(f"run {name} failed (exit {proc.returncode}); its log is above and its "
                           f"config in {cfg_path}")
    summary = json.loads(summary_path.read_text())
    summary["wall_s"] = time.perf_counter() - t0
    return summary


def run_layer_bench_subprocess(preset: Preset, mohge_cfg: dict, out_dir: Path, log=print,
                               lb: Optional[dict] = None, backend: str = "local",
                               tag: str = "") -> dict:
    """The layer microbenchmark in its own (single-rank) process, for a clean timing.

    ``lb``: the shape (default ``preset.layer_bench``); ``tag`` suffixes the output name."""
    cfg_path = out_dir / "configs" / "layer_bench_mohge.yaml"
    cfg_path.write_text(yaml.safe_dump(mohge_cfg, sort_keys=False))
    out = out_dir / f"layer_bench{tag}.json"
    lb = lb or preset.layer_bench
    cmd = [sys.executable, "-m", "megatron_mohge.bench.layer_bench", "--config", str(cfg_path),
           "--hidden", str(lb["hidden_size"]), "--tokens", str(lb["tokens"]),
           "--stock-experts", str(lb["stock_num_experts"]), "--stock-width", str(lb["stock_width"]),
           "--stock-topk", str(lb["stock_topk"]), "--repeats", str(lb["repeats"]),
           "--warmup", str(lb["warmup"]), "--width-scale", str(lb.get("width_scale", 1)),
           "--backend", backend, "--out", str(out)]
    log(f"[bench] layer microbenchmark: {' '.join(cmd[1:])}")
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"layer microbenchmark failed (exit {proc.returncode})")
    return json.loads(out.read_text())


def run_figures(summary: dict, run: RunConfig) -> dict:
    """The results.json entry of one run from its ``mohge-train`` summary."""
    fig = {k: summary[k] for k in (
        "kind", "total_params", "routed_expert_params", "activated_params_per_token",
        "activated_routed_params_per_token", "heldout_loss", "heldout_ppl", "train_tokens_per_s",
        "peak_mem_bytes", "group_token_share", "expert_load_cv", "expert_load_max_over_mean")}
    fig["layout"] = summary["layout"]
    fig["wall_s"] = summary.get("wall_s")
    layers = summary["layers"]
    widths = _expert_widths(run)
    if widths and layers:
        if run.moe.kind == "mohge":
            fig["widths"] = list(run.moe.mohge.widths)
        fig["chosen_width_hist"] = _width_hist(layers, widths)
        fig["rank_flops"] = _rank_flops(layers, run.parallel.expert_parallel)
        ep_key = str(run.parallel.expert_parallel)
        if run.parallel.expert_parallel > 1:
            key = "all_size" if run.moe.kind == "mohge" else "contiguous"
            fig["rank_flops_max_over_mean"] = _mean(
                l["rank_flops"][ep_key][f"{key}_max_over_mean"] for l in layers)
        fig["rank_flops_by_ep"] = {
            ep: {k: _mean(l["rank_flops"][ep][k] for l in layers)
                 for k in layers[0]["rank_flops"][ep] if k.endswith("max_over_mean")}
            for ep in layers[0].get("rank_flops", {})}
    if any("importance_cv" in l for l in layers):
        fig["importance_cv"] = _mean(l.get("importance_cv") for l in layers)
    hist = summary["history"]
    fig["curves"] = dict(
        iteration=[h["iteration"] for h in hist], train_loss=[h["loss"] for h in hist],
        eval_iteration=[e["iteration"] for e in summary["evals"]],
        eval_loss=[e["loss"] for e in summary["evals"]],
        group_share=[h["group_share"] for h in hist if h.get("group_share")],
        mean_chosen_width=[h["mean_chosen_width"] for h in hist],
        aux={k: [h["aux"].get(k) for h in hist] for k in (hist[-1]["aux"] if hist else {})},
    )
    return fig


def _expert_widths(run: RunConfig) -> Optional[list[int]]:
    if run.moe.kind == "mohge":
        return run.moe.mohge.expert_widths
    if run.moe.kind == "moe":
        return [run.moe.expert_hidden_size] * run.moe.num_experts
    return None


def _width_hist(layers: list[dict], widths: list[int]) -> dict:
    """Share of (token, expert) assignments per expert width, over all MoE layers."""
    per = {}
    for layer in layers:
        for n, w in zip(layer["tokens_per_expert"], widths):
            per[w] = per.get(w, 0.0) + n
    total = sum(per.values()) or 1.0
    ws = sorted(per)
    return {"widths": ws, "fraction": [per[w] / total for w in ws]}


def _rank_flops(layers: list[dict], ep: int) -> Optional[dict]:
    """Per-rank FLOPs/mean averaged over layers at the run's EP (or EP=2 for EP=1 runs)."""
    key = str(ep) if ep > 1 else "2"
    if key not in layers[0].get("rank_flops", {}):
        return None
    entries = [l["rank_flops"][key] for l in layers]
    out = {"ep": int(key), "measured_at_ep": ep}
    for name in ("all_size", "contiguous"):
        if name in entries[0]:
            ranks = len(entries[0][name])
            out[name] = [_mean(e[name][r] for e in entries) for r in range(ranks)]
            out[f"{name}_max_over_mean"] = _mean(e[f"{name}_max_over_mean"] for e in entries)
    return out


def _mean(values) -> Optional[float]:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def target_checks(results: dict) -> dict:
    """The issue's targets, evaluated on the measured figures (reported, never asserted)."""
    runs, base = results["runs"], results["runs"].get(results.get("baseline", "moe"))
    if base is None or "mohge" not in runs:
        return {}
    m = runs["mohge"]
    checks = {
        "routed_params_reduction": 1 - m["routed_expert_params"] / base["routed_expert_params"],
        "heldout_loss_vs_baseline": m["heldout_loss"] / base["heldout_loss"] - 1,
        "activated_routed_reduction": 1 - (m["activated_routed_params_per_token"]
                                           / base["activated_routed_params_per_token"]),
        "activated_total_reduction": 1 - (m["activated_params_per_token"]
                                          / base["activated_params_per_token"]),
    }
    for ep, v in (m.get("rank_flops_by_ep") or {}).items():
        checks[f"rank_flops_all_size_ep{ep}"] = v.get("all_size_max_over_mean")
        checks[f"rank_flops_contiguous_ep{ep}"] = v.get("contiguous_max_over_mean")
    lb = results.get("layer_bench")
    if lb:
        checks["layer_time_mohge_over_equal_total"] = lb["ratios"]["mohge_over_equal_total"]
    passed = {
        "routed_params_reduction>=0.18": checks["routed_params_reduction"] >= 0.18,
        "heldout_loss<=+1%": checks["heldout_loss_vs_baseline"] <= 0.01,
        "activated_routed_reduction>=0.20": checks["activated_routed_reduction"] >= 0.20,
    }
    for ep in ("2", "4"):
        v = checks.get(f"rank_flops_all_size_ep{ep}")
        if v is not None:
            passed[f"rank_flops_all_size_ep{ep}<=1.05"] = v <= 1.05
    if lb:
        passed["layer_time<=equal_total"] = checks["layer_time_mohge_over_equal_total"] <= 1.0
    return {"figures": checks, "met": passed}


def run_bench(preset: Preset, out_dir: Path, *, names=None, data=None, tokenizer=None,
              seed=None, iters=None, layer_bench: bool = True, log=print) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = tokenizer or preset.base.get("data", {}).get("tokenizer", "byte")
    prefixes = resolve_data(list(data or []), tok, out_dir, log)
    runs = run_configs(preset, out_dir, names=names, data=prefixes or None, tokenizer=tokenizer,
                       seed=seed, iters=iters)
    if not prefixes:  # prepare the default corpus once, before the runs race for it
        from megatron_mohge.data import ensure_default_dataset, load_tokenizer

        first = next(iter(runs.values()))
        ensure_default_dataset(first.data.cache_dir, load_tokenizer(first.data.tokenizer),
                               max_bytes=first.data.default_corpus_bytes)
    results = {"preset": preset.name, "description": preset.description,
               "seed": next(iter(runs.values())).train.seed, "baseline": preset.baseline,
               "kind": preset.kind, "nproc": preset.nproc, "env": _env(), "runs": {}}
    t0 = time.perf_counter()
    for name, run in runs.items():
        nproc = preset.nproc if run.parallel.expert_parallel > 1 or preset.nproc > 1 else 1
        summary = train_run(name, run, nproc, out_dir, log)
        results["runs"][name] = run_figures(summary, run)
        results["runs"][name]["nproc"] = nproc
        _write(out_dir, results)
    if layer_bench and preset.layer_bench:
        mohge = next((r.moe.mohge for r in runs.values() if r.moe.kind == "mohge"), None)
        if mohge is not None:
            results["layer_bench"] = run_layer_bench_subprocess(preset, mohge.to_dict(), out_dir,
                                                                log)
            rep = preset.layer_bench_representative
            if rep:  # {backend: result} at the representative shape
                results["layer_bench_representative"] = {
                    b: run_layer_bench_subprocess(preset, mohge.to_dict(), out_dir, log, lb=rep,
                                                  backend=b, tag=f"_representative_{b}")
                    for b in rep["backends"]}
    results["targets"] = target_checks(results)
    results["wall_s"] = time.perf_counter() - t0
    _write(out_dir, results)
    return results


def _write(out_dir: Path, results: dict) -> None:
    from megatron_mohge.training.checkpoint import atomic_write

    atomic_write(out_dir / "results.json", json.dumps(results, indent=1))


def _env() -> dict:
    import platform

    import torch

    try:
        from importlib.metadata import version

        mcore = version("megatron-core")
    except Exception:  # pragma: no cover - metadata missing
        mcore = None
    return {"torch": torch.__version__, "megatron_core": mcore, "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
