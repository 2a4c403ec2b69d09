"""Hybrid stack specs: Megatron's ``HybridModel`` with MoHGE as its ``E`` (MoE) layer.

``HybridModel`` (``megatron.core.models.hybrid``, the class megatron-core 0.19 asks new users
to pick over the deprecated ``GPTModel``) builds its stack from a layer pattern (``*``
attention, ``E`` MoE, ``-`` MLP, ``M`` Mamba, ...) and a stack spec with one layer spec per
symbol. On 0.16.1 the same design is ``MambaModel`` (:class:`~megatron_mohge.compat.versions.
HybridModelAPI`). We start from Megatron's own specs and change only:

* ``moe_layer``'s MLP -> the MoHGE ``MoELayer`` spec (:func:`~megatron_mohge.specs.
  get_mohge_moe_module_spec`) or, for baselines, the stock one with a counting router;
* the local (non-TE) variant: Megatron's stock stack spec is TE-only, so ``*``, ``-`` and
  ``E`` are cut from Megatron's local GPT layer spec (attention half / MLP half), and the
  stack's final norm -- hard-wired to ``TENorm`` in ``HybridStack`` -- is that spec's norm
  (:func:`local_norm_stack`). ``M``/``G``/``D``/``+`` stay Megatron's (TE + CUDA kernels).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

from megatron_mohge.compat.mcore import builder_parts
from megatron_mohge.compat.versions import hybrid_model_api
from megatron_mohge.config import ConfigError, MoHGEConfig
from megatron_mohge.specs import (get_mohge_moe_module_spec, get_noisy_topk_moe_module_spec,
                                  resolve_use_te, with_counted_router)

#: Layer symbols whose Megatron layers need CUDA kernels (mamba_ssm / causal-conv1d for
#: ``M``, flash-linear-attention for ``G``) besides Transformer Engine.
CUDA_ONLY_SYMBOLS = frozenset("MG")
#: Layer symbols our specs build without TE: attention, MLP, MoE.
LOCAL_SYMBOLS = frozenset("*-E")
#: Megatron's pattern separators (0.19: pipeline stages, MTP depths), not layers.
PATTERN_SEPARATORS = "|/"


def get_mohge_hybrid_stack_spec(mohge_config: MoHGEConfig, use_te: Optional[bool] = None):
    """Megatron's hybrid stack spec with every ``E`` layer a MoHGE layer.

    ``use_te=False`` (or ``None`` without a usable TE) gives the local variant (CPU, GPUs
    without TE): ``*``, ``-`` and ``E`` layers only. Pass it to ``HybridModel(
    hybrid_stack_spec=...)`` or set it as ``HybridModelConfig.hybrid_stack_spec``; the
    ``TransformerConfig`` must come from ``mohge_config.apply_to(...)``.
    """
    use_te = resolve_use_te(use_te)
    return hybrid_stack_with_moe(get_mohge_moe_module_spec(mohge_config, use_te), use_te)


def get_stock_hybrid_stack_spec(num_experts: Optional[int], use_te: Optional[bool] = None, *,
                                noisy_topk: Optional[dict] = None):
    """The stock equivalent (baselines): Megatron's uniform-width ``MoELayer`` as ``E``, its
    ``TopKRouter`` counting its routing, or the noisy top-k router (``noisy_topk``: the keyword
    arguments of :func:`~megatron_mohge.specs.get_noisy_topk_moe_module_spec`). ``num_experts
    =None``: a dense model (no ``E`` layers allowed in the pattern)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    use_te = resolve_use_te(use_te)
    if num_experts is None:
        moe = None
    elif noisy_topk is not None:
        moe = get_noisy_topk_moe_module_spec(num_experts, use_te, **noisy_topk)
    else:
        moe = with_counted_router(get_moe_module_spec(
            use_te=use_te, num_experts=num_experts, moe_grouped_gemm=use_te))
    return hybrid_stack_with_moe(moe, use_te)


def hybrid_stack_with_moe(moe_spec, use_te: bool):
    """Megatron's hybrid stack spec (``use_te``) or its local variant, ``moe_spec`` as the MLP
    of the ``E`` layer (``None``: keep the stock one)."""
    api = hybrid_model_api()
    stack = api.stock_stack_spec() if use_te else _local_stack_spec(moe_spec)
    if moe_spec is None or not use_te:
        return stack
    moe_layer = stack.submodules.moe_layer
    moe_layer = dataclasses.replace(
        moe_layer, submodules=dataclasses.replace(moe_layer.submodules, mlp=moe_spec))
    return dataclasses.replace(
        stack, submodules=dataclasses.replace(stack.submodules, moe_layer=moe_layer))


def _local_stack_spec(moe_spec):
    """``*``, ``-`` and ``E`` layers cut from Megatron's local GPT layer spec (a
    ``TransformerLayer`` is attention half + MLP half; a hybrid layer is one half)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.ssm.mlp_layer import MLPLayer
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_layer import (MoETransformerLayer,
                                                             TransformerLayer,
                                                             TransformerLayerSubmodules)

    api = hybrid_model_api()
    # ``normalization`` is read from the TransformerConfig when a norm is built, so one spec
    # serves RMSNorm and LayerNorm
    dense = get_gpt_layer_local_spec().submodules

    def half(module, **fields):
        return ModuleSpec(module=module, submodules=TransformerLayerSubmodules(**fields))

    layers = dict(
        attention_layer=half(TransformerLayer, input_layernorm=dense.input_layernorm,
                             self_attention=dense.self_attention,
                             self_attn_bda=dense.self_attn_bda),
        mlp_layer=half(MLPLayer, pre_mlp_layernorm=dense.pre_mlp_layernorm, mlp=dense.mlp,
                       mlp_bda=dense.mlp_bda),
    )
    if moe_spec is not None:
        layers["moe_layer"] = half(MoETransformerLayer, pre_mlp_layernorm=dense.pre_mlp_layernorm,
                                   mlp=moe_spec, mlp_bda=dense.mlp_bda)
    return ModuleSpec(module=local_norm_stack(api.stack_cls, builder_parts(
        dense.input_layernorm).module), submodules=api.submodules_cls(**layers))


@functools.lru_cache(maxsize=None)
def local_norm_stack(stack_cls: type, norm_cls: type) -> type:
    """``stack_cls`` (``HybridStack`` / ``MambaStack``) with its final norm built from
    ``norm_cls`` instead of the ``TENorm`` it hard-wires; same parameter names and
    checkpoint keys (``decoder.final_norm.weight``)."""

    def __init__(self, config, submodules, *args, post_layer_norm: bool = True, **kwargs):
        stack_cls.__init__(self, config, submodules, *args, post_layer_norm=False, **kwargs)
        self.post_layer_norm = post_layer_norm
        if self.post_process and post_layer_norm:
            self.final_norm = norm_cls(config=config, hidden_size=config.hidden_size,
                                       eps=config.layernorm_epsilon)

    return type(f"Local{stack_cls.__name__}", (stack_cls,),
                {"__init__": __init__, "__module__": __name__,
                 "__doc__": f"{stack_cls.__name__} with a {norm_cls.__name__} final norm."})


def check_pattern_runs_here(pattern: str, use_te: bool, cuda: bool) -> None:
    """Refuse, in one line, a pattern whose layers cannot be built here (a ``ConfigError``:
    the CLIs print it as one line and exit 2)."""
    from megatron_mohge.compat.versions import TESTED_MCORE_RELEASES, mcore_version

    api = hybrid_model_api()
    layers = set(pattern) - set(PATTERN_SEPARATORS)
    unknown = sorted(layers - api.symbols)
    if unknown:  # 0.16.1's MambaModel has M * - E only (GatedDeltaNet came with HybridModel)
        raise ConfigError(
            f"model.hybrid_layer_pattern {pattern!r}: {'/'.join(unknown)} layers are not in "
            f"megatron-core {mcore_version()}'s {api.model_cls.__name__} (layers "
            f"{''.join(sorted(api.symbols))}); HybridModel in megatron-core "
            f"{TESTED_MCORE_RELEASES['0.19']} has them.")
    cuda_only = sorted(layers & CUDA_ONLY_SYMBOLS)
    if cuda_only and not cuda:
        raise ConfigError(
            f"model.hybrid_layer_pattern {pattern!r}: {'/'.join(cuda_only)} layers need CUDA "
            "kernels (Megatron's Mamba / GatedDeltaNet layers: mamba_ssm, causal-conv1d, TE); "
            "on CPU use only '*', 'E' and '-' layers.")
    foreign = sorted(layers - LOCAL_SYMBOLS)
    if foreign and not use_te:
        raise ConfigError(
            f"model.hybrid_layer_pattern {pattern!r}: {'/'.join(foreign)} layers exist only in "
            "Megatron's Transformer Engine stack spec; install TE (moe.use_te: true) or use only "
            "'*', 'E' and '-' layers.")
