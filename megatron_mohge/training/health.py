"""Numerical health of a training run: stop on a non-finite loss / grad norm or a loss
spike *before* anything is logged, saved or published, and strict JSON for what is.

The loss and the grad norm the trainer checks are global (the loss is reduced over DP and
broadcast from the last PP stage; Megatron's grad norm is reduced over every model-parallel
and DP group), so every rank reaches the same verdict at the same step and the job stops
without a collective left waiting.
"""

from __future__ import annotations

import json
import math
from collections import deque
from typing import Any, Optional


class TrainingDiverged(RuntimeError):
    """The run stopped itself: a non-finite loss / grad norm or a loss spike at ``step``."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


class HealthMonitor:
    """Checks one optimizer step at a time. ``step`` is 1-based (the step that just ran,
    i.e. the iteration the checkpoint of its result would carry)."""

    def __init__(self, *, spike_factor: Optional[float] = None, spike_window: int = 20,
                 vocab_size: Optional[int] = None, hint: str = "", log=print):
        self.spike_factor, self.log, self.hint = spike_factor, log, hint
        self.recent: deque = deque(maxlen=spike_window)
        # ln(V): the loss of a uniform guess; a loss far above it means confident wrong
        # predictions, i.e. divergence (warned once, not fatal: spike_factor is the knob)
        self.uniform_loss = math.log(vocab_size) if vocab_size else None
        self._warned = False

    def check_loss(self, loss: float, step: int) -> None:
        """Before the optimizer step: a non-finite loss never reaches the weights."""
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"non-finite training loss ({loss}) at step {step}: stopped before the "
                f"optimizer update; nothing from this step was saved or logged. {self.hint}",
                step)
        full = len(self.recent) == self.recent.maxlen
        if self.spike_factor is not None and full:
            ref = sum(self.recent) / len(self.recent)
            if loss > self.spike_factor * ref:
                raise TrainingDiverged(
                    f"loss spike at step {step}: {loss:.4f} > health.loss_spike_factor "
                    f"{self.spike_factor} x {ref:.4f} (mean of the previous {len(self.recent)} "
                    f"steps); stopped before the optimizer update. {self.hint} Raise "
                    "health.loss_spike_factor or set it to null to train through spikes.", step)
        self.recent.append(loss)
        if (self.uniform_loss is not None and not self._warned
                and loss > 2 * self.uniform_loss):
            self._warned = True
            self.log(f"warning: loss {loss:.2f} at step {step} is above twice ln(vocab) = "
                     f"{self.uniform_loss:.2f} (a uniform guess): the run is diverging. "
                     f"{self.hint} Set health.loss_spike_factor to stop such runs.")

    def check_grad_norm(self, grad_norm: Optional[float], updated: bool, step: int) -> None:
        """After the optimizer step (Megatron computes the norm inside it). fp16 loss scaling
        skips steps with inf grads itself (``updated`` False): that is not an error."""
        if updated and grad_norm is not None and not math.isfinite(grad_norm):
            raise TrainingDiverged(
                f"non-finite gradient norm ({grad_norm}) at step {step}: the weights in memory "
                f"are no longer finite, so the run stopped before saving or logging them. "
                f"{self.hint}", step)


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every NaN / +-inf float replaced by None (JSON null), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_or_none(v) for v in obj]
    return obj


def dumps(obj: Any, **kwargs) -> str:
    """Strict JSON (RFC 8259): non-finite floats become null, never ``NaN`` / ``Infinity``
    tokens that other parsers reject."""
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)
