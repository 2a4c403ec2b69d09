"""Transformer Engine backend of the MoHGE experts: one grouped GEMM pair per width.

Imported only when ``backend="te"`` is requested, so the package imports without TE.
Each width run is a stock Megatron ``TEGroupedMLP`` (TE ``GroupedLinear`` fc1/fc2, FP8/FP4
padding of tokens per expert via ``Fp8Padding``) built with a config copy of that width.

Megatron's TE grouped linears place expert ``k`` of a rank at global index
``ep_rank * num_gemms + k`` (its contiguous layout). MoHGE experts of one group are not
contiguous across ranks in general, so checkpoints are written per GEMM with the expert's
``(group, index)`` instead, using the same Megatron helpers as the TE linears and the same
keys and shapes as the local backend (checkpoints move between backends).

Not run on a GPU yet (docs/compatibility.md, 'What runs where'); CPU tests cover the checkpoint key mapping
with a stand-in module.
"""

from __future__ import annotations

from megatron.core.dist_checkpointing.utils import replace_prefix_for_sharding
from megatron.core.transformer.mlp import apply_swiglu_sharded_factory
from megatron.core.transformer.moe import experts as mcore_experts
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megatron_mohge.compat.mcore import supported_kwargs


def build_te_grouped_mlp(num_experts: int, config, submodules, pg_collection, name=None):
    TEGroupedMLP = mcore_experts.TEGroupedMLP
    return TEGroupedMLP(num_experts, config, submodules, pg_collection=pg_collection,
                        **supported_kwargs(TEGroupedMLP, name=name))


def grouped_linear_sharded_state_dict(linear, module_prefix: str, key_prefix: str,
                                      expert_indices, num_group_experts: int, tp_axis: int,
                                      sharded_offsets: tuple, metadata: dict, swiglu: bool):
    """Per-GEMM sharded tensors of a TE grouped linear, keyed by (group, index).

    ``module_prefix``: state-dict prefix of ``linear`` (``...width_experts.<r>.linear_fc1.``).
    ``key_prefix``: checkpoint key prefix (``...group_<g>.linear_fc1.``).
    ``tp_axis``: 0 for column-parallel fc1 (weight and bias), 1 for row-parallel fc2.
    """
    singleton = (metadata or {}).get("singleton_local_shards", False)
    full = linear.state_dict(prefix="", keep_vars=True)
    extra_states = linear._split_extra_state(full["_extra_state"])
    ep_axis = len(sharded_offsets)
    out = {}
    for k, index in enumerate(expert_indices):
        state = {f"{k}.weight": full[f"weight{k}"], f"{k}._extra_state": extra_states[k]}
        axis_map = {f"{k}.weight": tp_axis}
        if linear.use_bias:
            state[f"{k}.bias"] = full[f"bias{k}"]
            if tp_axis == 0:
                axis_map[f"{k}.bias"] = 0
        if singleton:
            offsets, target = sharded_offsets, f"{key_prefix[:-1]}.{index}."
        else:
            offsets, target = (*sharded_offsets, (ep_axis, index, num_group_experts)), key_prefix
        sub = make_sharded_tensors_for_checkpoint(state, "", axis_map, offsets,
                                                  tp_group=linear._tp_group,
                                                  dp_cp_group=metadata["dp_cp_group"])
        if swiglu:
            for name in (f"{k}.weight", f"{k}.bias"):
                if name in sub:
                    # 0.19 takes the groups explicitly (older lines read parallel_state).
                    sub[name] = apply_swiglu_sharded_factory(
                        sub[name], offsets, singleton,
                        **supported_kwargs(apply_swiglu_sharded_factory,
                                           tp_group=linear._tp_group,
                                           dp_group=metadata["dp_cp_group"]))
        replace_prefix_for_sharding(sub, f"{k}.", target)
        out[f"{module_prefix}weight{k}"] = sub[f"{k}.weight"]
        out[f"{module_prefix}_extra_state{'' if k == 0 else k}"] = sub[f"{k}._extra_state"]
        if linear.use_bias:
            out[f"{module_prefix}bias{k}"] = sub[f"{k}.bias"]
    return out


def te_run_sharded_state_dict(module, module_prefix: str, group_prefix: str, expert_indices,
                              num_group_experts: int, sharded_offsets: tuple, metadata: dict):
    """Sharded state dict of one width run (a ``TEGroupedMLP``)."""
    glu = bool(module.config.gated_linear_unit)
    sd = grouped_linear_sharded_state_dict(
        module.linear_fc1, f"{module_prefix}linear_fc1.", f"{group_prefix}linear_fc1.",
        expert_indices, num_group_experts, 0, sharded_offsets, metadata, swiglu=glu)
    sd.update(grouped_linear_sharded_state_dict(
        module.linear_fc2, f"{module_prefix}linear_fc2.", f"{group_prefix}linear_fc2.",
        expert_indices, num_group_experts, 1, sharded_offsets, metadata, swiglu=False))
    return sd
