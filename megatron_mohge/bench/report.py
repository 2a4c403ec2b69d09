"""Markdown tables and PNG plots from a benchmark ``results.json`` dict.

``markdown_report(results)`` gives a main table (one row per run, seed means, deltas in %
relative to ``results["baseline"]``), with several seeds the per-seed held-out losses and
the paired comparisons (ratio means and Student-t 95% intervals), a group-share table for
MoHGE runs, the scaling-study tables (``results["study"]``) and the layer-microbenchmark
table when ``results["layer_bench"]`` is present. ``write_plots(results, out_dir)`` writes
``loss_curves.png`` (one thin line per seed, the seed mean bold), ``group_share.png``,
``rank_load.png``, ``chosen_width_hist.png`` and ``study_loss_vs_params.png``, each only when
some run has its data. ``write_report`` does both (``results.md`` + plots).

Plots use ``matplotlib.figure.Figure`` with the Agg canvas directly, so pyplot's global
backend is neither needed nor changed. Optional keys may be missing throughout.

CLI: ``python -m megatron_mohge.bench.report results.json [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Optional, Union

from megatron_mohge.util import numbers

PathLike = Union[str, Path]
DASH = "—"
PLOT_NAMES = ("loss_curves.png", "group_share.png", "rank_load.png", "chosen_width_hist.png",
              "balance.png")
STUDY_PLOT = "study_loss_vs_params.png"  # scaling-study presets only


# ---------------------------------------------------------------------------- formatting
def _num(v: Any) -> Optional[float]:
    """``v`` as a finite-or-nan float, or None when missing / not a number."""
    if v is None or isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def fmt_count(v: Any) -> str:
    """Parameter counts: 1.23B / 45.6M / 7.89K / 512."""
    x = _num(v)
    if x is None:
        return DASH
    if math.isnan(x):
        return "nan"
    return numbers.fmt_count(x, "report")


def fmt_float(v: Any, digits: int = 3, suffix: str = "") -> str:
    x = _num(v)
    if x is None:
        return DASH
    return f"{x:.{digits}f}{suffix}"


def fmt_delta(value: Any, base: Any) -> str:
    """Relative change ``value / base - 1`` in percent with sign, e.g. ``-18.8%``."""
    v, b = _num(value), _num(base)
    if v is None or b is None or b == 0 or math.isnan(v) or math.isnan(b):
        return ""
    return f"{(v / b - 1.0) * 100.0:+.1f}%"


def _with_delta(text: str, value: Any, base: Any, is_base: bool) -> str:
    if text == DASH:
        return text
    if is_base:
        return f"{text} (base)"
    d = fmt_delta(value, base)
    return f"{text} ({d})" if d else text


def _table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _mean_chosen_width(run: dict) -> Optional[float]:
    hist = run.get("chosen_width_hist") or {}
    w, f = hist.get("widths"), hist.get("fraction")
    if w and f and len(w) == len(f) and sum(f) > 0:
        return sum(a * b for a, b in zip(w, f)) / sum(f)
    curve = (run.get("curves") or {}).get("mean_chosen_width")
    if curve:
        return _num(curve[-1])
    return None


# ---------------------------------------------------------------------------- markdown
def main_table(results: dict) -> str:
    runs: dict = results.get("runs") or {}
    base_name = results.get("baseline")
    base = runs.get(base_name) if base_name in runs else None
    has_rank = any(r.get("rank_flops") or r.get("rank_flops_max_over_mean") is not None
                   for r in runs.values())
    header = ["run", "kind", "total params", "routed params", "activated params/token",
              "activated routed/token", "held-out loss", "ppl", "tokens/s", "peak mem MiB",
              "expert load CV", "load max/mean"]
    if has_rank:
        header += ["rank FLOPs max/mean all-size", "rank FLOPs max/mean contiguous"]
    rows = []
    for name, r in runs.items():
        is_base = r is base

        def col(key: str, text: str) -> str:
            return _with_delta(text, r.get(key), None if base is None else base.get(key),
                               is_base) if base is not None else text

        dense = r.get("kind") == "dense"  # no routed experts: no expert load
        mem = _num(r.get("peak_mem_bytes"))
        tps = _num(r.get("train_tokens_per_s"))
        row = [
            f"**{name}**" if is_base else name,
            str(r.get("kind", DASH)),
            fmt_count(r.get("total_params")),
            col("routed_expert_params", fmt_count(r.get("routed_expert_params"))),
            col("activated_params_per_token", fmt_count(r.get("activated_params_per_token"))),
            col("activated_routed_params_per_token",
                fmt_count(r.get("activated_routed_params_per_token"))),
            col("heldout_loss", fmt_float(r.get("heldout_loss"), 4)),
            fmt_float(r.get("heldout_ppl"), 2),
            DASH if tps is None else f"{tps:,.0f}",
            DASH if mem is None else f"{mem / 2 ** 20:.1f}",
            DASH if dense else fmt_float(r.get("expert_load_cv"), 3),
            DASH if dense else fmt_float(r.get("expert_load_max_over_mean"), 2),
        ]
        if has_rank:
            rf = r.get("rank_flops") or {}
            # stock experts have no all-size layout: only the contiguous column applies
            all_size = rf.get("all_size_max_over_mean")
            row += [fmt_float(all_size, 3), fmt_float(rf.get("contiguous_max_over_mean"), 3)]
        rows.append(row)
    return _table(header, rows)


def _flops(r: dict, key: str, ep: str) -> str:
    d = (r.get(key) or {}).get(ep) or {}
    a, c = d.get("all_size_max_over_mean"), d.get("contiguous_max_over_mean")
    return f"{fmt_float(a, 3)} / {fmt_float(c, 3)}"


def balance_table(results: dict) -> Optional[str]:
    runs = {n: r for n, r in (results.get("runs") or {}).items()
            if r.get("kind") != "dense" and "group_load_cv" in r}
    if not runs:
        return None
    eps = sorted({ep for r in runs.values() for ep in (r.get("rank_flops_by_ep") or {})}, key=int)
    header = ["run", "load CV held-out / train", "group CV held-out / train",
              "MaxVio micro held-out / train", "MaxVio batch (train)"]
    header += [f"rank FLOPs EP{ep} held-out" for ep in eps]
    header += [f"rank FLOPs EP{ep} train" for ep in eps]
    rows = []
    for name, r in runs.items():
        rows.append([name,
                     f"{fmt_float(r.get('expert_load_cv'), 3)} / "
                     f"{fmt_float(r.get('train_expert_load_cv'), 3)}",
                     f"{fmt_float(r.get('group_load_cv'), 3)} / "
                     f"{fmt_float(r.get('train_group_load_cv'), 3)}",
                     f"{fmt_float(r.get('maxvio_micro'), 2)} / "
                     f"{fmt_float(r.get('train_maxvio_micro'), 2)}",
                     fmt_float(r.get("train_maxvio_batch"), 2)]
                    + [_flops(r, "rank_flops_by_ep", ep) for ep in eps]
                    + [_flops(r, "train_rank_flops_by_ep", ep) for ep in eps])
    return _table(header, rows)


def group_share_table(results: dict) -> Optional[str]:
    runs = {n: r for n, r in (results.get("runs") or {}).items()
            if r.get("kind") == "mohge" and r.get("group_token_share")}
    if not runs:
        return None
    ng = max(len(r["group_token_share"]) for r in runs.values())
    header = ["run", "widths"] + [f"g{g}" for g in range(ng)] + ["mean chosen width"]
    rows = []
    for name, r in runs.items():
        share = list(r["group_token_share"])
        widths = r.get("widths")
        rows.append([name, "/".join(str(w) for w in widths) if widths else DASH]
                    + [f"{100 * s:.1f}%" for s in share] + [""] * (ng - len(share))
                    + [fmt_float(_mean_chosen_width(r), 1)])
    return _table(header, rows)


def layer_bench_table(bench: dict) -> str:
    c = bench.get("config") or {}
    kinds = bench.get("kinds") or {}
    header = ["layer kind", "E", "K", "width", "routed params", "activated routed/token",
              "median ms", "p10–p90 ms", "router ms", "router share"]
    gemm = any("expert_gflops" in k for k in kinds.values())
    if gemm:
        header += ["experts ms", "expert GFLOP/s", "vs matmul"]
    rows = []
    for kind, k in kinds.items():
        if k.get("widths"):
            width = f"{min(k['widths'])}..{max(k['widths'])}"
        else:
            width = str(k.get("width", DASH))
        p10, p90 = _num(k.get("p10_s")), _num(k.get("p90_s"))
        rows.append([
            kind, str(k.get("num_experts", DASH)), str(k.get("topk", DASH)), width,
            fmt_count(k.get("routed_expert_params")),
            fmt_count(k.get("activated_routed_params_per_token")),
            fmt_float(None if k.get("median_s") is None else 1e3 * k["median_s"], 2),
            DASH if p10 is None or p90 is None else f"{1e3 * p10:.2f}–{1e3 * p90:.2f}",
            fmt_float(None if k.get("router_s") is None else 1e3 * k["router_s"], 3),
            fmt_float(None if k.get("router_share") is None else 100 * k["router_share"], 1,
                      "%"),
        ] + ([fmt_float(None if k.get("expert_s") is None else 1e3 * k["expert_s"], 2),
              fmt_float(k.get("expert_gflops"), 2),
              fmt_float(k.get("expert_gflops_over_matmul"), 2)] if gemm else []))
    lines = []
    desc = ", ".join(f"{key}={c[key]}" for key in ("hidden_size", "tokens", "repeats", "warmup",
                                                   "dispatcher", "backend", "dtype") if key in c)
    if desc:
        lines.append(f"One MoE layer, forward + backward ({desc}); medians over interleaved "
                     "rounds, machine load not controlled.")
        lines.append("")
    lines.append(_table(header, rows))
    ratios = bench.get("ratios") or {}
    if ratios:
        lines.append("")
        lines.append("Median-time ratios: " + ", ".join(
            f"{n.replace('_', ' ')} = {fmt_float(v, 3)}" for n, v in ratios.items()))
    mm = bench.get("matmul")
    if mm:
        lines.append("")
        shape = " x ".join(map(str, mm["shape"]))
        lines.append(f"Plain matmul of the same FLOPs as MoHGE's experts ({shape}, fwd+bwd, "
                     f"same rounds): {fmt_float(mm.get('gflops'), 2)} GFLOP/s. Router "
                     f"share MoHGE minus equal-total stock: "
                     f"{fmt_float(bench.get('router_share_points_over_equal_total'), 1)} points.")
    return "\n".join(lines)


def markdown_report(results: dict) -> str:
    """The report as markdown: main table, MoHGE group shares, layer microbenchmark."""
    meta = []
    if results.get("preset") is not None:
        meta.append(f"preset `{results['preset']}`")
    seeds = results.get("seeds")
    if seeds and len(seeds) > 1:
        meta.append(f"{len(seeds)} seeds ({', '.join(map(str, seeds))}), figures are seed "
                    "means")
    elif results.get("seed") is not None:
        meta.append(f"seed {results['seed']}")
    if results.get("valid_seed") is not None:
        meta.append(f"held-out samples fixed by valid_seed {results['valid_seed']}")
    base = results.get("baseline")
    runs = results.get("runs") or {}
    if base in runs:
        meta.append(f"deltas relative to **{base}**")
    elif base is not None:
        meta.append(f"baseline `{base}` not among the runs: no deltas")
    blocks = ["# MoHGE benchmark"]
    if meta:
        blocks.append(", ".join(meta) + ".")
    blocks += ["## Runs", main_table(results) if runs else "_no runs_"]
    seeds_md = seed_tables(results)
    if seeds_md:
        blocks += ["## Seeds and paired comparisons", seeds_md]
    if results.get("study"):
        from megatron_mohge.bench.study import study_markdown

        blocks += ["## Scaling study", study_markdown(results["study"])]
    bt = balance_table(results)
    if bt:
        blocks += ["## Balance",
                   "Means over MoE layers. MaxVio = max expert load / mean - 1: per micro-batch "
                   "on one rank, and per global batch (training only). Group CV: expert load CV "
                   "inside each group. Rank FLOPs: max/mean of per-EP-rank expert FLOPs from the "
                   "measured counts, all-size allocation (MoHGE) / Megatron's contiguous layout. "
                   "*held-out*: routing of the final evaluation; *train*: log windows of the last "
                   "quarter of training.", bt]
    gs = group_share_table(results)
    if gs:
        blocks += ["## Group token share (MoHGE runs)",
                   "Share of the token-to-group selections per group (cheapest group first).", gs]
    abl = ablation_table(results)
    if abl:
        blocks += ["## Load-balancing ablation (Shazeer et al. 2017, Table 6 in miniature)",
                   "Held-out perplexity and the balance of the final evaluation's routing.", abl]
    if results.get("layer_bench"):
        blocks += ["## Layer microbenchmark", layer_bench_table(results["layer_bench"])]
    for backend, bench in (results.get("layer_bench_representative") or {}).items():
        blocks += [f"## Layer microbenchmark, representative shape, `{backend}` experts",
                   layer_bench_table(bench)]
    targets = (results.get("targets") or {}).get("met")
    if targets:
        figs = results["targets"].get("figures", {})
        rows = [[k, "met" if v else "**missed**"] for k, v in targets.items()]
        blocks += ["## Targets", _table(["target", "measured"], rows),
                   ", ".join(f"{k} = {fmt_float(v, 4)}" for k, v in figs.items())]
    return "\n\n".join(blocks) + "\n"


def _ci(ci: Any, digits: int = 4) -> str:
    if not ci or len(ci) != 2 or _num(ci[0]) is None:
        return DASH
    return f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def seed_tables(results: dict) -> Optional[str]:
    """Held-out loss per seed (with its evaluation standard error) and, per comparison, the
    paired ratios to the baseline: mean, 95% interval, per seed."""
    runs = results.get("runs") or {}
    seeds = results.get("seeds") or []
    if not any(r.get("heldout_loss_per_seed") for r in runs.values()):
        return None
    rows = []
    for name, r in runs.items():
        per = r.get("heldout_loss_per_seed") or []
        se = [x for x in (r.get("heldout_loss_se_per_seed") or []) if _num(x) is not None]
        rows.append([name] + [fmt_float(x, 4) for x in per] + [""] * (len(seeds) - len(per))
                    + [fmt_float(sum(per) / len(per), 4) if per else DASH,
                       fmt_float(sum(se) / len(se), 4) if se else DASH,
                       str(r.get("heldout_tokens", DASH))])
    blocks = ["Held-out loss per seed (same held-out samples for every seed and run; "
              "eval SE: standard error over the held-out batches, the evaluation noise of one "
              "run's loss):",
              _table(["run"] + [f"seed {s}" for s in seeds]
                     + ["mean", "eval SE", "held-out tokens"], rows)]
    for comp, c in (results.get("comparisons") or {}).items():
        crows = []
        for key in sorted(k[:-len("_ratio_mean")] for k in c if k.endswith("_ratio_mean")):
            per = c.get(f"{key}_ratio_per_seed") or []
            crows.append([key, fmt_float(c[f"{key}_ratio_mean"], 4),
                          _ci(c.get(f"{key}_ratio_ci95")), ", ".join(f"{x:.4f}" for x in per)])
        eval_se = c.get("loss_ratio_eval_se")
        note = (f" Evaluation noise of the loss ratio (SE over held-out batches, paired): "
                f"{', '.join(f'{x:.4f}' for x in eval_se)}." if eval_se else "")
        blocks += [f"**{comp.replace('_vs_', ' vs ')}**: ratios run / baseline, paired by "
                   f"seed; 95% interval mean ± t·sd/√n over {len(c.get('seeds', []))} seeds "
                   f"(— with one seed).{note}",
                   _table(["figure", "ratio mean", "95% CI", "per seed"], crows)]
    return "\n\n".join(blocks)


def ablation_table(results: dict) -> Optional[str]:
    """The 2017 paper's balance table for runs that report CV(importance)."""
    runs = {n: r for n, r in (results.get("runs") or {}).items() if "importance_cv" in r}
    if not runs:
        return None
    rows = [[n, fmt_float(r.get("heldout_ppl"), 2), fmt_float(r.get("importance_cv"), 3),
             fmt_float(r.get("expert_load_cv"), 3), fmt_float(r.get("expert_load_max_over_mean"), 2)]
            for n, r in runs.items()]
    return _table(["run", "held-out ppl", "CV(importance)", "CV(load)", "max/mean load"], rows)


# ---------------------------------------------------------------------------- plots
def _figure(n_panels: int, width_each: float = 5.0, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, width_each * n_panels), height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    return fig, list(axes)


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def _loss_runs(runs: dict) -> dict:
    """run -> (mean curves, [per-seed curves]) for runs with loss curves."""
    out = {}
    for name, r in runs.items():
        c = r.get("curves") or {}
        if c.get("train_loss") or c.get("eval_loss"):
            per = [f.get("curves") or {} for f in r.get("per_seed") or []]
            out[name] = (c, per if len(per) > 1 else [], r)
    return out


def plot_loss_curves(runs: dict, path: Path) -> Optional[Path]:
    data = _loss_runs(runs)
    if not data:
        return None
    fig, (ax,) = _figure(1, 7.0, 4.2)
    for i, (name, (c, per_seed, r)) in enumerate(data.items()):
        color = f"C{i % 10}"
        for pc in per_seed:  # the spread: one thin line per seed
            tl = pc.get("train_loss") or []
            it = pc.get("iteration") or list(range(1, len(tl) + 1))
            ax.plot(it[:len(tl)], tl[:len(it)], color=color, lw=0.6, alpha=0.35)
        tl = c.get("train_loss") or []
        if tl:
            it = c.get("iteration") or list(range(1, len(tl) + 1))
            label = f"{name} train" + (f" (mean of {len(per_seed)} seeds)" if per_seed else "")
            ax.plot(it[:len(tl)], tl[:len(it)], color=color, lw=1.4, label=label)
        el = c.get("eval_loss") or []
        if el:
            ei = c.get("eval_iteration") or list(range(1, len(el) + 1))
            ax.plot(ei[:len(el)], el[:len(ei)], color=color, lw=1.6, ls="--", marker="o",
                    ms=3, label=f"{name} eval")
        final = [x for x in (r.get("heldout_loss_per_seed") or []) if _num(x) is not None]
        if len(final) > 1 and el:  # the final held-out loss: seed mean and 95% interval
            from megatron_mohge.bench.stats import mean_ci

            m = mean_ci(final)
            x = (c.get("eval_iteration") or [len(el)])[-1]
            ax.errorbar([x], [m["mean"]], yerr=[[m["mean"] - m["ci"][0]], [m["ci"][1] - m["mean"]]],
                        color=color, capsize=4, lw=1.5)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title("Training (solid; thin: seeds) and held-out (dashed; bar: 95% CI) loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_group_share(runs: dict, path: Path) -> Optional[Path]:
    data = {n: r for n, r in runs.items()
            if r.get("kind") == "mohge" and (r.get("curves") or {}).get("group_share")}
    if not data:
        return None
    fig, axes = _figure(len(data))
    for ax, (name, r) in zip(axes, data.items()):
        c = r["curves"]
        share = [list(row) for row in c["group_share"]]
        ng = max(len(row) for row in share)
        share = [row + [0.0] * (ng - len(row)) for row in share]
        it = c.get("group_share_iteration") or c.get("iteration") or []
        if len(it) != len(share):
            it = list(range(1, len(share) + 1))
        widths = r.get("widths") or []
        labels = [f"g{g} (W={widths[g]})" if g < len(widths) else f"g{g}" for g in range(ng)]
        ys = [[row[g] for row in share] for g in range(ng)]
        cmap = _cmap("viridis")
        colors = [cmap(g / max(1, ng - 1)) for g in range(ng)]
        ax.stackplot(it, ys, labels=labels, colors=colors, alpha=0.9)
        if len(it) > 1:
            ax.set_xlim(it[0], it[-1])
        ax.set_ylim(0, max(1.0, max(sum(row) for row in share)))
        ax.set_xlabel("iteration")
        ax.set_ylabel("group token share")
        ax.set_title(name)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def _cmap(name: str):
    import matplotlib

    return matplotlib.colormaps[name]


def plot_rank_load(runs: dict, path: Path) -> Optional[Path]:
    data = {}
    for name, r in runs.items():
        rf = r.get("rank_flops") or {}
        rows, labels = [], []
        for key, label in (("all_size", "all-size"), ("contiguous", "contiguous")):
            vals = [float(v) for v in (rf.get(key) or [])]
            if vals and sum(vals) > 0:
                mean = sum(vals) / len(vals)
                rows.append([v / mean for v in vals])
                labels.append(label)
        if rows and len({len(row) for row in rows}) == 1:
            data[name] = (rows, labels)
    if not data:
        return None
    fig, axes = _figure(len(data), 5.0, 2.2 + 0.5 * max(len(v[0]) for v in data.values()))
    vmax = max(max(max(row) for row in rows) for rows, _ in data.values())
    vmin = min(min(min(row) for row in rows) for rows, _ in data.values())
    span = max(vmax - 1.0, 1.0 - vmin, 0.05)
    im = None
    for ax, (name, (rows, labels)) in zip(axes, data.items()):
        im = ax.imshow(rows, cmap=_cmap("coolwarm"), vmin=1.0 - span, vmax=1.0 + span,
                       aspect="auto")
        ax.set_yticks(range(len(labels)), labels)
        ax.set_xticks(range(len(rows[0])), [str(i) for i in range(len(rows[0]))])
        ax.set_xlabel("EP rank")
        ax.set_title(f"{name}: expert FLOPs / mean")
        for i, row in enumerate(rows):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="white" if abs(v - 1.0) > 0.6 * span else "black")
    fig.colorbar(im, ax=axes, shrink=0.8)
    return _save(fig, path)


def plot_chosen_width_hist(runs: dict, path: Path) -> Optional[Path]:
    data = {}
    for name, r in runs.items():
        h = r.get("chosen_width_hist") or {}
        w, f = h.get("widths") or [], h.get("fraction") or []
        if w and len(w) == len(f):
            data[name] = (list(w), list(f))
    if not data:
        return None
    fig, axes = _figure(len(data), 4.5)
    for i, (ax, (name, (w, f))) in enumerate(zip(axes, data.items())):
        xs = range(len(w))
        ax.bar(xs, f, color=f"C{i % 10}")
        ax.set_xticks(list(xs), [str(x) for x in w], fontsize=7)
        ax.set_xlabel("chosen expert width")
        ax.set_ylabel("fraction of assignments")
        mean = sum(a * b for a, b in zip(w, f)) / sum(f) if sum(f) > 0 else float("nan")
        ax.set_title(f"{name} (mean {mean:.1f})")
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def plot_balance(runs: dict, path: Path) -> Optional[Path]:
    """Balance over training: global-batch MaxVio and EP=2 rank FLOPs max/mean per run."""
    data = {n: r["curves"] for n, r in runs.items()
            if any(v is not None for v in (r.get("curves") or {}).get("maxvio_batch") or [])}
    if not data:
        return None
    fig, axes = _figure(2, 5.5, 3.8)
    for i, (name, c) in enumerate(data.items()):
        it = c.get("iteration") or []
        for ax, key in zip(axes, ("maxvio_batch", "rank_flops_ep2")):
            pts = [(x, y) for x, y in zip(it, c.get(key) or []) if y is not None]
            if pts:
                ax.plot(*zip(*pts), color=f"C{i % 10}", lw=1.3, label=name)
    axes[0].set_title("MaxVio of the global batch")
    axes[1].set_title("rank FLOPs max/mean, EP=2\n(all-size for MoHGE, contiguous for stock)")
    axes[1].axhline(1.05, color="gray", lw=0.8, ls=":")
    for ax in axes:
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def write_plots(results: dict, out_dir: PathLike) -> list[Path]:
    """Write the PNGs that have data into ``out_dir``; return their paths (in
    ``PLOT_NAMES`` order). Plots without data are skipped, not written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = results.get("runs") or {}
    written = []
    for fname, fn in zip(PLOT_NAMES, (plot_loss_curves, plot_group_share, plot_rank_load,
                                      plot_chosen_width_hist, plot_balance)):
        p = fn(runs, out / fname)
        if p is not None:
            written.append(p)
    if results.get("study"):
        from megatron_mohge.bench.study import plot_study

        p = plot_study(results["study"], out / STUDY_PLOT)
        if p is not None:
            written.append(p)
    return written


def write_report(results: dict, out_dir: PathLike) -> dict[str, Path]:
    """Write ``results.md`` and the plots into ``out_dir``; returns ``{file name: path}``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "results.md"
    md.write_text(markdown_report(results))
    paths = {"results.md": md}
    for p in write_plots(results, out):
        paths[p.name] = p
    return paths


def main(argv: Optional[list] = None) -> dict[str, Path]:
    p = argparse.ArgumentParser(prog="python -m megatron_mohge.bench.report",
                                description="Markdown report and plots from results.json")
    p.add_argument("results", type=Path, help="results.json of the end-to-end benchmark")
    p.add_argument("--out", type=Path, help="output folder (default: the JSON's folder)")
    args = p.parse_args(argv)
    results = json.loads(args.results.read_text())
    paths = write_report(results, args.out or args.results.parent)
    for p_ in paths.values():
        print(p_)
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
