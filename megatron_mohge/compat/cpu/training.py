"""CPU-mode patches of the optimizer, tied embeddings and dist-checkpoint loading."""

from __future__ import annotations

import functools

import torch

from megatron_mohge.compat.cpu.proxy import (
    cuda_tensor_type_strings,
    is_cuda_device,
    tensor_cuda_is_identity,
)
from megatron_mohge.compat.cpu.redirect import module


def clip_grads() -> None:
    """``clip_grad_by_total_norm_fp32`` (and the name imported into ``optimizer.optimizer``)
    asserts ``grad.type() == 'torch.cuda.FloatTensor'`` -> the same in-place scaling with an
    fp32 dtype check. (``get_grad_norm_fp32`` / ``count_zeros_fp32`` work via the redirect.)"""
    clip = module("optimizer.clip_grads")
    original = clip.clip_grad_by_total_norm_fp32

    @functools.wraps(original)
    def clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
        if use_decoupled_grad:  # no device-type assert on that path
            return original(parameters, max_norm, total_norm, use_decoupled_grad=True)
        if isinstance(parameters, torch.Tensor):
            parameters = [parameters]
        grads = []
        for param in parameters:
            if param.grad is not None:
                if param.grad.dtype != torch.float32:
                    raise TypeError(f"clip_grad_by_total_norm_fp32 expects fp32 grads, got "
                                    f"{param.grad.dtype}")
                grads.append(clip.to_local_if_dtensor(param.grad).detach())
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0 and grads:
            torch._foreach_mul_(grads, clip_coeff)

    clip_grad_by_total_norm_fp32.__mohge_original__ = original
    clip.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    module("optimizer.optimizer").clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32


def _wrap_in(owner, attr: str, context) -> None:
    """Run ``owner.attr`` inside ``context()`` (keeps the original as ``__mohge_original__``)."""
    original = getattr(owner, attr)

    @functools.wraps(original)
    def wrapped(*args, **kwargs):
        with context():
            return original(*args, **kwargs)

    wrapped.__mohge_original__ = original
    setattr(owner, attr, wrapped)


def tied_embedding_cuda() -> None:
    """``LanguageModule.setup_embeddings_and_output_layer`` calls ``weight.data.cuda()`` on
    the tied embedding / output weight under PP>1 -> run it with ``Tensor.cuda`` as the
    identity for the duration of that call."""
    lm = module("models.common.language_module.language_module").LanguageModule
    _wrap_in(lm, "setup_embeddings_and_output_layer", tensor_cuda_is_identity)


def dist_ckpt_exchange() -> None:
    """The fully-parallel load exchanges shards through CUDA buffers (``init_data("cuda")``,
    ``.cuda()``) -> ``ShardedTensor.init_data`` maps a CUDA device to CPU, and
    ``exchange_by_distribution`` (+ the name in ``fully_parallel``) runs with ``Tensor.cuda``
    as the identity."""
    sharded = module("dist_checkpointing.mapping").ShardedTensor
    original_init_data = sharded.init_data

    @functools.wraps(original_init_data)
    def init_data(self, device, init_fn=torch.empty):
        return original_init_data(self, "cpu" if is_cuda_device(device) else device, init_fn)

    init_data.__mohge_original__ = original_init_data
    sharded.init_data = init_data
    exchange = module("dist_checkpointing.exchange_utils")
    _wrap_in(exchange, "exchange_by_distribution", tensor_cuda_is_identity)
    module("dist_checkpointing.strategies.fully_parallel").exchange_by_distribution = \
        exchange.exchange_by_distribution


def optimizer_type_checks() -> None:
    """``Float16OptimizerWithFloat16Params`` and ``DistributedOptimizer`` sort parameters by
    comparing ``param.type()`` with ``'torch.cuda.{Float,Half,BFloat16}Tensor'`` and raise
    ``TypeError`` for CPU tensors -> during these constructors only, ``Tensor.type()``
    reports CPU tensors under the CUDA type names. This enables bf16 / fp16 training and
    the distributed optimizer on CPU."""
    for cls in (module("optimizer.optimizer").Float16OptimizerWithFloat16Params,
                module("optimizer.distrib_optimizer").DistributedOptimizer):
        _wrap_in(cls, "__init__", cuda_tensor_type_strings)


def distopt_state_gather() -> None:
    """``DistributedOptimizer.get_parameter_state_dp_zero`` (the ``fully_reshardable`` and
    ``dp_zero_gather_scatter`` checkpoint formats) stages each DP shard with ``.cuda()`` for
    an NCCL gather -> run it with ``Tensor.cuda`` as the identity: the CPU shards go through
    the gloo data-parallel group as they are."""
    _wrap_in(module("optimizer.distrib_optimizer").DistributedOptimizer,
             "get_parameter_state_dp_zero", tensor_cuda_is_identity)

def distopt_load() -> None:
    """Loading a ``DistributedOptimizer`` checkpoint into a fresh optimizer (``mohge-pretrain``:
    Megatron-LM's checkpointing): CPU runs always use torch Adam -> the fixes of
    :func:`megatron_mohge.compat.distopt.install_load_fixes` (also installed on GPUs by the
    Megatron-LM hooks; idempotent)."""
    from megatron_mohge.compat import distopt

    distopt.install_load_fixes()
