"""Multi-seed aggregation of benchmark runs: seed means and paired comparisons.

Every run of a preset is trained once per seed; the same seed gives every run kind the same
data order, and all seeds share one held-out set (``data.valid_seed``), so run vs baseline
is compared seed by seed (paired) and the Student-t interval of the per-seed ratios
(:mod:`megatron_mohge.bench.stats`) measures what the seed changes, not what the runs share.
The figures averaged and compared are listed once, in :data:`SEED_FIELDS` and
:data:`COMPARED`.
"""

from __future__ import annotations

import math
from typing import Optional

from megatron_mohge.bench import stats
from megatron_mohge.util.numbers import mean_present

# Figures averaged over seeds and listed per seed (``<field>_per_seed``). A field missing
# from a run's summary is taken as the mean over its MoE layers when the layers carry it
# (list-valued per-layer figures, e.g. one CV per group, are averaged first).
SEED_FIELDS = ("heldout_loss", "heldout_loss_se", "heldout_bits_per_byte", "total_params", "routed_expert_params",
               "activated_params_per_token", "activated_routed_params_per_token",
               "train_tokens_per_s", "peak_mem_bytes", "expert_load_cv",
               "expert_load_max_over_mean", "rank_flops_max_over_mean", "group_load_cv",
               "maxvio_micro", "maxvio_batch", "wall_s", "cpu_s")
# Figures compared run vs baseline, paired by seed: summary field -> name in `comparisons`
# (``<name>_ratio_mean``, ``<name>_ratio_ci95``, ``<name>_ratio_per_seed``).
COMPARED = {"heldout_loss": "loss", "activated_params_per_token": "activated_params",
            "activated_routed_params_per_token": "activated_routed_params",
            "routed_expert_params": "routed_params", "expert_load_cv": "expert_load_cv",
            "expert_load_max_over_mean": "expert_load_max_over_mean",
            "rank_flops_max_over_mean": "rank_flops_max_over_mean",
            "group_load_cv": "group_load_cv", "maxvio_micro": "maxvio_micro",
            "maxvio_batch": "maxvio_batch"}


def _scalar(v) -> Optional[float]:
    """A per-layer figure as one number: lists (one value per group) by their mean."""
    if isinstance(v, (list, tuple)):
        return mean_present(_scalar(x) for x in v)
    return float(v) if _is_num(v) else None


def layer_mean(layers: list[dict], key: str) -> Optional[float]:
    """Mean over MoE layers of a per-layer figure (None entries skipped)."""
    return mean_present(_scalar(l.get(key)) for l in layers)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def mean_over_seeds(values: list):
    """Element-wise mean of the same structure over seeds: numbers are averaged, equal-length
    lists and dicts recursively, anything else (strings, ragged lists) taken from the first
    seed."""
    first = values[0]
    if all(_is_num(v) for v in values):
        # equal values (iteration numbers, parameter counts) stay as they are (ints)
        return first if all(v == first for v in values) else sum(values) / len(values)
    if all(isinstance(v, dict) for v in values):
        return {k: mean_over_seeds([v[k] for v in values]) if all(k in v for v in values)
                else first[k] for k in first}
    if all(isinstance(v, list) for v in values) and len({len(v) for v in values}) == 1:
        return [mean_over_seeds([v[i] for v in values]) for i in range(len(first))]
    if all(v is None for v in values):
        return None
    return first


def aggregate_runs(per_seed: dict[str, list[dict]]) -> dict:
    """``runs`` of results.json: each run's figures averaged over its seeds, plus
    ``<field>_per_seed`` for :data:`SEED_FIELDS` and ``per_seed`` (every seed's figures)."""
    out = {}
    for name, figs in per_seed.items():
        if not figs:
            continue
        agg = mean_over_seeds([{k: v for k, v in f.items() if k != "heldout_batch_losses"}
                               for f in figs])
        agg["heldout_ppl"] = math.exp(min(agg["heldout_loss"], 50))  # of the mean loss
        agg["seeds"] = [f["seed"] for f in figs]
        for key in SEED_FIELDS:
            if any(key in f for f in figs):
                agg[f"{key}_per_seed"] = [f.get(key) for f in figs]
        agg["per_seed"] = figs
        out[name] = agg
    return out


def compare_runs(per_seed: dict[str, list[dict]], pairs: list[tuple[str, str]]) -> dict:
    """``comparisons`` of results.json: for each (run, baseline) pair, per-seed ratios of the
    :data:`COMPARED` figures (paired: same seed), their mean and t interval, and the
    evaluation noise of the loss ratio (``loss_ratio_eval_se``: its standard error over
    held-out batches, per seed, from the paired batch losses)."""
    out = {}
    for name, baseline in pairs:
        base = {f["seed"]: f for f in per_seed.get(baseline, [])}
        figs = per_seed.get(name, [])
        matched = [(f, base[f["seed"]]) for f in figs if f["seed"] in base]
        if not matched:
            continue
        comp = {"seeds": [f["seed"] for f, _ in matched]}
        for field, short in COMPARED.items():
            xs = [(f.get(field), b.get(field)) for f, b in matched]
            if not xs or any(not _is_num(x) or not _is_num(y) or y == 0 for x, y in xs):
                continue
            r = stats.paired_ratio([x for x, _ in xs], [y for _, y in xs])
            comp[f"{short}_ratio_mean"] = r["mean"]
            comp[f"{short}_ratio_ci95"] = r["ci"]
            comp[f"{short}_ratio_per_seed"] = r["per_seed"]
        eval_se = [stats.ratio_se_paired(f["heldout_batch_losses"], b["heldout_batch_losses"])
                   for f, b in matched if f.get("heldout_batch_losses")
                   and len(f["heldout_batch_losses"]) == len(b.get("heldout_batch_losses") or [])]
        if eval_se and all(e is not None for e in eval_se):
            comp["loss_ratio_eval_se"] = eval_se
        out[f"{name}_vs_{baseline}"] = comp
    return out
