"""Routed experts of several widths, built from Megatron's own expert modules.

On each EP rank the allocation plan gives an ordered list of local experts in which every
group (width) is one contiguous run. We build one Megatron expert module per run with a
config copy whose FFN width is that group's width:

* ``backend="local"``: ``SequentialMLP`` (one ``MLP`` per expert; runs anywhere);
* ``backend="torch"``: ``TorchGroupedMLP`` (one ``torch._grouped_mm`` for fc1 and one for
  fc2 per width; no TE needed), see ``torch_backend.py``;
* ``backend="te"``: ``TEGroupedMLP`` (one Transformer Engine grouped GEMM per width, with
  its FP8 padding), see ``te_backend.py``.

The dispatcher hands us tokens sorted by local expert and ``tokens_per_expert``; we split
both at the run boundaries and concatenate the runs' outputs in the same order.

Checkpoints key experts by ``(group, index)``: expert ``i`` of group ``g`` is entry ``i``
of an expert axis of size ``N_g`` under ``<prefix>group_<g>.``, whatever EP rank or slot
holds it, so a checkpoint saved at one EP size loads at another, and both backends write
the same keys (as Megatron's SequentialMLP and TEGroupedMLP do); all three backends do.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.transformer.mlp import MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

from megatron_mohge.compat.mcore import supported_kwargs
from megatron_mohge.config import MoHGEConfig



def _build_local(n, cfg, submodules, pg_collection, name):
    return SequentialMLP(n, cfg, submodules, pg_collection=pg_collection,
                         **supported_kwargs(SequentialMLP, name=name))


def _build_torch(n, cfg, submodules, pg_collection, name):
    from megatron_mohge.experts.torch_backend import TorchGroupedMLP

    return TorchGroupedMLP(n, cfg, pg_collection=pg_collection, name=name)


def _build_te(n, cfg, submodules, pg_collection, name):
    from megatron_mohge.experts.te_backend import build_te_grouped_mlp

    return build_te_grouped_mlp(n, cfg, submodules, pg_collection, name=name)


def _local_sharded_state_dict(module, local_prefix, global_prefix, idx, n_g, sharded_offsets,
                              metadata):
    """A ``SequentialMLP`` run: each expert's own sharded state, re-keyed to its group."""
    singleton = (metadata or {}).get("singleton_local_shards", False)
    sd = {}
    for k, expert in enumerate(module.local_experts):
        expert_prefix = f"{local_prefix}local_experts.{k}."
        if singleton:
            target, offsets = f"{global_prefix}{idx[k]}.", sharded_offsets
        else:
            target = global_prefix
            offsets = (*sharded_offsets, (len(sharded_offsets), idx[k], n_g))
        esd = expert.sharded_state_dict(expert_prefix, offsets, metadata)
        replace_prefix_for_sharding(esd, expert_prefix, target)
        sd.update(esd)
    return sd


def _torch_sharded_state_dict(module, local_prefix, global_prefix, idx, n_g, sharded_offsets,
                              metadata):
    return module.expert_sharded_state_dict(
        local_prefix, global_prefix, idx, n_g, sharded_offsets, metadata,
        singleton_key_prefix=lambda i: f"{global_prefix}{i}.")


def _te_sharded_state_dict(module, local_prefix, global_prefix, idx, n_g, sharded_offsets,
                           metadata):
    from megatron_mohge.experts.te_backend import te_run_sharded_state_dict

    return te_run_sharded_state_dict(module, local_prefix, global_prefix, idx, n_g,
                                     sharded_offsets, metadata)


@dataclass(frozen=True)
class ExpertBackend:
    """What differs between expert backends, for one width run of experts.

    ``build(n, cfg, submodules, pg_collection, name)`` makes the module of ``n`` experts;
    ``counts_as_list``: its forward takes the per-expert token counts as a Python list (else a
    ``LongTensor``); ``sharded_state_dict(module, local_prefix, global_prefix, idx, n_g,
    sharded_offsets, metadata)`` keys its experts by ``(group, index)``. The TE and torch
    backends are imported on first use (TE is optional).
    """

    build: Callable
    counts_as_list: bool
    sharded_state_dict: Callable


_BACKENDS = {
    "local": ExpertBackend(_build_local, False, _local_sharded_state_dict),
    "torch": ExpertBackend(_build_torch, True, _torch_sharded_state_dict),
    "te": ExpertBackend(_build_te, False, _te_sharded_state_dict),
}
BACKENDS = tuple(_BACKENDS)  # "local", "torch", "te"


def width_config(config, width: int):
    """Config copy for experts of FFN width ``width``.

    Megatron's ``MLP`` sizes fc1 from its ``ffn_hidden_size`` argument but fc2 from
    ``config.ffn_hidden_size`` and the expert classes read ``config.moe_ffn_hidden_size``,
    so both fields must carry the group width.
    """
    cfg = copy.copy(config)
    cfg.ffn_hidden_size = width
    cfg.moe_ffn_hidden_size = width
    return cfg


class HeterogeneousExperts(MegatronModule):
    """The local routed experts of a MoHGE layer on this EP rank (``MoESubmodules.experts``).

    Args:
        num_local_experts: experts on this rank (``E / EP``), passed by ``MoELayer``.
        config: the layer's ``TransformerConfig``.
        submodules: ``MLPSubmodules`` of the expert linears (local or TE grouped linears).
        pg_collection: Megatron process groups (``None``: from ``parallel_state``).
        name: module instance name (passed by ``MoELayer`` from megatron-core 0.19); each
            width run is named ``<name>.width_experts.<r>``.
        mohge_config: the MoHGE layer description.
        backend: ``"local"``, ``"torch"`` or ``"te"``.
    """

    def __init__(self, num_local_experts: int, config, submodules: MLPSubmodules,
                 pg_collection=None, name: Optional[str] = None, *, mohge_config: MoHGEConfig,
                 backend: str = "local"):
        super().__init__(config=config)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        pg_collection = pg_collection if pg_collection is not None else get_default_pg_collection()
        self.mohge = mohge_config
        self.backend = backend
        self._ops = _BACKENDS[backend]
        self.ep_group = pg_collection.ep
        self.tp_group = pg_collection.expt_tp
        self.dp_group = pg_collection.expt_dp
        ep_size, ep_rank = self.ep_group.size(), self.ep_group.rank()
        self.plan = mohge_config.allocation_plan(ep_size)
        if num_local_experts != self.plan.local_size:
            raise ValueError(f"MoELayer gave {num_local_experts} local experts but the MoHGE plan "
                             f"places {self.plan.local_size} per rank")
        self.num_local_experts = num_local_experts
        #: [(group, [index-in-group, ...]), ...] in local slot order.
        self.runs = self.plan.local_runs(ep_rank)
        self.run_sizes = [len(ix) for _, ix in self.runs]
        modules = []
        for r, (g, idx) in enumerate(self.runs):
            cfg = width_config(config, mohge_config.widths[g])
            run_name = None if name is None else f"{name}.width_experts.{r}"
            modules.append(self._ops.build(len(idx), cfg, submodules, pg_collection, run_name))
        #: one expert module per width run, same order as ``runs``.
        self.width_experts = torch.nn.ModuleList(modules)

    def forward(self, permuted_local_hidden_states: torch.Tensor, tokens_per_expert: torch.Tensor,
                permuted_probs: torch.Tensor):
        """Run each width's experts on its contiguous block of dispatched tokens."""
        if len(self.width_experts) == 1:
            return self.width_experts[0](permuted_local_hidden_states, tokens_per_expert,
                                         permuted_probs)
        counts = tokens_per_expert.tolist()
        per_run, start = [], 0
        for n in self.run_sizes:
            per_run.append(counts[start:start + n])
            start += n
        run_tokens = [int(sum(c)) for c in per_run]
        xs = torch.split(permuted_local_hidden_states, run_tokens)
        ps = torch.split(permuted_probs, run_tokens)
        outputs = []
        for module, x, p, c in zip(self.width_experts, xs, ps, per_run):
            counts = c if self._ops.counts_as_list else torch.tensor(c, dtype=torch.long)
            out, bias = module(x, counts, p)
            assert bias is None, "expert bias is folded into the output by Megatron experts"
            outputs.append(out)
        return torch.cat(outputs, dim=0), None

    def backward_dw(self):
        for module in self.width_experts:
            module.backward_dw()

    # ------------------------------------------------------------------ checkpoints
    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: Optional[dict] = None):
        """Experts keyed by (group, index): ``<prefix>group_<g>.<param>`` with axis ``N_g``."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        out = {}
        for r, ((g, idx), module) in enumerate(zip(self.runs, self.width_experts)):
            n_g = self.mohge.experts_per_group[g]
            sd = self._ops.sharded_state_dict(module, f"{prefix}width_experts.{r}.",
                                              f"{prefix}group_{g}.", idx, n_g, sharded_offsets,
                                              metadata)
            # Experts are replicated along the expert-data-parallel group only.
            edp_rank = self.dp_group.rank()
            for key, sh in sd.items():
                rid = sh.replica_id
                assert len(rid) == 3, f"expected (PP, TP, DP) replica_id for {key}, got {rid}"
                sh.replica_id = (*rid[:2], edp_rank)
            out.update(sd)
        return out
