"""The plots researchers ask of a bench (``write_research_plots``), beside :mod:`.plots`:

* ``rank_load_per_layer.png`` -- expert FLOPs per EP rank / mean, per MoE layer, at EP 2, 4
  and 8 (``rank_load.png`` averages the per-rank vectors over layers, which hides which rank
  is hot in which layer and understates the imbalance each step waits for);
* ``loss_ratio.png`` -- the held-out loss ratio run / baseline per seed with the paired 95%
  interval, and the training loss against training FLOPs (6 x activated params x tokens);
* ``loss_by_width.png`` -- held-out loss of the tokens grouped by the width of their top-1
  expert: do easy tokens go to narrow experts, as the MoHGE paper reports?

and :func:`mark_group_loss_start`, the group-loss switch-on marker of the loss curves. Each
plot is written only when some run has its data (benches before these fields existed have
the loss ratios only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_mohge.bench.fmt import as_number
from megatron_mohge.bench.canvas import colormap, new_figure, save_figure

RESEARCH_PLOTS = ("rank_load_per_layer.png", "loss_ratio.png", "loss_by_width.png")
EPS = ("2", "4", "8")


def mark_group_loss_start(ax, runs: dict) -> None:
    """A dotted vertical line where each run's group loss switches on
    (``group_loss_start_iteration``: ``losses.group_start_fraction`` x iters, when > 0)."""
    starts: dict = {}
    for name, r in runs.items():
        it = as_number(r.get("group_loss_start_iteration"))
        if it is not None:
            starts.setdefault(it, []).append(name)
    for it, names in starts.items():
        ax.axvline(it, color="gray", lw=0.9, ls=":",
                   label=f"group loss on ({', '.join(names)})")


# ----------------------------------------------------------------- per-layer rank load
def _layout(r: dict) -> Optional[str]:
    per = r.get("rank_flops_per_layer") or {}
    names = {name for ep in per.values() for name in ep}
    if not names:
        return None
    return "all_size" if "all_size" in names else "contiguous"


def plot_rank_load_per_layer(runs: dict, path: Path) -> Optional[Path]:
    """One row per run, one panel per EP size: layers x ranks, FLOPs / mean (seed means);
    the row labels carry each layer's max/mean, the title their mean and the layer-mean
    vector's max (what ``rank_load.png`` shows)."""
    data = {n: (r["rank_flops_per_layer"], _layout(r)) for n, r in runs.items()
            if _layout(r) is not None}
    if not data:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n_layers = max(len(per[ep][lay]["ranks"]) for per, lay in data.values() for ep in per)
    fig = Figure(figsize=(4.6 * len(EPS), (1.2 + 0.45 * n_layers) * len(data)),
                 layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.subplots(len(data), len(EPS), squeeze=False)
    for row, (name, (per, lay)) in zip(grid, data.items()):
        for ax, ep in zip(row, EPS):
            d = (per.get(ep) or {}).get(lay)
            if not d or not d["ranks"]:
                ax.set_axis_off()
                continue
            ranks = [[float(v) for v in r_] for r_ in d["ranks"]]
            span = max(max(abs(v - 1.0) for r_ in ranks for v in r_), 0.05)
            im = ax.imshow(ranks, cmap=colormap("coolwarm"), vmin=1 - span, vmax=1 + span,
                           aspect="auto")
            mom = [float(m) for m in d["max_over_mean"]]
            ax.set_yticks(range(len(ranks)), [f"MoE layer {i + 1}: {m:.2f}"
                                              for i, m in enumerate(mom)], fontsize=7)
            ax.set_xticks(range(len(ranks[0])), [str(i) for i in range(len(ranks[0]))],
                          fontsize=7)
            ax.set_xlabel("EP rank")
            flat = [sum(col) / len(col) for col in zip(*ranks)]
            ax.set_title(f"{name}, EP{ep} {lay.replace('_', '-')}: per-layer max/mean "
                         f"{sum(mom) / len(mom):.3f}\n(layer-mean vector: {max(flat):.3f})",
                         fontsize=8)
            fig.colorbar(im, ax=ax, shrink=0.8)
    return save_figure(fig, path)


# ----------------------------------------------------------------- loss ratio and FLOPs
def _tokens_per_step(results: dict, name: str, r: dict) -> Optional[float]:
    """Recorded by the bench; for older results from the run config it recorded."""
    if as_number(r.get("tokens_per_step")) is not None:
        return float(r["tokens_per_step"])
    cfg = ((results.get("config") or {}).get("runs") or {}).get(name) or {}
    gbs = (cfg.get("train") or {}).get("global_batch_size")
    seq = (cfg.get("model") or {}).get("seq_length")
    return float(gbs * seq) if as_number(gbs) is not None and as_number(seq) is not None else None


def plot_loss_ratio(results: dict, path: Path) -> Optional[Path]:
    """Left: per comparison, the per-seed held-out loss ratios (dots) and their mean with
    the paired 95% interval. Right: training loss vs training FLOPs, 6 x activated params
    per token x tokens (attention's sequence-length term left out), with the held-out loss
    at the end."""
    comps = {k: c for k, c in (results.get("comparisons") or {}).items()
             if c.get("loss_ratio_per_seed")}
    runs = results.get("runs") or {}
    flops = {}
    for name, r in runs.items():
        tps = _tokens_per_step(results, name, r)
        act = as_number(r.get("activated_params_per_token"))
        c = r.get("curves") or {}
        if tps and act and c.get("train_loss") and c.get("iteration"):
            flops[name] = (6.0 * act * tps, c)
    if not comps and not flops:
        return None
    fig, axes = new_figure(int(bool(comps)) + int(bool(flops)), 5.5, 4.0)
    if comps:
        ax = axes[0]
        for i, (key, c) in enumerate(comps.items()):
            per = [float(x) for x in c["loss_ratio_per_seed"]]
            ax.scatter([i] * len(per), per, color="C0", s=14, alpha=0.6, zorder=3)
            mean, ci = as_number(c.get("loss_ratio_mean")), c.get("loss_ratio_ci95")
            if mean is not None and ci and as_number(ci[0]) is not None:
                ax.errorbar([i + 0.15], [mean], yerr=[[mean - ci[0]], [ci[1] - mean]],
                            color="C3", capsize=4, marker="o", ms=4)
            elif mean is not None:
                ax.plot([i + 0.15], [mean], "o", color="C3", ms=4)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(1.01, color="gray", lw=0.8, ls=":", label="+1% (target)")
        ax.set_xticks(range(len(comps)), [k.replace("_vs_", "\nvs ") for k in comps],
                      fontsize=7)
        ax.set_ylabel("held-out loss, run / baseline")
        ax.set_title("Loss ratio per seed (dots), mean and paired 95% CI", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    if flops:
        ax = axes[-1]
        for i, (name, (per_step, c)) in enumerate(flops.items()):
            it, tl = c["iteration"], c["train_loss"]
            pts = [(x * per_step, y) for x, y in zip(it, tl) if as_number(y) is not None]
            if pts:
                ax.plot(*zip(*pts), color=f"C{i % 10}", lw=1.2, label=name)
            final = as_number(runs[name].get("heldout_loss"))
            if final is not None:
                ax.plot([it[-1] * per_step], [final], "o", color=f"C{i % 10}", ms=4)
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs (6 x activated params x tokens)")
        ax.set_ylabel("loss")
        ax.set_title("Training loss (line) and held-out loss (dot) vs compute", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path)


# ----------------------------------------------------------------- loss by chosen width
def plot_loss_by_width(runs: dict, path: Path) -> Optional[Path]:
    """Per run with several widths: mean held-out loss of the tokens whose top-1 expert
    has each width (bars: all MoE layers; dots: each seed; thin lines: each layer), with
    the share of tokens above each bar."""
    data = {n: r["heldout_loss_by_width"] for n, r in runs.items()
            if len((r.get("heldout_loss_by_width") or {}).get("widths") or []) > 1}
    if not data:
        return None
    fig, axes = new_figure(len(data), 5.0, 4.0)
    for ax, (name, d) in zip(axes, data.items()):
        widths = d["widths"]
        xs = list(range(len(widths)))
        mean = [as_number(v) for v in d["mean_loss"]]
        ax.bar([x for x, m in zip(xs, mean) if m is not None], [m for m in mean if m is not None],
               color="C0", alpha=0.6, label="all MoE layers")
        shown = [m for m in mean if m is not None]
        for layer in d.get("layers") or []:
            pts = [(x, as_number(v)) for x, v in zip(xs, layer["mean_loss"])
                   if as_number(v) is not None]
            if pts:
                ax.plot(*zip(*pts), color="gray", lw=0.7, alpha=0.7)
                shown += [y for _, y in pts]
        for f in runs[name].get("per_seed") or []:
            s = (f.get("heldout_loss_by_width") or {}).get("mean_loss") or []
            pts = [(x, as_number(v)) for x, v in zip(xs, s) if as_number(v) is not None]
            if pts:
                ax.scatter(*zip(*pts), color="C3", s=10, zorder=3)
                shown += [y for _, y in pts]
        for x, m, share in zip(xs, mean, d.get("token_share") or []):
            if m is not None:
                ax.text(x, m, f"{100 * share:.0f}%", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(xs, [str(w) for w in widths])
        lo, hi = min(shown), max(shown)
        pad = 0.1 * (hi - lo) or 0.05 * hi
        ax.set_ylim(lo - pad, hi + pad)  # losses differ by a few %: a bar from 0 hides it
        ax.set_xlabel("width of the token's top-1 expert")
        ax.set_ylabel("mean held-out loss of those tokens")
        ax.set_title(f"{name}: easy tokens to narrow experts?\n(labels: share of tokens; "
                     "gray: each layer; red: each seed)", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def write_research_plots(results: dict, out_dir: Path) -> list[Path]:
    """Write the plots above that have data into ``out_dir``; their paths, in order."""
    runs = results.get("runs") or {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    made = (plot_rank_load_per_layer(runs, out / RESEARCH_PLOTS[0]),
            plot_loss_ratio(results, out / RESEARCH_PLOTS[1]),
            plot_loss_by_width(runs, out / RESEARCH_PLOTS[2]))
    return [p for p in made if p is not None]


__all__ = ["RESEARCH_PLOTS", "mark_group_loss_start", "plot_rank_load_per_layer",
           "plot_loss_ratio", "plot_loss_by_width", "write_research_plots"]
