"""Shape adapters for the megatron-core APIs the plugin composes (0.16.1 ... 0.19.x).

Megatron's MoE seams changed shape between the supported lines without changing meaning.
We detect the shape of the object at hand (``ModuleSpec`` or ``functools.partial``, which
keyword arguments a constructor accepts, which tracker module exists) instead of comparing
versions, so releases in between work wherever their shapes are one of these:

* specs: 0.16 builds every submodule from a ``ModuleSpec``; 0.19's ``get_moe_module_spec``
  returns ``partial(MoELayer, submodules=...)`` with partial experts, and the GPT layer
  spec's ``mlp`` is a builder partial (0.17 mixes both). :func:`builder_parts` reads
  either, :func:`rebuild_like` writes the template's shape back.
* constructors: 0.19 passes ``is_mtp_layer`` to routers and ``name`` to experts;
  :func:`supported_kwargs` keeps what the Megatron class accepts.
* aux-loss tracker: 0.18 moved it to ``moe_logging.get_moe_metrics_tracker()`` (the 0.16
  helper functions remain but warn on every call). :func:`record_metric`,
  :func:`metric_entries`, :func:`reduce_metrics`, :func:`clear_metrics` use whichever
  exists and reduce with one rule on both lines.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, Dict, NamedTuple, Optional

import torch

from megatron.core.transformer.spec_utils import ModuleSpec

# ---------------------------------------------------------------------------- specs


class BuilderParts(NamedTuple):
    module: Any  # the class (or factory) that is built
    submodules: Any  # its submodules dataclass (or None)
    params: Dict[str, Any]  # the other bound keyword arguments / ModuleSpec.params


def builder_parts(builder) -> BuilderParts:
    """``(module, submodules, params)`` of a ``ModuleSpec``, a ``functools.partial`` or a class."""
    if isinstance(builder, ModuleSpec):
        return BuilderParts(builder.module, builder.submodules, dict(builder.params))
    if isinstance(builder, functools.partial):
        if builder.args:
            raise TypeError(f"unsupported builder {builder!r}: positional arguments are bound")
        kw = dict(builder.keywords)
        return BuilderParts(builder.func, kw.pop("submodules", None), kw)
    return BuilderParts(builder, None, {})


def rebuild_like(template, module, submodules=None, params: Optional[dict] = None):
    """A builder of ``module`` in the same shape as ``template`` (``ModuleSpec`` or partial)."""
    params = dict(params or {})
    if isinstance(template, functools.partial):
        if submodules is not None:
            params["submodules"] = submodules
        return functools.partial(module, **params)
    return ModuleSpec(module=module, params=params, submodules=submodules)


def builds_subclass_of(builder, cls: type) -> bool:
    """Whether ``builder`` (spec, partial or class) builds a ``cls``."""
    module = builder_parts(builder).module
    return isinstance(module, type) and issubclass(module, cls)


# ----------------------------------------------------------------------- constructors


@functools.lru_cache(maxsize=None)
def _accepted(fn) -> tuple:
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return ("**",)
    return tuple(p.name for p in params)


def supported_kwargs(fn, **kwargs) -> dict:
    """The ``kwargs`` that ``fn`` (a Megatron class or function) accepts by name."""
    names = _accepted(fn)
    return dict(kwargs) if "**" in names else {k: v for k, v in kwargs.items() if k in names}


# ------------------------------------------------------------------- aux-loss tracker


def _tracker():
    """0.18+: Megatron's ``MoEMetricsTracker``; older lines: ``None`` (dict tracker)."""
    try:
        from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker
    except ImportError:
        return None
    return get_moe_metrics_tracker()


class MetricEntry(NamedTuple):
    values: torch.Tensor  # per-layer sums, [num_layers (+ MTP layers)]
    reduce_group: Any  # summed over (a metric each rank of it holds a part of)
    avg_group: Any  # averaged over
    needs_dp_avg: bool  # averaged over data parallel at the end


def record_metric(name: str, value: torch.Tensor, layer_number: Optional[int], num_layers: int,
                  *, reduce_group=None, avg_group=None, needs_dp_avg: bool = True) -> None:
    """Add ``value`` to layer ``layer_number`` of metric ``name`` in Megatron's tracker."""
    tracker = _tracker()
    if tracker is not None:
        tracker.record(name, value, layer_number, num_layers, reduce_group=reduce_group,
                       avg_group=avg_group, needs_dp_avg=needs_dp_avg)
        return
    from megatron.core.transformer.moe.moe_utils import save_to_aux_losses_tracker

    save_to_aux_losses_tracker(name, value, layer_number, num_layers, reduce_group=reduce_group,
                               avg_group=avg_group, reduce_group_has_dp=not needs_dp_avg)


def metric_entries() -> Dict[str, MetricEntry]:
    """The tracked metrics (live tensors: :func:`reduce_metrics` reduces them in place)."""
    tracker = _tracker()
    if tracker is not None:
        return {n: MetricEntry(e.values, e.reduce_group, e.avg_group, e.needs_dp_avg)
                for n, e in tracker.metrics.items()}
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    return {n: MetricEntry(e["values"], e.get("reduce_group"), e.get("avg_group"),
                           not e.get("reduce_group_has_dp", False))
            for n, e in get_moe_layer_wise_logging_tracker().items()}


def reduce_metrics(names, pp_group, dp_group) -> None:
    """All-reduce metrics ``names`` in place, the 0.19 tracker's order on every line: sum over
    PP (each stage holds its layers), sum over ``reduce_group``, mean over ``avg_group``,
    mean over ``dp_group`` when ``needs_dp_avg``. (0.16's helper skips the DP mean for
    metrics without a reduce group, so it would log a per-rank value there.)"""
    entries = metric_entries()
    avg = torch.distributed.ReduceOp.AVG
    for name in names:
        e = entries[name]
        torch.distributed.all_reduce(e.values, group=pp_group)
        if e.reduce_group is not None:
            torch.distributed.all_reduce(e.values, group=e.reduce_group)
        if e.avg_group is not None:
            torch.distributed.all_reduce(e.values, group=e.avg_group, op=avg)
        if e.needs_dp_avg:
            torch.distributed.all_reduce(e.values, group=dp_group, op=avg)


def clear_metrics() -> None:
    """Zero every tracked metric (Megatron's ``clear``)."""
    tracker = _tracker()
    if tracker is not None:
        tracker.clear()
        return
    for entry in metric_entries().values():
        entry.values.zero_()


# ------------------------------------------------------------------------ checkpoints


def write_legacy_common(directory) -> None:
    """Make a dist-checkpoint loadable by every supported line (collective).

    megatron-core 0.19 saves the common (non-tensor) state as a ``common_state`` object inside
    the torch_dist files; 0.16 reads it only from ``common.pt``. After a save, rank 0 writes
    ``common.pt`` from the checkpoint when it is missing (0.19 reads ``common.pt`` first when
    present, so both lines then load the same state). A no-op for 0.16 checkpoints.
    """
    import os

    from megatron.core.dist_checkpointing import serialization

    path = os.path.join(str(directory), "common.pt")
    if torch.distributed.get_rank() == 0 and not os.path.exists(path):
        torch.save(serialization.load_common_state_dict(str(directory)), path)
    torch.distributed.barrier()
