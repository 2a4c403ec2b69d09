"""Markdown tables and PNG plots from a benchmark ``results.json`` dict.

``markdown_report(results)`` gives a main table (one row per run, seed means, deltas in %
relative to ``results["baseline"]``), with several seeds the per-seed held-out losses and
the paired comparisons (ratio means and Student-t 95% intervals), a group-share table for
MoHGE runs, the scaling-study tables (``results["study"]``) and the layer-microbenchmark
table when ``results["layer_bench"]`` is present. ``write_plots(results, out_dir)`` writes
``loss_curves.png`` (one thin line per seed, the seed mean bold), ``group_share.png``,
``rank_load.png``, ``chosen_width_hist.png`` and ``study_loss_vs_params.png``, each only when
some run has its data. ``write_report`` does both (``results.md`` + plots).

Formatting lives in :mod:`.fmt`, the plots in :mod:`.plots`.
Optional keys may be missing throughout.

CLI: ``python -m megatron_mohge.cli.report results.json [--out DIR]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from megatron_mohge.bench.arms import DEFAULT_SHAPE
from megatron_mohge.bench.fmt import (
    DASH,
    as_number,
    fmt_count,
    fmt_float,
    md_table,
    with_delta,
)
from megatron_mohge.bench.plots import write_plots

PathLike = Union[str, Path]


def _mean_chosen_width(run: dict) -> Optional[float]:
    hist = run.get("chosen_width_hist") or {}
    w, f = hist.get("widths"), hist.get("fraction")
    if w and f and len(w) == len(f) and sum(f) > 0:
        return sum(a * b for a, b in zip(w, f)) / sum(f)
    curve = (run.get("curves") or {}).get("mean_chosen_width")
    if curve:
        return as_number(curve[-1])
    return None


# ---------------------------------------------------------------------------- markdown
def main_table(results: dict) -> str:
    runs: dict = results.get("runs") or {}
    base_name = results.get("baseline")
    base = runs.get(base_name) if base_name in runs else None
    has_rank = any(r.get("rank_flops") or r.get("rank_flops_max_over_mean") is not None
                   for r in runs.values())
    header = ["run", "kind", "total params", "routed params", "activated params/token",
              "activated routed/token", "held-out loss", "bits/byte", "ppl", "tokens/s", "peak mem MiB",
              "expert load CV", "load max/mean"]
    if has_rank:
        header += ["rank FLOPs max/mean all-size", "rank FLOPs max/mean contiguous"]
    rows = []
    for name, r in runs.items():
        is_base = r is base

        def col(key: str, text: str) -> str:
            return with_delta(text, r.get(key), None if base is None else base.get(key),
                              is_base) if base is not None else text

        dense = r.get("kind") == "dense"  # no routed experts: no expert load
        mem = as_number(r.get("peak_mem_bytes"))
        tps = as_number(r.get("train_tokens_per_s"))
        row = [
            f"**{name}**" if is_base else name,
            str(r.get("kind", DASH)),
            fmt_count(r.get("total_params")),
            col("routed_expert_params", fmt_count(r.get("routed_expert_params"))),
            col("activated_params_per_token", fmt_count(r.get("activated_params_per_token"))),
            col("activated_routed_params_per_token",
                fmt_count(r.get("activated_routed_params_per_token"))),
            col("heldout_loss", fmt_float(r.get("heldout_loss"), 4)),
            fmt_float(r.get("heldout_bits_per_byte"), 4),
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
    return md_table(header, rows)


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
    return md_table(header, rows)


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
    return md_table(header, rows)


def routing_table(results: dict) -> Optional[str]:
    """The routing diagnostics of each run (``routing_diagnostics.mean``, seed means)."""
    runs = {n: r["routing_diagnostics"]["mean"] for n, r in (results.get("runs") or {}).items()
            if (r.get("routing_diagnostics") or {}).get("mean")}
    if not runs:
        return None
    header = ["run", "same-group fraction", "in-group max prob", "weight gap",
              "gate grad group / expert", "max group share", "assignment share per group",
              "load CV 1st / 2nd half"]
    rows = []
    for name, d in runs.items():
        share = d.get("group_assignment_share")
        rows.append([name, fmt_float(d.get("same_group_fraction"), 3),
                     fmt_float(d.get("ingroup_max_prob"), 3), fmt_float(d.get("weight_gap"), 3),
                     fmt_float(d.get("gate_grad_ratio"), 3),
                     fmt_float(d.get("max_group_share"), 3),
                     " / ".join(f"{100 * s:.0f}%" for s in share) if share else DASH,
                     f"{fmt_float(d.get('expert_load_cv_first_half'), 3)} / "
                     f"{fmt_float(d.get('expert_load_cv_second_half'), 3)}"])
    return md_table(header, rows)


def layer_bench_rows(bench: dict) -> tuple[list[str], list[list[str]]]:
    """The layer-microbenchmark table's header and cells, one row per layer kind: rendered as
    markdown by :func:`layer_bench_table` and as fixed-width text by
    ``layer_bench.format_table``."""
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
        p10, p90 = as_number(k.get("p10_s")), as_number(k.get("p90_s"))
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
    return header, rows


def layer_bench_table(bench: dict) -> str:
    c = bench.get("config") or {}
    lines = []
    desc = ", ".join(f"{key}={c[key]}" for key in ("hidden_size", "tokens", "repeats", "warmup",
                                                   "dispatcher", "backend", "dtype") if key in c)
    if desc:
        lines.append(f"One MoE layer, forward + backward ({desc}); medians over interleaved "
                     "rounds, machine load not controlled.")
        lines.append("")
    lines.append(md_table(*layer_bench_rows(bench)))
    for note in layer_bench_notes(bench):
        lines += ["", note]
    return "\n".join(lines)


def layer_bench_notes(bench: dict) -> list[str]:
    """The sentences under the layer-bench table (both renderings): the median-time ratios
    and the plain matmul of the same FLOPs."""
    notes = []
    ratios = bench.get("ratios") or {}
    if ratios:
        notes.append("Median-time ratios: " + ", ".join(
            f"{n.replace('_', ' ')} = {fmt_float(v, 3)}" for n, v in ratios.items()))
    mm = bench.get("matmul")
    if mm:
        shape = " x ".join(map(str, mm["shape"]))
        notes.append(f"Plain matmul of the same FLOPs as MoHGE's experts ({shape}, fwd+bwd, "
                     f"same rounds): {fmt_float(mm.get('gflops'), 2)} GFLOP/s. Router "
                     f"share MoHGE minus equal-total stock: "
                     f"{fmt_float(bench.get('router_share_points_over_equal_total'), 1)} points.")
    return notes


def markdown_report(results: dict) -> str:
    """The report as markdown: main table, MoHGE group shares, layer microbenchmark."""
    meta = []
    if results.get("preset") is not None:
        meta.append(f"preset `{results['preset']}`")
    if results.get("shape") not in (None, DEFAULT_SHAPE):
        meta.append(f"layer shape `{results['shape']}`")
    tpp = (results.get("config") or {}).get("tokens_per_param")
    if tpp is not None:  # bench.budget: steps per size from the stock baseline's params
        steps = sorted({b["iters"] for b in (results.get("budget") or {}).values()})
        meta.append(f"{tpp:g} tokens per stock parameter ({', '.join(f'{s:,}' for s in steps)} "
                    "steps)")
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
    rt = routing_table(results)
    if rt:
        blocks += ["## Routing diagnostics",
                   "Is the router learning? Training log windows of the last quarter, means over "
                   "layers and seeds (load CV: each half of training). Same-group fraction: "
                   "tokens whose K picks share one group (renorm weights give the group gate no "
                   "LM gradient there). In-group max prob: 1/N_g is a flat expert gate. Weight "
                   "gap: max - min combine weight of the picks. Gate grad: mean norm of the "
                   "gate weights' gradient per backward pass.", rt]
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
        from megatron_mohge.bench.verdicts import verdict

        rows = [[k, verdict(v)] for k, v in targets.items()]
        blocks += ["## Targets", md_table(["target", "measured"], rows),
                   ", ".join(f"{k} = {fmt_float(v, 4)}" for k, v in figs.items())]
        if results["targets"].get("not_judged"):
            blocks.append(f"Loss targets not judged: {results['targets']['not_judged']}.")
    return "\n\n".join(blocks) + "\n"


def _ci(ci: Any, digits: int = 4) -> str:
    if not ci or len(ci) != 2 or as_number(ci[0]) is None:
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
        se = [x for x in (r.get("heldout_loss_se_per_seed") or []) if as_number(x) is not None]
        rows.append([name] + [fmt_float(x, 4) for x in per] + [""] * (len(seeds) - len(per))
                    + [fmt_float(sum(per) / len(per), 4) if per else DASH,
                       fmt_float(sum(se) / len(se), 4) if se else DASH,
                       str(r.get("heldout_tokens", DASH))])
    blocks = ["Held-out loss per seed (same held-out samples for every seed and run; "
              "eval SE: standard error over the held-out batches, the evaluation noise of one "
              "run's loss):",
              md_table(["run"] + [f"seed {s}" for s in seeds]
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
                   md_table(["figure", "ratio mean", "95% CI", "per seed"], crows)]
    return "\n\n".join(blocks)


def ablation_table(results: dict) -> Optional[str]:
    """The 2017 paper's balance table for runs that report CV(importance)."""
    runs = {n: r for n, r in (results.get("runs") or {}).items() if "importance_cv" in r}
    if not runs:
        return None
    rows = [[n, fmt_float(r.get("heldout_ppl"), 2), fmt_float(r.get("importance_cv"), 3),
             fmt_float(r.get("expert_load_cv"), 3), fmt_float(r.get("expert_load_max_over_mean"), 2)]
            for n, r in runs.items()]
    return md_table(["run", "held-out ppl", "CV(importance)", "CV(load)", "max/mean load"], rows)


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
