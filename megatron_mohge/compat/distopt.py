"""Loading a ``DistributedOptimizer`` checkpoint when its inner optimizer is torch's Adam.

Without Apex or Transformer Engine (CPU, torch-only GPU installs) megatron-core's distributed
optimizer wraps ``torch.optim.Adam``, and three steps of its checkpoint load break. The fixes
live here once, applied one way: :func:`install_load_fixes` wraps Megatron's load methods with
them (idempotent). ``mohge-train`` installs it when it loads
(:mod:`megatron_mohge.training.checkpoint`, which also calls (1) for Apex / TE Adam, as it
always did), ``mohge-pretrain`` and the Megatron-LM launchers with their hooks, on GPUs too,
and CPU mode's ``distopt-load`` patch as well. Each fix is a no-op where it is not needed.

1. :func:`init_states_for_load`: torch Adam's states appear at its first step, and
   ``DistributedOptimizer.state_dict()`` asserts exactly one ``step`` among them, so a fresh
   optimizer cannot build the template it loads into -> Megatron's own
   ``_init_optimizer_states_with_dummy_values`` (one step on zero gradients; the load then
   overwrites every value), as its ``fsdp_dtensor`` load path already does.
2. :func:`own_step_tensors`: ``load_state_dict`` gives every parameter's state the *same*
   ``step`` tensor, which Adam increments in place once per parameter (and a dp-reshardable
   state load overwrites with the template's), so the bias correction is wrong from the first
   step after a resume -> each state gets its own tensor of the saved step (the param group's
   ``step``, which is what Megatron saves for torch Adam).
3. :func:`adam_steps_hidden`: ``load_parameter_state_from_fully_reshardable`` copies every
   tensor state of a parameter from the checkpoint, which never holds ``step`` (it travels in
   the param groups): KeyError -> the steps are hidden meanwhile.
"""

from __future__ import annotations

import contextlib
import functools

import torch


def distributed_optimizers(optimizer) -> list:
    """The ``DistributedOptimizer`` parts of ``optimizer`` (a chained one or a single one)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    subs = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    return [s for s in subs if isinstance(s, DistributedOptimizer)]


def init_states_for_load(optimizer) -> None:
    """Create the inner optimizer states of each distributed part that has none yet (1)."""
    for sub in distributed_optimizers(optimizer):
        if not sub.optimizer.state:
            sub._init_optimizer_states_with_dummy_values()


def own_step_tensors(optimizer) -> None:
    """One ``step`` tensor per parameter state, the saved step of its param group (2)."""
    for sub in distributed_optimizers(optimizer):
        for group in sub.optimizer.param_groups:  # torch Adam: the group holds the saved step
            if "step" not in group:
                continue
            for p in group["params"]:
                state = sub.optimizer.state.get(p)
                if state is not None and "step" in state:
                    state["step"] = torch.tensor(float(group["step"]))


@contextlib.contextmanager
def adam_steps_hidden(inner):
    """``inner`` (a torch optimizer) without its per-parameter ``step`` states meanwhile (3)."""
    steps = {p: st.pop("step") for p, st in inner.state.items() if "step" in st}
    try:
        yield
    finally:
        for p, step in steps.items():
            inner.state[p]["step"] = step


def uses_torch_adam(optimizer) -> bool:
    """Whether a ``DistributedOptimizer`` wraps torch's own Adam / AdamW (no Apex / TE)."""
    return isinstance(optimizer.optimizer, (torch.optim.Adam, torch.optim.AdamW))


def install_load_fixes() -> bool:
    """Wrap ``DistributedOptimizer``'s load methods with (1)-(3) for instances that wrap torch
    Adam (others run Megatron's code untouched), and run
    ``load_parameter_state_from_dp_reshardable`` under ``no_grad``: fp32 parameters' main
    shards are views of the parameters, and it copies into them with autograd on ("a view of
    a leaf Variable that requires grad"), as its sibling loaders do not. Idempotent; returns
    whether it installed now."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as cls

    if getattr(cls, "__mohge_load_fixes__", False):
        return False

    def wrap(name, before=None, context=None, after=None):
        original = getattr(cls, name)

        @functools.wraps(original)
        def wrapped(self, *args, **kwargs):
            if not uses_torch_adam(self):
                return original(self, *args, **kwargs)
            if before is not None:
                before(self, *args, **kwargs)
            with (context(self) if context is not None else contextlib.nullcontext()):
                out = original(self, *args, **kwargs)
            if after is not None:
                after(self)
            return out

        wrapped.__mohge_original__ = original
        setattr(cls, name, wrapped)

    def init_if_loading(self, *args, **kwargs):
        if kwargs.get("is_loading", args[1] if len(args) > 1 else False):
            init_states_for_load(self)

    wrap("sharded_state_dict", before=init_if_loading)
    wrap("load_parameter_state_from_fully_reshardable",
         context=lambda self: adam_steps_hidden(self.optimizer))
    wrap("load_state_dict", after=own_step_tensors)
    original = cls.load_parameter_state_from_dp_reshardable

    @functools.wraps(original)
    def load_parameter_state_from_dp_reshardable(self, *args, **kwargs):
        with torch.no_grad():
            return original(self, *args, **kwargs)

    load_parameter_state_from_dp_reshardable.__mohge_original__ = original
    cls.load_parameter_state_from_dp_reshardable = load_parameter_state_from_dp_reshardable
    cls.__mohge_load_fixes__ = True
    return True
