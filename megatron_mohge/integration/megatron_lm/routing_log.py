"""Routing diagnostics in Megatron-LM's loop (``mohge-pretrain``, ``examples/pretrain_mohge.py``).

``mohge-train`` reports, every log window, whether the router learns
(:mod:`megatron_mohge.training.diagnostics`). Here the same window goes through Megatron's
``train()``, by three wrappers :func:`install_routing_log_hooks` puts on
``megatron.training.training`` (same names and call shapes on core_v0.16.1 and core_v0.19):

* ``finalize_model_grads(model, ...)`` -- remembers this rank's model chunks (Megatron's
  ``training_log`` is not given the model);
* ``training_log(..., iteration, ...)`` -- after Megatron's own log, at every
  ``--log-interval`` (and the last iteration): every rank computes the window's figures
  (:func:`megatron_mohge.training.run_figures.routing`: counts summed over the stage's TP x DP
  group, layers gathered over pipeline stages), the counters restart (as ``mohge-train`` at
  each log), and the last rank (Megatron's log and TensorBoard rank) prints one
  ``[mohge] routing:`` line, writes ``routing/*`` scalars to Megatron's TensorBoard writer
  and rewrites ``routing_diagnostics.json`` (atomically) in ``--save``, else
  ``--tensorboard-dir``, else the working directory: the run's figures
  (:func:`~megatron_mohge.training.diagnostics.run_diagnostics`, as ``summary.json``'s
  ``routing_diagnostics``) and the window history they come from. A resumed run keeps the
  windows up to its start iteration from the file in ``--load`` (or the output directory);
* ``evaluate(..., model, ...)`` -- keeps the held-out batches' routing out of the training
  window (snapshot, reset, restore; as ``mohge-train``'s evaluation).

Runs without ``--mohge-config`` (stock Megatron routers, no counters) are left alone.
"""

from __future__ import annotations

import functools
import inspect
import os
from pathlib import Path
from typing import Callable, Optional

#: written in --save (else --tensorboard-dir, else the working directory)
DIAGNOSTICS_FILE = "routing_diagnostics.json"
_MARK = "__mohge_routing_log__"


class RoutingLog:
    """One process's diagnostics state: its model chunks and (reporting rank) the windows."""

    def __init__(self):
        self.chunks: Optional[list] = None
        self.history: Optional[list] = None  # [{"iteration", "diagnostics"}], reporting rank

    def remember(self, model) -> None:
        self.chunks = list(model) if isinstance(model, (list, tuple)) else [model]

    def window(self, ep: int) -> list[dict]:
        """The window's per-layer figures on every rank (collective), counters restarted."""
        from megatron_mohge.metrics import reset_routing_counts
        from megatron_mohge.training.run_figures import routing

        layers = routing(self.chunks, ep)
        reset_routing_counts(self.chunks)
        return layers

    def report(self, args, iteration: int, writer=None,
               log: Callable = functools.partial(print, flush=True)) -> Optional[dict]:
        """Log window ending at ``iteration``: collective; returns the run's
        ``routing_diagnostics`` on the reporting (last) rank, None elsewhere or without
        counted routers."""
        import torch.distributed as dist

        from megatron_mohge.training import diagnostics

        layers = self.window(getattr(args, "expert_model_parallel_size", 1) or 1)
        if not layers or dist.get_rank() != dist.get_world_size() - 1:
            return None
        rec = diagnostics.window_record(layers)
        if self.history is None:
            self.history = previous_windows(args)
        self.history.append({"iteration": iteration, "diagnostics": rec})
        log(log_line(rec, iteration))
        if writer is not None:
            write_scalars(writer, rec, iteration)
        iters = getattr(args, "train_iters", None) or iteration  # sample-based: so far
        run = diagnostics.run_diagnostics(self.history, iters)
        write_json(output_dir(args) / DIAGNOSTICS_FILE,
                   {"iteration": iteration, "train_iters": iters,
                    "routing_diagnostics": run, "history": self.history})
        return run


STATE = RoutingLog()


def log_line(rec: dict, iteration: int) -> str:
    """``[mohge] routing: it N | <log_text> | in-group max p .. | load cv .. | share [..]``."""
    from megatron_mohge.training.diagnostics import log_text

    parts = [f"[mohge] routing: it {iteration}"]
    if log_text(rec):
        parts.append(log_text(rec))
    if rec.get("ingroup_max_prob") is not None:
        parts.append(f"in-group max p {rec['ingroup_max_prob']:.3f}")
    if rec.get("expert_load_cv") is not None:
        parts.append(f"load cv {rec['expert_load_cv']:.3f}")
    share = rec.get("group_assignment_share")
    if share:
        parts.append("group share [" + " ".join(f"{s:.3f}" for s in share) + "]")
    return " | ".join(parts)


def write_scalars(writer, rec: dict, iteration: int) -> None:
    """The window as TensorBoard scalars, ``routing/<figure>`` as ``mohge-train`` writes them
    (layer means), and ``routing/<share>/g<i>`` per group."""
    from megatron_mohge.training.diagnostics import SCALARS, SHARES

    for k in SCALARS:
        if rec.get(k) is not None:
            writer.add_scalar(f"routing/{k}", rec[k], iteration)
    for name in SHARES:
        for g, s in enumerate(rec.get(name) or []):
            writer.add_scalar(f"routing/{name}/g{g}", s, iteration)
    writer.flush()


def output_dir(args) -> Path:
    """Where :data:`DIAGNOSTICS_FILE` goes: ``--save``, else ``--tensorboard-dir``, else cwd."""
    for d in (getattr(args, "save", None), getattr(args, "tensorboard_dir", None)):
        if d:
            return Path(d)
    return Path.cwd()


def write_json(path: Path, obj: dict) -> None:
    from megatron_mohge.training.health import dumps

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(dumps(obj, indent=1))
    os.replace(tmp, path)


def previous_windows(args) -> list:
    """A resumed run's windows up to its start iteration (``args.iteration``, what Megatron
    loaded), from :data:`DIAGNOSTICS_FILE` in ``--load`` or else the output directory; ``[]``
    for a fresh start or without the file."""
    import json

    start = getattr(args, "iteration", 0) or 0
    if start <= 0:
        return []
    for d in (getattr(args, "load", None), output_dir(args)):
        path = Path(d) / DIAGNOSTICS_FILE if d else None
        if path is not None and path.is_file():
            try:
                hist = json.loads(path.read_text()).get("history") or []
            except (OSError, ValueError, AttributeError):
                continue
            return [h for h in hist if isinstance(h, dict) and h.get("iteration", 0) <= start]
    return []


# ------------------------------------------------------------------ wrappers
def _arg_getter(stock: Callable, name: str) -> Callable:
    """``(args, kwargs) -> value of parameter name`` of ``stock``'s call."""
    params = list(inspect.signature(stock).parameters)
    pos = params.index(name)

    def get(a, kw):
        return kw[name] if name in kw else (a[pos] if len(a) > pos else None)

    return get


def wrap_finalize_model_grads(stock: Callable, state: RoutingLog = STATE) -> Callable:
    """``finalize_model_grads(model, ...)`` that remembers ``model`` (idempotent)."""
    if getattr(stock, _MARK, False):
        return stock

    @functools.wraps(stock)
    def finalize_model_grads(model, *a, **kw):
        state.remember(model)
        return stock(model, *a, **kw)

    setattr(finalize_model_grads, _MARK, True)
    return finalize_model_grads


def megatron_context() -> tuple:
    """Megatron's parsed args and TensorBoard writer (None except on the last rank)."""
    from megatron.training import get_args, get_tensorboard_writer

    return get_args(), get_tensorboard_writer()


def wrap_training_log(stock: Callable, state: RoutingLog = STATE,
                      context: Callable[[], tuple] = megatron_context) -> Callable:
    """``training_log`` followed, at each log interval and the last iteration, by
    :meth:`RoutingLog.report` (on every rank: it is collective, as ``training_log``'s own
    MoE-metric reduction). ``context() -> (args, writer)``. Idempotent."""
    if getattr(stock, _MARK, False):
        return stock
    iteration_of = _arg_getter(stock, "iteration")

    @functools.wraps(stock)
    def training_log(*a, **kw):
        out = stock(*a, **kw)
        args, writer = context()
        it = iteration_of(a, kw)
        interval = getattr(args, "log_interval", None) or 1
        if (getattr(args, "mohge_config", None) and state.chunks is not None and it
                and (it % interval == 0 or it == getattr(args, "train_iters", None))):
            state.report(args, it, writer)
        return out

    setattr(training_log, _MARK, True)
    return training_log


def wrap_evaluate(stock: Callable) -> Callable:
    """``evaluate(forward_step_func, data_iterator, model, ...)`` whose forwards leave the
    routers' training window as it was (idempotent)."""
    if getattr(stock, _MARK, False):
        return stock
    model_of = _arg_getter(stock, "model")

    @functools.wraps(stock)
    def evaluate(*a, **kw):
        from megatron_mohge.metrics import (
            reset_routing_counts,
            restore_routing_counts,
            snapshot_routing_counts,
        )

        model = model_of(a, kw)
        saved = snapshot_routing_counts(model) if model is not None else []
        reset_routing_counts(model or [])
        try:
            return stock(*a, **kw)
        finally:
            restore_routing_counts(saved)

    setattr(evaluate, _MARK, True)
    return evaluate


def install_routing_log_hooks(T=None) -> bool:
    """Wrap ``finalize_model_grads``, ``training_log`` and ``evaluate`` of ``T`` (default
    ``megatron.training.training``); False when already wrapped."""
    if T is None:
        import megatron.training.training as T
    if getattr(T.training_log, _MARK, False):
        return False
    T.finalize_model_grads = wrap_finalize_model_grads(T.finalize_model_grads)
    T.training_log = wrap_training_log(T.training_log)
    T.evaluate = wrap_evaluate(T.evaluate)
    return True
