"""Scaling study: held-out loss vs parameters for stock MoE and MoHGE at several sizes.

``analyze(results, spec)`` turns a study preset's ``results["runs"]`` (seed means and
per-seed figures, :mod:`megatron_mohge.bench.e2e`) into ``results["study"]``: per kind and
size the parameter counts and the loss (mean, per seed, Student-t 95% interval); per x axis
(total params, activated params per token) a fit ``loss = c + d ln N`` per kind; and the
**parameter-efficiency ratio** -- stock params needed (on the stock fit) to reach MoHGE's
loss / MoHGE's params -- per size and as the geometric mean over sizes, with a bootstrap
interval over seeds (:func:`megatron_mohge.bench.stats.bootstrap_efficiency`).
``study_markdown`` and ``plot_study`` render it.

Why log-linear: three or four sizes spanning 4-10x cannot identify the three parameters of a
saturating power law ``a + b N^-alpha``; over such a range it is indistinguishable from its
tangent in ln N. The fit is used only to interpolate between measured stock sizes (ratios
that need extrapolation are flagged).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_mohge.bench import stats
from megatron_mohge.util import numbers

AXES = {"total_params": "total params",
        "activated_params_per_token": "activated params / token"}
PLATEAU_TAIL = 0.2  # plateau figure: train-loss drop over the last 20% of the steps


def _tail_drop(curves: dict) -> Optional[float]:
    """Relative train-loss drop over the last PLATEAU_TAIL of the logged steps (0 = flat)."""
    it, loss = curves.get("iteration") or [], curves.get("train_loss") or []
    if len(it) < 2 or len(loss) != len(it):
        return None
    cut = it[-1] - PLATEAU_TAIL * it[-1]
    i = min(range(len(it)), key=lambda j: abs(it[j] - cut))
    if i == len(it) - 1 or not loss[i]:
        return None
    return (loss[i] - loss[-1]) / loss[i]


def analyze(results: dict, spec: dict, *, bootstrap_samples: int = 2000) -> dict:
    """``results["study"]`` from the runs of a study preset (see the module docstring)."""
    runs = results.get("runs") or {}
    base_kind, kinds, sizes = spec["baseline_kind"], spec["kinds"], spec["sizes"]
    seeds = list(results.get("seeds") or [])
    table: dict = {}
    for kind in kinds:
        rows = {key: [] for key in ("sizes", "runs", "total_params",
                                    "activated_params_per_token", "loss_mean", "loss_ci95",
                                    "loss_per_seed", "seeds", "tail_drop")}
        for size in sizes:
            name = next((n for n, m in spec["runs"].items()
                         if m["kind"] == kind and m["size"] == size), None)
            r = runs.get(name)
            if r is None:
                continue
            per_seed = r.get("heldout_loss_per_seed") or [r["heldout_loss"]]
            ci = stats.mean_ci(per_seed)
            rows["sizes"].append(size)
            rows["runs"].append(name)
            rows["total_params"].append(r["total_params"])
            rows["activated_params_per_token"].append(r["activated_params_per_token"])
            rows["loss_mean"].append(ci["mean"])
            rows["loss_ci95"].append(ci["ci"])
            rows["loss_per_seed"].append(per_seed)
            rows["seeds"].append(r.get("seeds") or seeds[:len(per_seed)])
            drops = [_tail_drop(f.get("curves") or {}) for f in r.get("per_seed") or [r]]
            drops = [d for d in drops if d is not None]
            rows["tail_drop"].append(numbers.mean(drops) if drops else None)
        if rows["sizes"]:  # kinds not trained (control arms not asked for) are left out
            table[kind] = rows
    out = {"fit_form": "loss = c + d*ln(N)", "baseline_kind": base_kind, "kinds": table,
           "fits": {}, "efficiency": {}, "plateau_tail": PLATEAU_TAIL}
    for axis in AXES:
        out["fits"][axis] = {k: stats.fit_log_linear(t[axis], t["loss_mean"])
                             for k, t in table.items() if len(set(t[axis])) >= 2}
    base = table.get(base_kind)
    if base is None or len(base["sizes"]) < 2:
        return out
    for kind, t in table.items():
        if kind == base_kind or not t["sizes"]:
            continue
        for axis in AXES:
            eff = stats.efficiency_ratio(base[axis], base["loss_mean"], t[axis], t["loss_mean"])
            eff.pop("stock_fit")
            common = _common_seeds(base, t)
            if len(common) >= 2:
                boot = stats.bootstrap_efficiency(
                    base[axis], _by_seed(base, common), t[axis], _by_seed(t, common),
                    samples=bootstrap_samples)
                eff["geomean_ci95"] = boot["geomean_ci"]
                eff["per_size_ci95"] = boot["per_size_ci"]
                eff["bootstrap"] = {k: boot[k] for k in ("samples", "undefined", "seeds")}
            out["efficiency"].setdefault(f"{kind}_vs_{base_kind}", {})[axis] = eff
    return out


def _common_seeds(a: dict, b: dict) -> list:
    sets = [set(s) for s in a["seeds"] + b["seeds"]]
    common = set.intersection(*sets) if sets else set()
    return [s for s in a["seeds"][0] if s in common]


def _by_seed(t: dict, seeds: list) -> list[list[float]]:
    """``[seed][size]`` losses (the seed order of ``seeds``)."""
    return [[t["loss_per_seed"][i][t["seeds"][i].index(s)] for i in range(len(t["sizes"]))]
            for s in seeds]


# ---------------------------------------------------------------------------- rendering
def study_markdown(study: dict) -> str:
    from megatron_mohge.bench.fmt import fmt_count, fmt_float, md_table

    def ci_text(ci, digits=4):
        return "—" if not ci else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"

    rows = []
    for kind, t in study["kinds"].items():
        for i, size in enumerate(t["sizes"]):
            per = ", ".join(f"{x:.4f}" for x in t["loss_per_seed"][i])
            drop = t["tail_drop"][i]
            rows.append([kind, size, fmt_count(t["total_params"][i]),
                         fmt_count(t["activated_params_per_token"][i]),
                         fmt_float(t["loss_mean"][i], 4), ci_text(t["loss_ci95"][i]), per,
                         "—" if drop is None else f"{100 * drop:.1f}%"])
    tail = int(100 * study.get("plateau_tail", PLATEAU_TAIL))
    blocks = [md_table(["kind", "size", "total params", "activated params/token",
                        "held-out loss (mean)", "95% CI", "per seed",
                        f"train-loss drop, last {tail}% of steps"], rows)]
    fit_rows = [[AXES[axis], kind, f"{f['c']:.4f}", f"{f['d']:.4f}",
                 fmt_float(f["residual_rms"], 4)]
                for axis, fits in study["fits"].items() for kind, f in fits.items()]
    if fit_rows:
        blocks += [f"Fits `{study['fit_form']}` (least squares on the seed means; two "
                   "parameters, because 3-4 sizes over < 10x cannot pin down a saturating "
                   "power law):", md_table(["x axis", "kind", "c", "d", "residual rms"], fit_rows)]
    for comp, axes in study["efficiency"].items():
        eff_rows = []
        for axis, e in axes.items():
            per = ", ".join("—" if r is None else f"{r:.3f}{'*' if x else ''}"
                            for r, x in zip(e["per_size"], e["extrapolated"]))
            boot = e.get("bootstrap") or {}
            note = (f"{boot['seeds']} seeds, {boot['samples']} resamples"
                    + (f", {boot['undefined']} undefined" if boot.get("undefined") else "")
                    if boot else "one seed: no interval")
            eff_rows.append([AXES[axis], fmt_float(e["geomean"], 3),
                             ci_text(e.get("geomean_ci95"), 3), per, note])
        blocks += [f"Parameter-efficiency ratio, {comp.replace('_vs_', ' vs ')}: stock "
                   "params needed on the stock fit to reach the loss / the params used "
                   "(> 1: fewer params for the same loss). `*`: outside the measured stock "
                   "range (extrapolated).",
                   md_table(["x axis", "ratio (geomean over sizes)", "bootstrap 95% CI",
                             "per size", "interval"], eff_rows)]
    return "\n\n".join(blocks)


def plot_study(study: dict, path: Path) -> Optional[Path]:
    """Loss vs total params and vs activated params per token: seeds (dots), means with
    their 95% intervals, and the fitted curves."""
    import math

    from megatron_mohge.bench.canvas import new_figure, save_figure

    if not any(t["sizes"] for t in study["kinds"].values()):
        return None
    fig, axes = new_figure(len(AXES), 5.5, 4.0)
    for ax, axis in zip(axes, AXES):
        for i, (kind, t) in enumerate(study["kinds"].items()):
            color = f"C{i % 10}"
            xs = t[axis]
            for x, per in zip(xs, t["loss_per_seed"]):
                ax.scatter([x] * len(per), per, s=10, color=color, alpha=0.4)
            err = [[m - (ci[0] if ci else m) for m, ci in zip(t["loss_mean"], t["loss_ci95"])],
                   [(ci[1] if ci else m) - m for m, ci in zip(t["loss_mean"], t["loss_ci95"])]]
            ax.errorbar(xs, t["loss_mean"], yerr=err, fmt="o", color=color, capsize=3,
                        label=f"{kind} (mean, 95% CI)")
            f = study["fits"].get(axis, {}).get(kind)
            if f and xs:
                lo, hi = math.log(min(xs)), math.log(max(xs))
                grid = [math.exp(lo + (hi - lo) * k / 40) for k in range(41)]
                ax.plot(grid, [stats.loss_at(f, g) for g in grid], color=color, lw=1,
                        ls="--")
        ax.set_xscale("log")
        ax.set_xlabel(AXES[axis])
        ax.set_ylabel("held-out loss")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    return save_figure(fig, path)
