"""The layers the MoE-layer benchmark times, and how the stock layers are matched to MoHGE.

Every layer is a full Megatron ``MoELayer`` (router + token dispatcher + experts) with gated
SiLU experts and no biases, built after seeding and put in training mode:

* :func:`build_mohge_layer`: the MoHGE layer of ``get_mohge_moe_module_spec`` (group loss on);
* :func:`build_stock_layer`: Megatron's stock layer (aux-loss balancing) with
  ``SequentialMLP`` (``local``) or ``TorchGroupedMLP`` (``torch``) experts.

The matched stock widths are rounded by :func:`round_width`; :func:`expert_gemm_flops` is
the experts' GEMM FLOP count behind the benchmark's GFLOP/s figures.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from megatron_mohge.config import MoHGEConfig
from megatron_mohge.sizes import ffn_matrices

KINDS = ("mohge", "moe_baseline", "moe_equal_total", "moe_equal_activated")
DISPATCHERS = ("allgather", "alltoall")
BACKENDS = ("local", "torch")
DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
#: the stock kind whose expected routed FLOPs/token equal MoHGE's (see layer_bench's doc)
SAME_EXPECTED_FLOPS_KIND = "moe_equal_total"
STOCK_AUX_LOSS_COEFF = 1e-2
GATED_MULT = ffn_matrices(True)  # the bench layers are gated (SwiGLU) and bias-free


def round_width(value: float) -> int:
    """The width rounding used for the matched stock layers: half up, at least 1."""
    return max(1, int(math.floor(value + 0.5)))


def check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"run_layer_bench: {name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"run_layer_bench: {name} must be >= {minimum}, got {value}")


def _base_config(hidden_size: int, dispatcher: str, dtype: str = "fp32", **moe):
    from megatron.core.transformer.transformer_config import TransformerConfig

    params_dtype = getattr(torch, DTYPES[dtype])
    kw = dict(num_layers=1, hidden_size=hidden_size, num_attention_heads=1,
              use_cpu_initialization=True, gated_linear_unit=True, activation_func=F.silu,
              add_bias_linear=False, bf16=dtype == "bf16", fp16=False, params_dtype=params_dtype,
              cuda_graph_scope=[],  # the default "full" only warns that it is deprecated
              moe_grouped_gemm=False, moe_token_dispatcher_type=dispatcher,
              moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=STOCK_AUX_LOSS_COEFF)
    kw.update(moe)
    return TransformerConfig(**kw)


def _seed_all(seed: int) -> None:
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def build_mohge_layer(mohge: MoHGEConfig, hidden_size: int, dispatcher: str = "allgather",
                      seed: int = 1234, backend: str = "local", dtype: str = "fp32"):
    """The MoHGE ``MoELayer`` (``backend`` experts), built after seeding, in training mode."""
    from megatron_mohge.specs import get_mohge_moe_module_spec

    mohge = dataclasses.replace(mohge, expert_backend=backend)
    tc = mohge.apply_to(_base_config(hidden_size, dispatcher, dtype))
    _seed_all(seed)
    # Specs are ModuleSpecs (0.16) or partials (0.19); both are called to build.
    layer = get_mohge_moe_module_spec(mohge, use_te=False)(config=tc, layer_number=1)
    # Full training cost: the scheduled group loss is on (as in the second part of training).
    layer.router.set_training_progress(1.0)
    return layer.train()


def build_stock_layer(num_experts: int, width: int, topk: int, hidden_size: int,
                      dispatcher: str = "allgather", seed: int = 1234, backend: str = "local",
                      dtype: str = "fp32"):
    """Megatron's stock ``MoELayer`` (aux-loss balancing) with ``SequentialMLP`` experts
    (``local``) or ``TorchGroupedMLP`` experts (``torch``)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec

    tc = _base_config(hidden_size, dispatcher, dtype, num_moe_experts=num_experts,
                      moe_ffn_hidden_size=width, moe_router_topk=topk)
    spec = get_moe_module_spec(use_te=False, num_experts=num_experts, moe_grouped_gemm=False)
    if backend == "torch":  # the same spec (ModuleSpec on 0.16, partial on 0.19), other experts
        from megatron_mohge.compat.mcore import builder_parts, rebuild_like
        from megatron_mohge.experts.torch_backend import TorchGroupedMLP

        module, sub, params = builder_parts(spec)
        experts = rebuild_like(sub.experts, TorchGroupedMLP, builder_parts(sub.experts).submodules)
        spec = rebuild_like(spec, module, dataclasses.replace(sub, experts=experts), params)
    _seed_all(seed)
    layer = spec(config=tc, layer_number=1)
    return layer.train()


def measure_mohge_routing(layer, x: torch.Tensor):
    """Route ``x`` once with the MoHGE layer's router (eval mode, no grad, no jitter) and
    return its ``LayerRouting`` (activated routed params/token, mean chosen width...)."""
    from megatron_mohge.metrics import layer_routing

    router = layer.router
    mode = router.training
    router.eval()
    router.counter.reset()
    try:
        with torch.no_grad():
            router(x)
        return layer_routing(router)
    finally:
        router.counter.reset()
        router.train(mode)


def expert_gemm_flops(counts: list, widths: list, hidden: int) -> float:
    """Forward + backward GEMM FLOPs of gated experts: per expert ``3 x 2 t h (2w + w)``."""
    return float(sum(3 * 2 * t * hidden * GATED_MULT * w for t, w in zip(counts, widths)))


def scale_widths(cfg: MoHGEConfig, factor: int) -> MoHGEConfig:
    """``cfg`` with every expert width (and the shared width) times ``factor``."""
    check_int("width_scale", factor, 1)
    if factor == 1:
        return cfg
    shared = cfg.shared_expert_width * factor if cfg.shared_expert_width else None
    return dataclasses.replace(cfg, widths=[w * factor for w in cfg.widths],
                               shared_expert_width=shared)
