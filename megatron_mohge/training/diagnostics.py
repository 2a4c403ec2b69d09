"""Routing diagnostics: is the router learning? Per log window and for the finished run.

The figures (each router measures them, :class:`megatron_mohge.routing.counters.LayerRouting`):
``same_group_fraction`` (tokens whose K picks share one group: with ``renorm`` weights the
group gate gets no LM gradient from them), ``ingroup_max_prob`` (near ``1/N_g``: a flat
expert gate), ``weight_gap`` (max - min combine weight of the picks: near 0, the weights
carry no preference), the gate gradient norms, the groups' selection and assignment shares
and the largest assignment share, and the expert-load CV.

Each log window records them per MoE layer (``history[i]["diagnostics"]``); the run's
``routing_diagnostics`` (``summary.json``, and ``results.json`` through the bench) holds, per
layer and averaged over layers, their means over the training windows of the last quarter
of training (the end state), the gate-gradient ratio, and the expert-load CV of the first
and of the second half of training (early collapse shows in the first).
"""

from __future__ import annotations

from typing import Optional

from megatron_mohge.util.numbers import mean_present

#: per-layer scalar figures recorded every window
SCALARS = ("same_group_fraction", "ingroup_max_prob", "weight_gap", "group_gate_grad_norm",
           "expert_gate_grad_norm", "max_group_share", "expert_load_cv")
#: per-group figures (a list per layer); ``group_token_share`` is reported as selection share
SHARES = {"group_selection_share": "group_token_share",
          "group_assignment_share": "group_assignment_share"}


def window_record(layers: list[dict]) -> dict:
    """One log window's diagnostics: ``{"layers": [...], <figure>: mean over layers}``."""
    per_layer = [{**{k: l.get(k) for k in SCALARS},
                  **{name: l.get(src) or None for name, src in SHARES.items()}}
                 for l in layers]
    return {"layers": per_layer, **_mean_over_layers(per_layer)}


def _mean_list(lists: list) -> Optional[list]:
    lists = [x for x in lists if x]
    if not lists or len({len(x) for x in lists}) != 1:
        return None
    return [sum(x[i] for x in lists) / len(lists) for i in range(len(lists[0]))]


def _mean_over_layers(per_layer: list[dict]) -> dict:
    out = {k: mean_present(l.get(k) for l in per_layer) for k in SCALARS}
    out.update({name: _mean_list([l.get(name) for l in per_layer]) for name in SHARES})
    return out


def _ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
    return num / den if num is not None and den else None


def run_diagnostics(history: list[dict], iters: int) -> Optional[dict]:
    """The run's ``routing_diagnostics`` from its log windows (None without any)."""
    recs = [h["diagnostics"] for h in history if h.get("diagnostics")]
    if not recs:
        return None
    its = [h["iteration"] for h in history if h.get("diagnostics")]
    end = [r for r, it in zip(recs, its) if it > 0.75 * iters] or recs[-1:]
    first = [r for r, it in zip(recs, its) if it <= iters / 2]
    second = [r for r, it in zip(recs, its) if it > iters / 2]
    num_layers = len(recs[-1]["layers"])
    layers = []
    for i in range(num_layers):
        at = lambda rs: [r["layers"][i] for r in rs if len(r["layers"]) > i]  # noqa: E731
        d = {k: mean_present(l.get(k) for l in at(end)) for k in SCALARS}
        d.update({name: _mean_list([l.get(name) for l in at(end)]) for name in SHARES})
        d["gate_grad_ratio"] = _ratio(d["group_gate_grad_norm"], d["expert_gate_grad_norm"])
        d["expert_load_cv_first_half"] = mean_present(l.get("expert_load_cv") for l in at(first))
        d["expert_load_cv_second_half"] = mean_present(l.get("expert_load_cv")
                                                       for l in at(second))
        layers.append(d)
    keys = [k for k in layers[0] if k not in SHARES] if layers else []
    mean = {k: mean_present(l.get(k) for l in layers) for k in keys}
    mean.update({name: _mean_list([l.get(name) for l in layers]) for name in SHARES})
    return {"window": "training log windows; figures: last quarter of training; CV: each half",
            "mean": mean, "layers": layers}


def log_text(diag: Optional[dict]) -> str:
    """A short log-line fragment: same-group fraction, gate-gradient ratio, largest group."""
    if not diag:
        return ""
    parts = []
    if diag.get("same_group_fraction") is not None:
        parts.append(f"same-group {diag['same_group_fraction']:.2f}")
    ratio = _ratio(diag.get("group_gate_grad_norm"), diag.get("expert_gate_grad_norm"))
    if ratio is not None:
        parts.append(f"gate grad g/e {ratio:.3g}")
    if diag.get("max_group_share") is not None and diag.get("same_group_fraction") is not None:
        parts.append(f"max group {diag['max_group_share']:.2f}")
    if diag.get("weight_gap") is not None:
        parts.append(f"w-gap {diag['weight_gap']:.3f}")
    return " | ".join(parts)
