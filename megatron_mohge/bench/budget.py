"""Token budget of a bench: ``--tokens-per-param X`` -> the steps of every run.

Which parameter count: the **stock baseline's total params at the run's size** (the ``moe``
run of its size in a study or sized screen, else the preset's baseline) -- the same count
results.json reports as ``total_params`` and the study plots on its x axis. Every arm of one
size therefore trains the same number of tokens, whatever its own params: an arm with fewer
params (MoHGE, moe_equal_total) gets more tokens per own param, which is the comparison the
paper makes (same data, fewer params). Counting each arm's own params would hand the larger
model more data and confound the two.

``steps = ceil(X x N_baseline / tokens per step)``, tokens per step = global batch x sequence
length; the learning-rate warmup keeps the preset's fraction of the steps (``apply``).
"""

from __future__ import annotations

import math
from typing import Optional

from megatron_mohge.config import ConfigError


def check_tokens_per_param(x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) or x <= 0:
        raise ConfigError(f"--tokens-per-param {x}: give a positive number of training tokens "
                          "per baseline parameter, e.g. 20")
    return float(x)


def check_budget_options(iters, tokens_per_param) -> None:
    """``--iters`` and ``--tokens-per-param`` both set the steps: refuse the two together."""
    if iters is not None and tokens_per_param is not None:
        raise ConfigError(f"--tokens-per-param {tokens_per_param} and --iters {iters} both set "
                          "the steps of every run; give one of them")
    if tokens_per_param is not None:
        check_tokens_per_param(tokens_per_param)


def tokens_per_step(run_dict: dict) -> int:
    return int(run_dict["train"]["global_batch_size"]) * int(run_dict["model"]["seq_length"])


def budget_params(run_dict: dict) -> int:
    """Total params of the run ``run_dict`` (a full RunConfig mapping), counted from its config
    (``accounting``; the trainer's measured ``total_params`` are the same)."""
    from megatron_mohge.accounting import analytic_param_counts, resolve_vocab
    from megatron_mohge.config.run import RunConfig

    run = RunConfig.from_dict(run_dict)
    vocab, why = resolve_vocab(run)
    if not vocab:
        raise ConfigError(f"--tokens-per-param: the vocabulary size is unknown ({why}); give a "
                          "readable --tokenizer or use --iters")
    return analytic_param_counts(run, vocab).total


def budget_iters(preset, names: list[str], tokens_per_param: float,
                 tokenizer: Optional[str] = None) -> dict[str, dict]:
    """Per run of ``names``: ``{"iters", "tokens", "budget_params", "budget_run"}`` for
    ``tokens_per_param`` tokens per parameter of its size's stock baseline."""
    x = check_tokens_per_param(tokens_per_param)
    wanted = {n: preset.baseline_of(n) for n in names}
    base = preset.run_dicts(sorted(set(wanted.values())))
    params = {}
    for b, d in base.items():
        if tokenizer:
            d.setdefault("data", {})["tokenizer"] = tokenizer
        params[b] = budget_params(d)
    out = {}
    for name, d in preset.run_dicts(names).items():
        b = wanted[name]
        per_step = tokens_per_step(d)
        if per_step != tokens_per_step(base[b]):
            raise ConfigError(f"--tokens-per-param: run {name} takes {per_step} tokens a step but "
                              f"its baseline {b} {tokens_per_step(base[b])}; they cannot train "
                              "the same tokens")
        iters = math.ceil(x * params[b] / per_step)
        out[name] = {"iters": iters, "tokens": iters * per_step, "budget_params": params[b],
                     "budget_run": b}
    return out


def apply(d: dict, iters: int) -> None:
    """Set ``iters`` in the run mapping ``d``, keeping the preset's warmup fraction and at
    least four logged points (the plateau figure needs a curve)."""
    train = d["train"]
    base_iters, warmup = int(train["iters"]), int(train.get("lr_warmup_iters", 0))
    train["iters"] = iters
    train["lr_warmup_iters"] = min(iters - 1, max(1, round(warmup * iters / base_iters))) \
        if warmup else 0
    log = d.setdefault("logging", {})
    if "interval" in log:
        log["interval"] = max(1, min(log["interval"], iters // 4 or 1))
