"""End-to-end comparison: train every run of a preset with ``mohge-train`` once per seed
(same data, token budget and held-out set; each run in its own process tree, ``torchrun``
when the preset uses several ranks), run the layer microbenchmark, and assemble
``results.json``.

``results.json`` (the contract users rely on) has ``seeds`` and ``runs``: run name ->
``total_params``, ``routed_expert_params``, ``activated_params_per_token`` (non-routed params
+ routed params activated per token, measured from the routing of the held-out batches),
``heldout_loss``, ``heldout_ppl``, ``train_tokens_per_s``, ``peak_mem_bytes``,
``group_token_share``, ``expert_load_cv``, ``expert_load_max_over_mean``, and with EP>1
``rank_flops_max_over_mean`` (all-size allocation; the contiguous layout side by side in
``rank_flops``) -- each the mean over seeds, with ``<field>_per_seed`` lists (seed order) for
the :data:`SEED_FIELDS` and every seed's full figures in ``per_seed``. ``comparisons``
holds, per ``<run>_vs_<baseline>``, the paired per-seed ratios of the :data:`COMPARED`
figures with their mean and Student-t 95% interval (:mod:`megatron_mohge.bench.stats`);
``layer_bench`` has ``median_s`` per layer kind; ``study`` (scaling-study presets) the
loss-vs-params fits (:mod:`megatron_mohge.bench.study`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional

import yaml

from megatron_mohge.bench.aggregate import SEED_FIELDS, aggregate_runs, compare_runs, layer_mean
from megatron_mohge.bench.presets import Preset
from megatron_mohge.cli.usage_errors import ERROR_FILE_ENV, read_usage_error
from megatron_mohge.config import ConfigError
from megatron_mohge.run_config import RunConfig
from megatron_mohge.util.numbers import mean_by_ep, mean_present


def resolve_data(data: list[str], tokenizer: str, out_dir: Path, log=print, *,
                 split_documents: Optional[str] = None,
                 json_keys: Optional[list[str]] = None) -> list[str]:
    """Dataset prefixes for ``--data``: indexed-dataset prefixes are used as they are; text /
    JSON lines / Parquet files and folders are tokenized once into ``out_dir/data/corpus``
    (``mohge-prepare-data``'s document rules; several JSON keys: one dataset each)."""
    from megatron_mohge.data import check_dataset, load_tokenizer
    from megatron_mohge.data.formats import DEFAULT_JSON_KEYS, DEFAULT_SPLIT
    from megatron_mohge.data.prepare import prepare_datasets

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
        metas = prepare_datasets(texts, prefix, load_tokenizer(tokenizer), progress=True,
                                 split=split_documents or DEFAULT_SPLIT,
                                 json_keys=tuple(json_keys or DEFAULT_JSON_KEYS))
        for out, meta in metas.items():
            log(f"tokenized {meta['num_documents']} documents, {meta['num_tokens']:,} tokens "
                f"-> {out}")
            prefixes.append(str(Path(out).resolve()))
    return prefixes


def resolve_seeds(preset: Preset, seeds: Optional[list[int]] = None,
                  seed: Optional[int] = None) -> list[int]:
    """The seeds to train: ``--seeds N`` (one value: N seeds from ``--seed``/the preset's
    first seed on) or an explicit list; else ``--seed`` alone; else the preset's."""
    first = preset.seeds[0] if seed is None else seed
    if seeds is None:
        return [first] if seed is not None else list(preset.seeds)
    if len(seeds) == 1:
        if seeds[0] < 1:
            raise ConfigError(f"--seeds {seeds[0]}: give a number of seeds >= 1 or a list of "
                              "two or more seeds")
        return [first + i for i in range(seeds[0])]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {' '.join(map(str, seeds))}: seeds repeat; give distinct "
                          "seeds")
    return list(seeds)


def run_configs(preset: Preset, out_dir: Path, *, names: Optional[list[str]] = None,
                data: Optional[list[str]] = None, tokenizer: Optional[str] = None,
                seed: Optional[int] = None, iters: Optional[int] = None) -> dict[str, RunConfig]:
    """Validated RunConfigs of the preset's runs for one seed, with the command-line choices
    applied; each writes to ``out_dir/runs/<name>/seed<seed>``."""
    runs = {}
    for name, d in preset.run_dicts(names).items():
        if seed is not None:
            d["train"]["seed"] = seed
        d["output_dir"] = str(out_dir / "runs" / name / f"seed{d['train'].get('seed', 1234)}")
        d.setdefault("data", {})
        d["data"]["cache_dir"] = str(out_dir / "data")
        if data:
            d["data"]["path"] = list(data)
        if tokenizer:
            d["data"]["tokenizer"] = tokenizer
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


class RunFailedError(RuntimeError):
    """A run of the benchmark crashed (its traceback is in the log above)."""


def launch_command(config_path: Path, nproc: int) -> list[str]:
    """``mohge-train`` for one run: plain Python for one rank, else torchrun (gloo on CPU)
    through ``megatron_mohge.cli.launch``, which reports a rank's usage error as one line."""
    train = ["-m", "megatron_mohge.cli.train", "--config", str(config_path)]
    if nproc == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "megatron_mohge.cli.launch", "--standalone",
            f"--nproc-per-node={nproc}", *train]


def config_path(out_dir: Path, name: str, run: RunConfig) -> Path:
    return out_dir / "configs" / f"{name}.seed{run.train.seed}.yaml"


@dataclass
class _Active:
    """One training process in flight."""

    key: object
    name: str
    run: RunConfig
    proc: subprocess.Popen
    cfg_path: Path
    log_file: Optional[Path]
    out: Optional[IO]
    t0: float


def _start_run(key, name: str, run: RunConfig, nproc: int, out_dir: Path, threads: int,
               log_file: Optional[Path], log=print) -> _Active:
    cfg_path = config_path(out_dir, name, run)
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    run.to_yaml(cfg_path)
    summary_path = run.out_dir / "summary.json"
    if summary_path.exists():
        summary_path.unlink()
    env = dict(os.environ)
    # One BLAS thread per rank when several ranks (or runs) share the cores.
    if threads > 0:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    env.setdefault("PYTHONWARNINGS", "ignore")
    if log_file is not None:  # line by line into the log, not in blocks at exit
        env.setdefault("PYTHONUNBUFFERED", "1")
    # A rank's usage error (bad data, config) comes back here, reported once (usage_errors.py).
    error_file = _usage_error_file(cfg_path)
    error_file.unlink(missing_ok=True)
    env[ERROR_FILE_ENV] = str(error_file)
    cmd = launch_command(cfg_path, nproc)
    where = f" (log: {log_file})" if log_file else ""
    log(f"[bench] {name} seed {run.train.seed}: {' '.join(cmd[1:])}{where}")
    out = None
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        out = open(log_file, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
    return _Active(key, name, run, proc, cfg_path, log_file, out, time.perf_counter())


def _usage_error_file(cfg_path: Path) -> Path:
    return cfg_path.with_suffix(".usage_error.txt")


def _finish_run(a: _Active, cpu_s: Optional[float]) -> dict:
    if a.out is not None:
        a.out.close()
    summary_path = a.run.out_dir / "summary.json"
    message = read_usage_error(_usage_error_file(a.cfg_path))
    if message is not None:
        raise ConfigError(f"run {a.name}: {message}")
    if a.proc.returncode != 0 or not summary_path.is_file():
        where = f"its log is {a.log_file}" if a.log_file else "its log is above"
        raise RunFailedError(f"run {a.name} (seed {a.run.train.seed}) failed (exit "
                             f"{a.proc.returncode}); {where} and its config {a.cfg_path}")
    summary = json.loads(summary_path.read_text())
    summary["wall_s"] = time.perf_counter() - a.t0
    # CPU seconds of the run (all ranks): a cost figure a busy machine does not inflate
    summary["cpu_s"] = cpu_s
    return summary


def _reap(active: list[_Active]) -> tuple[Optional[_Active], Optional[float]]:
    """A finished run and its CPU seconds, or (None, None). Reaped with wait4, so the
    resource usage covers the run's whole process tree (torchrun and its ranks)."""
    for a in active:
        pid, status, usage = os.wait4(a.proc.pid, os.WNOHANG)
        if pid:
            a.proc.returncode = os.waitstatus_to_exitcode(status)
            return a, usage.ru_utime + usage.ru_stime
    return None, None


def train_runs(queue: list[tuple], nproc_of, out_dir: Path, jobs: int = 1, log=print):
    """Train ``queue`` (``(key, name, RunConfig)`` tuples) with up to ``jobs`` runs at once;
    yields ``(key, name, run, summary)`` in completion order. With one job the run's output
    goes to this terminal, else to ``out_dir/logs/<name>.seed<seed>.log``."""
    cpus = os.cpu_count() or 1
    pending, active = list(queue), []
    try:
        while pending or active:
            while pending and len(active) < jobs:
                key, name, run = pending.pop(0)
                nproc = nproc_of(run)
                threads = max(1, cpus // (nproc * jobs)) if nproc * jobs > 1 else 0
                log_file = (out_dir / "logs" / f"{name}.seed{run.train.seed}.log"
                            if jobs > 1 else None)
                active.append(_start_run(key, name, run, nproc, out_dir, threads, log_file,
                                         log))
            done, cpu_s = _reap(active)
            if done is None:
                time.sleep(0.5)
                continue
            active.remove(done)
            yield done.key, done.name, done.run, _finish_run(done, cpu_s)
    finally:
        # a failed or interrupted run stops the others (only the processes started here);
        # SIGTERM first, so torchrun stops its ranks
        for a in active:
            a.proc.terminate()
        for a in active:
            try:
                a.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                a.proc.kill()
                a.proc.wait()
            if a.out is not None:
                a.out.close()


def train_run(name: str, run: RunConfig, nproc: int, out_dir: Path, log=print) -> dict:
    """One run in the foreground (its output on this terminal)."""
    for *_, summary in train_runs([(None, name, run)], lambda _: nproc, out_dir, 1, log):
        return summary
    raise AssertionError("unreachable")


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
        raise RunFailedError(f"layer microbenchmark failed (exit {proc.returncode}); its log "
                             f"is above")
    return json.loads(out.read_text())


def run_figures(summary: dict, run: RunConfig) -> dict:
    """The results.json entry of one run from its ``mohge-train`` summary."""
    fig = {k: summary[k] for k in (
        "kind", "total_params", "routed_expert_params", "activated_params_per_token",
        "activated_routed_params_per_token", "heldout_loss", "heldout_ppl", "train_tokens_per_s",
        "peak_mem_bytes", "group_token_share", "expert_load_cv", "expert_load_max_over_mean")}
    for k in BALANCE_FIELDS:  # absent in summaries of older runs
        fig[k] = summary.get(k)
    fig["seed"] = run.train.seed
    fig["layout"] = summary["layout"]
    fig["wall_s"] = summary.get("wall_s")
    fig["cpu_s"] = summary.get("cpu_s")
    for key in ("heldout_loss_se", "heldout_tokens", "heldout_batch_losses"):
        if key in summary:
            fig[key] = summary[key]
    layers = summary["layers"]
    widths = _expert_widths(run)
    if widths and layers:
        if run.moe.kind == "mohge":
            fig["widths"] = list(run.moe.mohge.widths)
        fig["chosen_width_hist"] = _width_hist(layers, widths)
        fig["rank_flops"] = _rank_flops(layers, run.parallel.expert_parallel)
        # the trainer's layer means (balance_figures); recomputed for older summaries only
        by_ep = summary.get("rank_flops_by_ep")
        if by_ep is None:
            by_ep = mean_by_ep(l.get("rank_flops") for l in layers)
        fig["rank_flops_by_ep"] = by_ep
        if run.parallel.expert_parallel > 1:
            key = "all_size" if run.moe.kind == "mohge" else "contiguous"
            fig["rank_flops_max_over_mean"] = by_ep.get(str(run.parallel.expert_parallel), {}).get(
                f"{key}_max_over_mean")
    if any("importance_cv" in l for l in layers):
        fig["importance_cv"] = mean_present(l.get("importance_cv") for l in layers)
    for key in SEED_FIELDS:  # per-layer figures the summary does not average itself
        if key not in fig and key not in summary and layers and key in layers[0]:
            fig[key] = layer_mean(layers, key)
    hist = summary["history"]
    fig["curves"] = dict(
        iteration=[h["iteration"] for h in hist], train_loss=[h["loss"] for h in hist],
        eval_iteration=[e["iteration"] for e in summary["evals"]],
        eval_loss=[e["loss"] for e in summary["evals"]],
        group_share=[h["group_share"] for h in hist if h.get("group_share")],
        mean_chosen_width=[h["mean_chosen_width"] for h in hist],
        **{f"{k}": [h.get(k) for h in hist] for k in ("maxvio_batch", "group_load_cv",
                                                      "expert_load_cv")},
        rank_flops_ep2=[((h.get("rank_flops_by_ep") or {}).get("2") or {}).get(
            "all_size_max_over_mean" if run.moe.kind == "mohge" else "contiguous_max_over_mean")
            for h in hist],
        aux={k: [h["aux"].get(k) for h in hist] for k in (hist[-1]["aux"] if hist else {})},
    )
    return fig


# balance figures of a run summary (means over MoE layers, measured on the held-out batches;
# train_* on the training batches of the last quarter of training)
BALANCE_FIELDS = ("maxvio_micro", "maxvio_batch", "group_load_cv", "train_expert_load_cv",
                  "train_maxvio_micro", "train_maxvio_batch", "train_group_load_cv",
                  "train_rank_flops_by_ep")


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
            out[name] = [mean_present(e[name][r] for e in entries) for r in range(ranks)]
            out[f"{name}_max_over_mean"] = mean_present(e[f"{name}_max_over_mean"] for e in entries)
    return out


def target_checks(results: dict) -> dict:
    """The issue's targets, evaluated on the measured figures (reported, never asserted)."""
    if results.get("study"):
        return _study_targets(results["study"])
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
    comp = (results.get("comparisons") or {}).get(f"mohge_vs_{results.get('baseline', 'moe')}",
                                                  {})
    ci = comp.get("loss_ratio_ci95")
    if ci:
        checks["heldout_loss_ratio_ci95_high"] = ci[1]
    passed = {
        "routed_params_reduction>=0.18": checks["routed_params_reduction"] >= 0.18,
        "heldout_loss<=+1%": checks["heldout_loss_vs_baseline"] <= 0.01,
        "activated_routed_reduction>=0.20": checks["activated_routed_reduction"] >= 0.20,
    }
    for ep in ("2", "4"):
        v = checks.get(f"rank_flops_all_size_ep{ep}")
        if v is not None:
            passed[f"rank_flops_all_size_ep{ep}<=1.05"] = v <= 1.05
            c = checks.get(f"rank_flops_contiguous_ep{ep}")
            if c is not None:
                passed[f"rank_flops_all_size_ep{ep}<contiguous"] = v < c
    for key in ("expert_load_cv", "group_load_cv"):  # MoHGE's balance vs the stock MoE's CV
        if m.get(key) is not None and base.get("expert_load_cv") is not None:
            checks[f"{key}_vs_stock_load_cv"] = m[key] - base["expert_load_cv"]
            passed[f"{key}<=stock_load_cv"] = m[key] <= base["expert_load_cv"]
    if ci:  # the seed-paired 95% interval of the loss ratio, not only its mean
        passed["heldout_loss_ratio_ci95<=1.01"] = ci[1] <= 1.01
    if lb:
        passed["layer_time<=equal_total"] = checks["layer_time_mohge_over_equal_total"] <= 1.0
    return {"figures": checks, "met": passed}


def _study_targets(study: dict) -> dict:
    """The paper's "parity at ~20% fewer params": parameter-efficiency ratio >= 1.2."""
    eff = (study.get("efficiency") or {}).get(f"mohge_vs_{study['baseline_kind']}", {})
    e = eff.get("total_params")
    if not e or e.get("geomean") is None:
        return {}
    figures = {"param_efficiency_total": e["geomean"]}
    met = {"param_efficiency>=1.2": e["geomean"] >= 1.2}
    if e.get("geomean_ci95"):
        figures["param_efficiency_total_ci95_low"] = e["geomean_ci95"][0]
        met["param_efficiency_ci95_low>=1.2"] = e["geomean_ci95"][0] >= 1.2
    return {"figures": figures, "met": met}


def run_bench(preset: Preset, out_dir: Path, *, names=None, data=None, tokenizer=None,
              seed=None, seeds=None, iters=None, jobs=None, layer_bench: bool = True,
              log=print, split_documents=None, json_keys=None) -> dict:
    """Train the preset's runs once per seed (seed-major order, so every finished seed is a
    complete paired comparison) and write ``results.json`` after each run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_list = resolve_seeds(preset, seeds, seed)
    jobs = jobs or preset.jobs
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: run at least one job at a time")
    identity = bench_identity(preset, names, data=data, tokenizer=tokenizer, seeds=seed_list,
                              iters=iters, layer_bench=layer_bench,
                              split_documents=split_documents, json_keys=json_keys)
    check_out_dir(out_dir, identity)  # before anything is written into --out
    tok = tokenizer or preset.base.get("data", {}).get("tokenizer", "byte")
    prefixes = resolve_data(list(data or []), tok, out_dir, log,
                            split_documents=split_documents, json_keys=json_keys)
    by_seed = {s: run_configs(preset, out_dir, names=names, data=prefixes or None,
                              tokenizer=tokenizer, seed=s, iters=iters) for s in seed_list}
    first = next(iter(by_seed[seed_list[0]].values()))
    if not prefixes:  # prepare the default corpus once, before the runs race for it
        from megatron_mohge.data import ensure_default_dataset, load_tokenizer

        ensure_default_dataset(first.data.cache_dir, load_tokenizer(first.data.tokenizer),
                               max_bytes=first.data.default_corpus_bytes)
    results = {"preset": preset.name, "description": preset.description,
               "seed": seed_list[0], "seeds": seed_list, "valid_seed": first.data.valid_seed,
               "baseline": preset.baseline, "kind": preset.kind, "nproc": preset.nproc,
               "jobs": jobs, "env": _env(), "runs": {}}
    results["config"] = identity
    names = list(by_seed[seed_list[0]])
    per_seed: dict[str, list[dict]] = {n: [] for n in names}
    queue = [(s, n, by_seed[s][n]) for s in seed_list for n in names]

    def nproc_of(run: RunConfig) -> int:
        return preset.nproc if run.parallel.expert_parallel > 1 or preset.nproc > 1 else 1

    t0 = time.perf_counter()
    for s, name, run, summary in train_runs(queue, nproc_of, out_dir, jobs, log):
        fig = run_figures(summary, run)
        fig["nproc"] = nproc_of(run)
        log(f"[bench] {name} seed {s}: held-out loss {fig['heldout_loss']:.4f} "
            f"({fig['wall_s']:.0f} s)")
        per_seed[name].append(fig)
        per_seed[name].sort(key=lambda f: seed_list.index(f["seed"]))
        results["runs"] = aggregate_runs(per_seed)
        results["comparisons"] = compare_runs(per_seed, preset.comparison_pairs(names))
        _write(out_dir, results)
    if preset.study:
        from megatron_mohge.bench.study import analyze

        results["study"] = analyze(results, preset.study)
    if layer_bench and preset.layer_bench:
        mohge = next((r.moe.mohge for r in by_seed[seed_list[0]].values()
                      if r.moe.kind == "mohge"), None)
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
    from megatron_mohge.training.health import dumps

    atomic_write(out_dir / "results.json", dumps(results, indent=1))


# ------------------------------------------------------------------ one bench per --out
def bench_identity(preset: Preset, names, *, data, tokenizer, seeds, iters,
                   layer_bench: bool, split_documents=None, json_keys=None) -> dict:
    """What makes two benches the same experiment, recorded in results.json["config"]: the
    command-line choices (None: the preset's default) and the preset's run configs."""
    return {"preset": preset.name, "seeds": list(seeds), "iters": iters, "tokenizer": tokenizer,
            "data": [str(Path(d).resolve()) for d in data or []],
            "split_documents": split_documents, "json_keys": json_keys,
            "layer_bench": bool(layer_bench), "runs": preset.run_dicts(names)}


def check_out_dir(out_dir: Path, identity: dict) -> None:
    """Refuse to mix results: an --out holding results.json of another bench (other seed,
    preset, runs, data or budget) stays as it is. Re-running the same bench replaces them."""
    path = out_dir / "results.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text()).get("config")
    except ValueError:
        old = None
    if old == json.loads(json.dumps(identity)):
        return
    if old is None:
        diff = "it has no record of its configuration"
    else:
        keys = [k for k in identity if k != "runs" and old.get(k) != identity[k]]
        diff = ", ".join(f"{k} {old.get(k)!r} -> {identity[k]!r}" for k in keys)
        if old.get("runs") != json.loads(json.dumps(identity["runs"])):
            diff += (", " if diff else "") + "run configs differ"
    raise ConfigError(f"--out {out_dir} already holds results.json of another bench ({diff}); "
                      "use another --out, or move that results.json away to replace it.")


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
