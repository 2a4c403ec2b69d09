"""Drop-in layer specs: Megatron's GPT specs with the MoE experts and router swapped.

We start from Megatron's own specs (``get_moe_module_spec``, ``get_gpt_layer_*_spec``,
``get_gpt_decoder_block_spec``), so attention, norms, shared experts, dense/MoE
interleaving (``moe_layer_freq``) and pipeline slicing stay Megatron's. The deltas:

* ``MoESubmodules.experts`` -> ``HeterogeneousExperts`` (one expert module per width);
* ``MoESubmodules.router``  -> ``MoHGERouter`` (or a noisy top-k router, per config);
  stock MoE keeps Megatron's ``TopKRouter`` as :class:`CountedTopKRouter`, which also counts
  its routing (:func:`get_stock_decoder_block_spec`).

The MoE layer itself is Megatron's ``MoELayer`` with its stock token dispatchers.

Every spec we return has the shape of the stock one it replaces (``ModuleSpec`` on 0.16,
``functools.partial`` builders on 0.19; see :mod:`megatron_mohge.compat.mcore`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_decoder_block_spec,
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_mohge.compat.mcore import builder_parts, builds_subclass_of, rebuild_like
from megatron_mohge.compat.versions import make_moe_submodules
from megatron_mohge.config import MoHGEConfig
from megatron_mohge.experts.hetero import HeterogeneousExperts
from megatron_mohge.experts.selection import resolve_expert_backend
from megatron_mohge.routing.stock import CountedTopKRouter


def te_available() -> bool:
    """Transformer Engine's PyTorch extension imports and a CUDA device is present."""
    try:
        import torch

        from megatron.core.extensions.transformer_engine import TEColumnParallelGroupedLinear
    except Exception:  # ImportError, or TE's own failures to load its CUDA libraries
        return False
    return TEColumnParallelGroupedLinear is not None and torch.cuda.is_available()


def resolve_use_te(use_te: Optional[bool]) -> bool:
    """``None`` picks TE when it is usable; ``True`` without TE is an error."""
    if use_te is None:
        return te_available()
    if use_te and not te_available():
        raise ImportError(
            "use_te=True but Transformer Engine is not usable here (it needs TE's PyTorch "
            "extension and a CUDA GPU). Install transformer-engine[pytorch] on a GPU machine, or "
            "pass use_te=False for the local (torch) expert path.")
    return bool(use_te)


def router_builder(mohge_config: MoHGEConfig):
    """The ``MoESubmodules.router`` callable for ``mohge_config.router.type``."""
    if mohge_config.router.type == "mohge":
        from megatron_mohge.routing.mohge_router import MoHGERouter

        return functools.partial(MoHGERouter, mohge_config=mohge_config)
    from megatron_mohge.routing.noisy_topk import NoisyTopKRouter

    return functools.partial(NoisyTopKRouter.for_mohge, mohge_config=mohge_config)


def get_mohge_moe_module_spec(mohge_config: MoHGEConfig, use_te: Optional[bool] = None):
    """``MoELayer`` spec with MoHGE experts and router (shared experts as Megatron builds them).

    A ``ModuleSpec`` or a ``functools.partial`` builder, whichever Megatron's own
    ``get_moe_module_spec`` returns on the installed release.
    """
    use_te = resolve_use_te(use_te)
    stock = get_moe_module_spec(use_te=use_te, num_experts=mohge_config.num_experts,
                                moe_grouped_gemm=use_te)
    return _replace_moe_parts(stock, router=router_builder(mohge_config),
                              mohge_config=mohge_config, use_te=use_te)


def _replace_moe_parts(stock, *, router, mohge_config: Optional[MoHGEConfig] = None,
                       use_te: bool = False):
    """``stock`` MoE builder with ``router`` and (for MoHGE) heterogeneous experts."""
    _, stock_sub, stock_params = builder_parts(stock)
    experts = stock_experts = stock_sub.experts
    if mohge_config is not None:
        # TE >= 1.7 gives TEGroupedMLP (grouped GEMMs); otherwise Megatron falls back to
        # per-expert MLPs with whatever linears the backend has, and so does our local backend.
        module, expert_sub, _ = builder_parts(stock_experts)
        te_grouped = getattr(module, "__name__", "") == "TEGroupedMLP"
        backend = resolve_expert_backend(mohge_config.expert_backend, use_te, te_grouped)
        if backend == "local" and te_grouped:  # per-expert MLPs: Megatron's non-grouped linears
            stock_experts = builder_parts(get_moe_module_spec(
                use_te=use_te, num_experts=mohge_config.num_experts,
                moe_grouped_gemm=False))[1].experts
            _, expert_sub, _ = builder_parts(stock_experts)
        experts = rebuild_like(stock_experts, HeterogeneousExperts, expert_sub,
                               {"mohge_config": mohge_config, "backend": backend})
    submodules = make_moe_submodules(
        experts=experts, shared_experts=stock_sub.shared_experts, router=router)
    if isinstance(stock, ModuleSpec):
        return ModuleSpec(module=MoELayer, submodules=submodules, params=dict(stock.params),
                          metainfo=dict(stock.metainfo))
    return rebuild_like(stock, MoELayer, submodules, stock_params)


def get_mohge_layer_spec(mohge_config: MoHGEConfig, use_te: Optional[bool] = None, *,
                         normalization: Optional[str] = None, qk_layernorm: bool = False,
                         multi_latent_attention: bool = False) -> ModuleSpec:
    """A ``TransformerLayer`` spec whose MLP is a MoHGE layer.

    Usable wherever Megatron takes a layer spec (``GPTModel(transformer_layer_spec=...)``,
    ``pretrain_gpt.py --spec``); every layer then is a MoHGE layer. For dense/MoE
    interleaving and pipeline slicing use ``get_mohge_decoder_block_spec``.
    """
    use_te = resolve_use_te(use_te)
    if use_te:
        layer = get_gpt_layer_with_transformer_engine_spec(
            num_experts=mohge_config.num_experts, moe_grouped_gemm=True,
            qk_layernorm=qk_layernorm, multi_latent_attention=multi_latent_attention)
    else:
        layer = get_gpt_layer_local_spec(
            num_experts=mohge_config.num_experts, qk_layernorm=qk_layernorm,
            multi_latent_attention=multi_latent_attention, normalization=normalization)
    return replace_moe_mlp(layer, get_mohge_moe_module_spec(mohge_config, use_te))


def get_mohge_decoder_block_spec(transformer_config, mohge_config: MoHGEConfig,
                                 use_te: Optional[bool] = None, vp_stage: Optional[int] = None,
                                 pp_rank: Optional[int] = None):
    """Megatron's GPT decoder block spec with every MoE layer turned into a MoHGE layer.

    Honours ``moe_layer_freq`` (dense/MoE interleaving), shared experts and pipeline
    slicing (``vp_stage``/``pp_rank``, as ``get_gpt_decoder_block_spec``). The
    ``transformer_config`` must come from ``mohge_config.apply_to(...)``.
    """
    mohge_config.check_transformer_config(transformer_config)
    use_te = resolve_use_te(use_te)
    moe = get_mohge_moe_module_spec(mohge_config, use_te)
    return decoder_block_with_moe(transformer_config, moe, use_te, vp_stage=vp_stage,
                                  pp_rank=pp_rank)


def get_noisy_topk_moe_module_spec(num_experts: int, use_te: Optional[bool] = None, *,
                                   gating=None, group_sizes=None, group_topk: Optional[int] = None,
                                   hierarchical: bool = False):
    """Megatron's stock (uniform-width) ``MoELayer`` spec with the sparsely-gated router.

    ``gating`` is a ``NoisyGatingConfig``; ``hierarchical=True`` adds the primary gate over
    ``group_sizes`` groups picking ``group_topk`` of them (Shazeer et al. 2017, appendix B).
    """
    from megatron_mohge.routing.noisy_topk import NoisyTopKRouter

    use_te = resolve_use_te(use_te)
    stock = get_moe_module_spec(use_te=use_te, num_experts=num_experts, moe_grouped_gemm=use_te)
    router = functools.partial(NoisyTopKRouter, gating=gating, group_sizes=group_sizes,
                               group_topk=group_topk, hierarchical=hierarchical)
    return _replace_moe_parts(stock, router=router)


def get_noisy_topk_decoder_block_spec(transformer_config, use_te: Optional[bool] = None,
                                      vp_stage: Optional[int] = None,
                                      pp_rank: Optional[int] = None, **router_kwargs):
    """Megatron's GPT decoder block spec (uniform experts) with the noisy top-k router.

    ``router_kwargs`` go to ``get_noisy_topk_moe_module_spec`` (gating, groups...).
    """
    use_te = resolve_use_te(use_te)
    moe = get_noisy_topk_moe_module_spec(transformer_config.num_moe_experts, use_te,
                                         **router_kwargs)
    return decoder_block_with_moe(transformer_config, moe, use_te, vp_stage=vp_stage,
                                  pp_rank=pp_rank)


def decoder_block_with_moe(transformer_config, moe_spec, use_te: bool,
                           vp_stage: Optional[int] = None, pp_rank: Optional[int] = None):
    """Megatron's GPT decoder block spec (``get_gpt_decoder_block_spec``: dense/MoE
    interleaving, pipeline slicing) with ``moe_spec`` as the MLP of every MoE layer."""
    return _map_moe_mlps(transformer_config, use_te, vp_stage, pp_rank,
                         lambda _stock_mlp: moe_spec)


def get_stock_decoder_block_spec(transformer_config, use_te: bool,
                                 vp_stage: Optional[int] = None, pp_rank: Optional[int] = None):
    """Megatron's GPT decoder block spec as it is (stock MoE or dense layers), its MoE
    routers counting their routing (:func:`with_counted_router`)."""
    return _map_moe_mlps(transformer_config, use_te, vp_stage, pp_rank, with_counted_router)


def with_counted_router(moe_spec):
    """A stock ``MoELayer`` builder with :class:`CountedTopKRouter` for ``TopKRouter``: same
    parameters, state dict and routing, plus the routing counts the metrics read."""
    module, sub, params = builder_parts(moe_spec)
    sub = dataclasses.replace(sub, router=CountedTopKRouter)
    if isinstance(moe_spec, ModuleSpec):
        return dataclasses.replace(moe_spec, submodules=sub)
    return rebuild_like(moe_spec, module, sub, params)


def _map_moe_mlps(transformer_config, use_te: bool, vp_stage, pp_rank, fn):
    """Megatron's GPT decoder block spec with the MLP of each MoE layer replaced by
    ``fn(its MLP)``."""
    block = get_gpt_decoder_block_spec(transformer_config, use_transformer_engine=use_te,
                                       normalization=transformer_config.normalization,
                                       vp_stage=vp_stage, pp_rank=pp_rank)
    block.layer_specs = [replace_moe_mlp(spec, fn(spec.submodules.mlp)) if is_moe_layer(spec)
                         else spec for spec in block.layer_specs]
    return block


def is_moe_layer(layer_spec: ModuleSpec) -> bool:
    """Whether ``layer_spec`` is a ``TransformerLayer`` spec whose MLP builds a ``MoELayer``."""
    mlp = getattr(layer_spec.submodules, "mlp", None)
    return mlp is not None and builds_subclass_of(mlp, MoELayer)


def replace_moe_mlp(layer_spec: ModuleSpec, mlp) -> ModuleSpec:
    """``layer_spec`` (a MoE layer) with ``mlp`` as its MLP."""
    if not is_moe_layer(layer_spec):
        raise ValueError("expected a TransformerLayer spec whose mlp is a MoELayer spec")
    return dataclasses.replace(layer_spec,
                               submodules=dataclasses.replace(layer_spec.submodules, mlp=mlp))
