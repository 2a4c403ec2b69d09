"""When a bench's loss targets can be judged, and how a target's verdict is written.

A quality target compares held-out losses ("MoHGE within +1% of the stock MoE", "parity at
~20% fewer parameters"). A short or single-seed bench cannot say either way:

* **steps** -- early in training the loss gap between two models measures how fast each
  starts (warmup, init, router noise), not what it can learn. The committed default-stdlib
  bench (300 steps, 3 seeds) has per-seed loss ratios 1.002, 1.062, 0.948: a 95% interval
  of [0.86, 1.15] around a +1% target. Below :data:`MIN_LOSS_STEPS` no verdict.
* **seeds** -- the verdict rests on the paired per-seed ratios' Student-t interval; with one
  seed there is none, with two its half-width is 12.7 sd (t at 1 degree of freedom), so one
  unlucky seed decides. Three seeds (t = 4.3) is the least that makes the interval
  informative. Below :data:`MIN_LOSS_SEEDS` no verdict.

Structural targets (parameter counts) and routing / balance figures are judged at any
length: they do not rest on a loss difference.
"""

from __future__ import annotations

from typing import Iterable, Optional

MIN_LOSS_STEPS = 1000
MIN_LOSS_SEEDS = 3
TOO_FEW = "too few steps/seeds to judge"


def train_steps(run: dict) -> Optional[int]:
    """Optimizer steps a results.json run trained: ``iterations`` (recorded since the
    trainer's summary carried it), else the last logged iteration of its curves."""
    steps = run.get("iterations")
    if steps is None:
        its = (run.get("curves") or {}).get("iteration") or []
        steps = its[-1] if its else None
    return None if steps is None else int(steps)


def loss_judgement(results: dict, names: Iterable[str]) -> Optional[str]:
    """Why the loss targets over runs ``names`` cannot be judged (``"too few steps/seeds to
    judge (300 steps < 1000)"``), or None when they can."""
    runs = results.get("runs") or {}
    steps = [train_steps(runs.get(n) or {}) for n in names]
    seeds = min((len((runs.get(n) or {}).get("seeds") or results.get("seeds") or [])
                 for n in names), default=0)
    why = []
    if any(s is None for s in steps):
        why.append("steps not recorded")
    elif min(steps) < MIN_LOSS_STEPS:
        why.append(f"{min(steps)} steps < {MIN_LOSS_STEPS}")
    if seeds < MIN_LOSS_SEEDS:
        why.append(f"{seeds} seed{'s' if seeds != 1 else ''} < {MIN_LOSS_SEEDS}")
    return f"{TOO_FEW} ({', '.join(why)})" if why else None


def verdict(value: Optional[bool], *, shout: bool = False) -> str:
    """A target's verdict as written in results.md and the bench's last lines: met, missed
    (``MISSED`` / ``**missed**`` to stand out) or, for None, :data:`TOO_FEW`."""
    if value is None:
        return TOO_FEW
    if value:
        return "met"
    return "MISSED" if shout else "**missed**"


__all__ = ["MIN_LOSS_STEPS", "MIN_LOSS_SEEDS", "TOO_FEW", "train_steps", "loss_judgement",
           "verdict"]
