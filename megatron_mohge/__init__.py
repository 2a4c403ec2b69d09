"""megatron-mohge: Mixture of Heterogeneous Grouped Experts for Megatron-Core.

Public API (stable): ``MoHGEConfig`` (``from_yaml``/``to_yaml``/``from_dict``/``apply_to``),
``get_mohge_layer_spec``, ``get_mohge_decoder_block_spec`` (``GPTModel``),
``get_mohge_hybrid_stack_spec`` (``HybridModel``), ``plan_allocation``,
``set_training_progress``, ``wrap_finalize_model_grads`` / ``end_of_step`` (once-per-step
balancing) and ``compat.enable_cpu_mode``.

Importing the package is cheap: the Megatron-dependent parts load on first use.
"""

from megatron_mohge import compat
from megatron_mohge.config.allocation import AllocationPlan, plan_allocation
from megatron_mohge.config import (
    AllocationConfig,
    ConfigError,
    LossConfig,
    MoHGEConfig,
    NoisyGatingConfig,
    RouterConfig,
)
from megatron_mohge.version import __version__

_LAZY = {
    "get_mohge_layer_spec": "megatron_mohge.specs",
    "get_mohge_decoder_block_spec": "megatron_mohge.specs",
    "get_mohge_moe_module_spec": "megatron_mohge.specs",
    "get_mohge_hybrid_stack_spec": "megatron_mohge.hybrid_specs",
    "get_stock_hybrid_stack_spec": "megatron_mohge.hybrid_specs",
    "set_training_progress": "megatron_mohge.routing.base",
    "wrap_finalize_model_grads": "megatron_mohge.routing.balance",
    "end_of_step": "megatron_mohge.routing.balance",
    "MoHGERouter": "megatron_mohge.routing.mohge_router",
    "NoisyTopKRouter": "megatron_mohge.routing.noisy_topk",
    "HeterogeneousExperts": "megatron_mohge.experts.hetero",
}

__all__ = ["MoHGEConfig", "RouterConfig", "LossConfig", "AllocationConfig", "NoisyGatingConfig",
           "ConfigError", "AllocationPlan", "plan_allocation", "compat", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'megatron_mohge' has no attribute {name!r}")
