"""PNG plots of a benchmark ``results.json`` dict (``write_plots``).

``loss_curves.png`` (one thin line per seed, the seed mean bold, the group loss's switch-on
dotted), ``group_share.png``,
``rank_load.png``, ``chosen_width_hist.png``, ``balance.png``, ``routing.png`` (is the
router learning: same-group picks, gate gradients, group collapse, load CV) and, for scaling
studies,
``study_loss_vs_params.png``, each only when some run has its data; and the research plots
of :mod:`.plots_research` (per-layer rank load, loss ratio and loss vs FLOPs, loss by chosen
width). Plots use
``matplotlib.figure.Figure`` with the Agg canvas directly, so pyplot's global backend is
neither needed nor changed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from megatron_mohge.bench.canvas import colormap, new_figure, save_figure
from megatron_mohge.bench.fmt import as_number

PathLike = Union[str, Path]
PLOT_NAMES = ("loss_curves.png", "group_share.png", "rank_load.png", "chosen_width_hist.png",
              "balance.png", "routing.png")
STUDY_PLOT = "study_loss_vs_params.png"  # scaling-study presets only


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
    fig, (ax,) = new_figure(1, 7.0, 4.2)
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
        final = [x for x in (r.get("heldout_loss_per_seed") or []) if as_number(x) is not None]
        if len(final) > 1 and el:  # the final held-out loss: seed mean and 95% interval
            from megatron_mohge.bench.stats import mean_ci

            m = mean_ci(final)
            x = (c.get("eval_iteration") or [len(el)])[-1]
            ax.errorbar([x], [m["mean"]], yerr=[[m["mean"] - m["ci"][0]], [m["ci"][1] - m["mean"]]],
                        color=color, capsize=4, lw=1.5)
    from megatron_mohge.bench.plots_research import mark_group_loss_start

    mark_group_loss_start(ax, runs)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss")
    ax.set_title("Training (solid; thin: seeds) and held-out (dashed; bar: 95% CI) loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_group_share(runs: dict, path: Path) -> Optional[Path]:
    data = {n: r for n, r in runs.items()
            if r.get("kind") == "mohge" and (r.get("curves") or {}).get("group_share")}
    if not data:
        return None
    fig, axes = new_figure(len(data))
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
        cmap = colormap("viridis")
        colors = [cmap(g / max(1, ng - 1)) for g in range(ng)]
        ax.stackplot(it, ys, labels=labels, colors=colors, alpha=0.9)
        if len(it) > 1:
            ax.set_xlim(it[0], it[-1])
        ax.set_ylim(0, max(1.0, max(sum(row) for row in share)))
        ax.set_xlabel("iteration")
        ax.set_ylabel("group token share")
        ax.set_title(name)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(fig, path)


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
    fig, axes = new_figure(len(data), 5.0, 2.2 + 0.5 * max(len(v[0]) for v in data.values()))
    vmax = max(max(max(row) for row in rows) for rows, _ in data.values())
    vmin = min(min(min(row) for row in rows) for rows, _ in data.values())
    span = max(vmax - 1.0, 1.0 - vmin, 0.05)
    im = None
    for ax, (name, (rows, labels)) in zip(axes, data.items()):
        im = ax.imshow(rows, cmap=colormap("coolwarm"), vmin=1.0 - span, vmax=1.0 + span,
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
    return save_figure(fig, path)


def plot_chosen_width_hist(runs: dict, path: Path) -> Optional[Path]:
    data = {}
    for name, r in runs.items():
        h = r.get("chosen_width_hist") or {}
        w, f = h.get("widths") or [], h.get("fraction") or []
        if w and len(w) == len(f):
            data[name] = (list(w), list(f))
    if not data:
        return None
    fig, axes = new_figure(len(data), 4.5)
    for i, (ax, (name, (w, f))) in enumerate(zip(axes, data.items())):
        xs = range(len(w))
        ax.bar(xs, f, color=f"C{i % 10}")
        ax.set_xticks(list(xs), [str(x) for x in w], fontsize=7)
        ax.set_xlabel("chosen expert width")
        ax.set_ylabel("fraction of assignments")
        mean = sum(a * b for a, b in zip(w, f)) / sum(f) if sum(f) > 0 else float("nan")
        ax.set_title(f"{name} (mean {mean:.1f})")
        ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def plot_balance(runs: dict, path: Path) -> Optional[Path]:
    """Balance over training: global-batch MaxVio and EP=2 rank FLOPs max/mean per run."""
    data = {n: r["curves"] for n, r in runs.items()
            if any(v is not None for v in (r.get("curves") or {}).get("maxvio_batch") or [])}
    if not data:
        return None
    fig, axes = new_figure(2, 5.5, 3.8)
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
    return save_figure(fig, path)


def plot_routing(runs: dict, path: Path) -> Optional[Path]:
    """Routing diagnostics over training (seed means, layer means): same-group fraction and
    group/expert gate gradient ratio (MoHGE), the largest group's share of assignments, and
    the expert-load CV (every run)."""
    data = {n: r["curves"] for n, r in runs.items()
            if any(v is not None for v in (r.get("curves") or {}).get("expert_load_cv") or [])}
    if not data:
        return None
    fig, axes = new_figure(4, 4.2, 3.6)
    panels = (("same-group fraction (K picks in one group)", "same_group_fraction"),
              ("gate gradient norm, group / expert", "gate_ratio"),
              ("largest group's share of assignments", "max_group_share"),
              ("expert load CV (training windows)", "expert_load_cv"))
    for i, (name, c) in enumerate(data.items()):
        it = c.get("iteration") or []
        g, e = c.get("diag_group_gate_grad_norm") or [], c.get("diag_expert_gate_grad_norm") or []
        series = {"same_group_fraction": c.get("diag_same_group_fraction") or [],
                  "gate_ratio": [a / b if a is not None and b else None for a, b in zip(g, e)],
                  "max_group_share": c.get("diag_max_group_share") or [],
                  "expert_load_cv": c.get("expert_load_cv") or []}
        for ax, (_, key) in zip(axes, panels):
            pts = [(x, y) for x, y in zip(it, series[key]) if isinstance(y, (int, float))]
            if pts:
                ax.plot(*zip(*pts), color=f"C{i % 10}", lw=1.3, label=name)
    for ax, (title, key) in zip(axes, panels):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if key == "gate_ratio":
            ax.set_yscale("log")
    axes[-1].legend(fontsize=7)
    return save_figure(fig, path)


def write_plots(results: dict, out_dir: PathLike) -> list[Path]:
    """Write the PNGs that have data into ``out_dir``; return their paths (in
    ``PLOT_NAMES`` order). Plots without data are skipped, not written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = results.get("runs") or {}
    written = []
    for fname, fn in zip(PLOT_NAMES, (plot_loss_curves, plot_group_share, plot_rank_load,
                                      plot_chosen_width_hist, plot_balance, plot_routing)):
        p = fn(runs, out / fname)
        if p is not None:
            written.append(p)
    from megatron_mohge.bench.plots_research import write_research_plots

    written += write_research_plots(results, out)
    if results.get("study"):
        from megatron_mohge.bench.study import plot_study

        p = plot_study(results["study"], out / STUDY_PLOT)
        if p is not None:
            written.append(p)
    return written
