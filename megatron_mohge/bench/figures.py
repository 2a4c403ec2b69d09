"""The ``results.json`` figures of one run (from its ``mohge-train`` summary) and the
issue's targets evaluated on a whole results dict (reported, never asserted)."""

from __future__ import annotations

from typing import Optional

from megatron_mohge.bench.aggregate import SEED_FIELDS, layer_mean
from megatron_mohge.bench.plot_figures import plot_figures
from megatron_mohge.bench.verdicts import loss_judgement
from megatron_mohge.config.megatron import routed_expert_widths
from megatron_mohge.config.run import RunConfig
from megatron_mohge.util.numbers import mean_by_ep, mean_present


def run_figures(summary: dict, run: RunConfig) -> dict:
    """The results.json entry of one run from its ``mohge-train`` summary."""
    fig = {k: summary[k] for k in (
        "kind", "total_params", "routed_expert_params", "activated_params_per_token",
        "activated_routed_params_per_token", "heldout_loss", "heldout_ppl", "train_tokens_per_s",
        "peak_mem_bytes", "group_token_share", "expert_load_cv", "expert_load_max_over_mean")}
    for k in BALANCE_FIELDS:  # absent in summaries of older runs
        fig[k] = summary.get(k)
    fig["seed"] = run.train.seed
    fig["iterations"] = summary.get("iterations")  # steps trained (verdicts.train_steps)
    fig["layout"] = summary["layout"]
    fig["wall_s"] = summary.get("wall_s")
    fig["cpu_s"] = summary.get("cpu_s")
    for key in ("heldout_loss_se", "heldout_tokens", "heldout_batch_losses",
                "heldout_bits_per_byte"):
        if key in summary:
            fig[key] = summary[key]
    layers = summary["layers"]
    widths = routed_expert_widths(run.moe)
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
    if summary.get("routing_diagnostics"):
        fig["routing_diagnostics"] = summary["routing_diagnostics"]
    fig.update(plot_figures(summary, run))  # what only the research plots read
    hist = summary["history"]
    diag = [h.get("diagnostics") or {} for h in hist]
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
        **{f"diag_{k}": [d.get(k) for d in diag] for k in (
            "same_group_fraction", "max_group_share", "weight_gap", "group_gate_grad_norm",
            "expert_gate_grad_norm")},
    )
    return fig


# balance figures of a run summary (means over MoE layers, measured on the held-out batches;
# train_* on the training batches of the last quarter of training)
BALANCE_FIELDS = ("maxvio_micro", "maxvio_batch", "group_load_cv", "train_expert_load_cv",
                  "train_maxvio_micro", "train_maxvio_batch", "train_group_load_cv",
                  "train_rank_flops_by_ep")


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
    """The issue's targets, evaluated on the measured figures (reported, never asserted).
    ``met``: target -> True / False, or None for a loss target the bench is too short or
    has too few seeds to judge (:mod:`.verdicts`; the reason in ``not_judged``)."""
    if results.get("study"):
        return _study_targets(results["study"], results)
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
    # loss targets: None (not judged) on a bench too short or with too few seeds
    unjudged = loss_judgement(results, ("mohge", results.get("baseline", "moe")))
    passed = {
        "routed_params_reduction>=0.18": checks["routed_params_reduction"] >= 0.18,
        "heldout_loss<=+1%": None if unjudged else checks["heldout_loss_vs_baseline"] <= 0.01,
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
        passed["heldout_loss_ratio_ci95<=1.01"] = None if unjudged else ci[1] <= 1.01
    if lb:
        passed["layer_time<=equal_total"] = checks["layer_time_mohge_over_equal_total"] <= 1.0
    return _with_reason({"figures": checks, "met": passed}, unjudged)


def _with_reason(targets: dict, unjudged: Optional[str]) -> dict:
    """``targets`` with ``not_judged`` (why the None verdicts are None) when some are."""
    if unjudged and any(v is None for v in targets["met"].values()):
        targets["not_judged"] = unjudged
    return targets


def _study_targets(study: dict, results: dict) -> dict:
    """The paper's "parity at ~20% fewer params": parameter-efficiency ratio >= 1.2."""
    eff = (study.get("efficiency") or {}).get(f"mohge_vs_{study['baseline_kind']}", {})
    e = eff.get("total_params")
    if not e or e.get("geomean") is None:
        return {}
    # a loss comparison too (stock params needed to reach MoHGE's loss): judged as one
    unjudged = loss_judgement(results, list(results.get("runs") or {}))
    figures = {"param_efficiency_total": e["geomean"]}
    met = {"param_efficiency>=1.2": None if unjudged else e["geomean"] >= 1.2}
    if e.get("geomean_ci95"):
        figures["param_efficiency_total_ci95_low"] = e["geomean_ci95"][0]
        met["param_efficiency_ci95_low>=1.2"] = None if unjudged else e["geomean_ci95"][0] >= 1.2
    return _with_reason({"figures": figures, "met": met}, unjudged)
