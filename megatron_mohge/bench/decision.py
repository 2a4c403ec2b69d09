"""Issue 22's question from ``--preset study`` results: does MoHGE match a uniform MoE at
fewer parameters?

One study results.json holds one shape on one corpus. Its ``study`` block (from
:func:`megatron_mohge.bench.study.analyze`) already has the parameter-efficiency ratio of
every arm against stock (stock params needed, on the stock fit ``loss = c + d ln N``, to
reach the arm's loss / the arm's params; geometric mean over sizes; percentile bootstrap over
seeds). This module reads that, adds the paired loss ratios that need two non-stock arms
(MoHGE / ``moe_equal_total``: the issue's minimum for recommending MoHGE), and turns each
interval into a verdict:

* ``yes``: the ratio's interval lies above 1.0 (fewer params for the same loss);
* ``no``: it lies below 1.0;
* ``undecided``: it straddles 1.0 -- with the seeds that would decide it, scaling the
  interval's half-width (in log) as 1/sqrt(seeds) at the same mean.

The paper's claim (parity at ~20% fewer total params) is a ratio of ``GOAL``.
"""

from __future__ import annotations

import math
from typing import Optional

from megatron_mohge.bench.stats import paired_ratio
from megatron_mohge.bench.study import AXES

GOAL = 1.2     # the paper's claim: stock needs ~1.2x MoHGE's params for the same loss
MINIMUM = 1.0  # the least that recommends MoHGE (with MoHGE <= moe_equal_total in loss)
MAX_SEEDS = 99  # beyond this "seeds to decide" is reported as not reachable by seeds


def verdict(ci: Optional[list], threshold: float = MINIMUM) -> str:
    """``yes`` / ``no`` / ``undecided`` / ``no interval`` for a ratio's 95% interval."""
    if not ci or ci[0] is None or ci[1] is None:
        return "no interval"
    if ci[0] > threshold:
        return "yes"
    if ci[1] < threshold:
        return "no"
    return "undecided"


def seeds_to_decide(mean: Optional[float], ci: Optional[list], seeds: int,
                    threshold: float = MINIMUM) -> Optional[int]:
    """Seeds at which an interval like ``ci`` (same mean, half-width ~ 1/sqrt(seeds), in log
    since ratios multiply) would exclude ``threshold``; None when it already does, or when no
    mean / interval is known or the mean sits on the threshold."""
    if mean is None or not ci or None in ci or verdict(ci, threshold) != "undecided":
        return None
    if mean <= 0 or ci[0] <= 0 or mean == threshold:
        return None
    half = (math.log(ci[1]) - math.log(ci[0])) / 2
    gap = abs(math.log(mean) - math.log(threshold))
    need = math.ceil(seeds * (half / gap) ** 2)
    return need if need <= MAX_SEEDS else None


def _size_key(size) -> tuple:
    """Sizes sort by their number (``h32`` < ``h128``), whatever their spelling."""
    digits = "".join(ch for ch in str(size) if ch.isdigit())
    return (int(digits) if digits else 0, str(size))


def _per_seed(run: dict) -> dict[int, float]:
    return {int(f["seed"]): f["heldout_loss"] for f in run.get("per_seed") or []
            if f.get("seed") is not None}


def loss_ratio(runs: dict, arm: str, ref: str) -> Optional[dict]:
    """Paired held-out loss ratio ``arm / ref`` over their common seeds (None if either is
    missing or they share no seed)."""
    if arm not in runs or ref not in runs:
        return None
    a, b = _per_seed(runs[arm]), _per_seed(runs[ref])
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    r = paired_ratio([a[s] for s in seeds], [b[s] for s in seeds])
    return {"mean": r["mean"], "ci": r["ci"], "seeds": seeds}


def tokens_per_param(results: dict, run: str) -> Optional[float]:
    """Training tokens / the run's total params (the issue's data budget: the paper ~350,
    Chinchilla 20)."""
    cfg = ((results.get("config") or {}).get("runs") or {}).get(run) or {}
    train, model = cfg.get("train") or {}, cfg.get("model") or {}
    r = (results.get("runs") or {}).get(run) or {}
    if not (train.get("iters") and train.get("global_batch_size") and model.get("seq_length")
            and r.get("total_params")):
        return None
    return train["iters"] * train["global_batch_size"] * model["seq_length"] / r["total_params"]


def decide(results: dict) -> dict:
    """The decision figures of one study results.json (see the module docstring)."""
    study = results.get("study") or {}
    base = study.get("baseline_kind", "moe")
    kinds = study.get("kinds") or {}
    runs = results.get("runs") or {}
    out: dict = {"baseline": base, "efficiency": {}, "sizes": {}}
    for comp, axes in (study.get("efficiency") or {}).items():
        arm = comp[: -len(f"_vs_{base}")]
        entry = {}
        for axis in AXES:
            e = axes.get(axis)
            if e is None:
                continue
            ci, seeds = e.get("geomean_ci95"), (e.get("bootstrap") or {}).get("seeds", 1)
            entry[axis] = {"ratio": e.get("geomean"), "ci": ci, "seeds": seeds,
                           "extrapolated": any(e.get("extrapolated") or []),
                           "verdict": verdict(ci),
                           "seeds_to_decide": seeds_to_decide(e.get("geomean"), ci, seeds),
                           "meets_goal": verdict(ci, GOAL)}
        out["efficiency"][arm] = entry
    stock_runs = dict(zip(kinds.get(base, {}).get("sizes", []),
                          kinds.get(base, {}).get("runs", [])))  # size -> stock run name
    for arm, t in kinds.items():
        for size, name in zip(t["sizes"], t["runs"]):
            row = out["sizes"].setdefault(size, {})
            stock = stock_runs.get(size)
            row[arm] = {"run": name, "vs_stock": loss_ratio(runs, name, stock) if stock else None,
                        "tokens_per_param": tokens_per_param(results, name)}
    for size, row in out["sizes"].items():  # MoHGE / each non-stock control of its size
        mohge = (row.get("mohge") or {}).get("run")
        for arm, cell in row.items():
            if arm not in (base, "mohge") and mohge:
                cell["mohge_vs_arm"] = loss_ratio(runs, mohge, cell["run"])
    out["sizes"] = dict(sorted(out["sizes"].items(), key=lambda kv: _size_key(kv[0])))
    return out


# ---------------------------------------------------------------------------- rendering
def _size_text(size) -> str:
    return str(size) if str(size).startswith("h") else f"h{size}"


def _ratio_text(r: Optional[dict]) -> str:
    if not r or r.get("mean") is None:
        return "—"
    ci = f" [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]" if r.get("ci") else ""
    return f"{r['mean']:.3f}{ci}"


def _eff_text(e: Optional[dict]) -> str:
    if not e or e.get("ratio") is None:
        return "—"
    ci = f" [{e['ci'][0]:.2f}, {e['ci'][1]:.2f}]" if e.get("ci") else ""
    return f"{e['ratio']:.2f}{ci}{'*' if e['extrapolated'] else ''}"


def _verdict_text(e: Optional[dict]) -> str:
    if not e:
        return "—"
    if e["verdict"] == "undecided":
        n = e["seeds_to_decide"]
        return (f"undecided (~{n} seeds would decide)" if n
                else "undecided (seeds alone will not decide)")
    return e["verdict"]


def markdown(decisions: dict[str, dict]) -> str:
    """Three tables over ``{label: decide(results)}`` (label e.g. ``paper / stdlib``): the
    answer (MoHGE's efficiency ratio and verdict), every arm's efficiency, and the per-size
    loss ratios."""
    from megatron_mohge.bench.fmt import md_table

    answer, arms, sizes = [], [], []
    for label, d in decisions.items():
        mohge = d["efficiency"].get("mohge") or {}
        total, act = mohge.get("total_params"), mohge.get("activated_params_per_token")
        vs_equal = [f"{_ratio_text(row['moe_equal_total'].get('mohge_vs_arm'))} "
                    f"({_size_text(size)})"
                    for size, row in d["sizes"].items() if "moe_equal_total" in row]
        tpp = [c["tokens_per_param"] for row in d["sizes"].values()
               for arm, c in row.items() if arm == d["baseline"] and c["tokens_per_param"]]
        answer.append([label, str(total["seeds"]) if total else "—",
                       f"{min(tpp):.1f}-{max(tpp):.1f}" if tpp else "—",
                       _eff_text(total), _verdict_text(total), _eff_text(act),
                       "; ".join(vs_equal) or "not trained"])
        for arm, axes in d["efficiency"].items():
            arms.append([label, f"`{arm}`", _eff_text(axes.get("total_params")),
                         _verdict_text(axes.get("total_params")),
                         _eff_text(axes.get("activated_params_per_token"))])
        for size, row in d["sizes"].items():
            for arm, cell in row.items():
                if arm == d["baseline"]:
                    continue
                sizes.append([label, _size_text(size), f"`{arm}`", _ratio_text(cell["vs_stock"]),
                              _ratio_text(cell.get("mohge_vs_arm")) if arm != "mohge" else "—",
                              str(len((cell["vs_stock"] or {}).get("seeds") or []))])
    eff_note = ("Parameter-efficiency ratio: stock params needed, on the stock fit "
                "`loss = c + d ln N`, to reach the arm's held-out loss / the arm's params; "
                f"geometric mean over sizes, 95% bootstrap interval over seeds; > 1 means "
                f"fewer params for the same loss (the paper claims ~{GOAL}). `*`: at least one "
                "size needed the stock fit beyond the measured stock sizes (extrapolated).")
    return "\n\n".join([
        md_table(["shape / corpus", "seeds", "stock tokens/param", "MoHGE efficiency "
                  "(total params)", "answer", "MoHGE efficiency (activated params)",
                  "MoHGE / `moe_equal_total` loss"], answer),
        eff_note,
        md_table(["shape / corpus", "arm", "efficiency (total)", "answer",
                  "efficiency (activated)"], arms),
        "Held-out loss ratios, paired by seed, mean and Student-t 95% interval:",
        md_table(["shape / corpus", "size", "arm", "loss / stock", "MoHGE / arm", "seeds"],
                 sizes)])
