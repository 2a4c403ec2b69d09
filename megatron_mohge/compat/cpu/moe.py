"""CPU-mode patches of MoE utilities, norms and collectives."""

from __future__ import annotations

import copy
import functools

import torch

from megatron_mohge.compat.cpu.redirect import module


def te_general_gemm_missing() -> bool:
    return not hasattr(module("transformer.moe.moe_utils"), "te_general_gemm")


def te_general_gemm() -> None:
    """``router_gating_linear`` references ``te_general_gemm``, defined only when Transformer
    Engine imports (``NameError`` without TE; fixed upstream in 0.17) -> define it as None."""
    module("transformer.moe.moe_utils").te_general_gemm = None


def split_sizes_numpy() -> None:
    """``maybe_move_tensor_to_cpu`` (and the name imported into ``token_dispatcher``) converts
    only CUDA tensors, so with ``as_numpy=True`` CPU split sizes stay tensors and
    ``all_to_all_single`` rejects them (alltoall dispatcher, EP>1) -> honour ``as_numpy``
    for CPU tensors too."""
    moe_utils = module("transformer.moe.moe_utils")
    original = moe_utils.maybe_move_tensor_to_cpu

    @functools.wraps(original)
    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        tensor = original(tensor, as_numpy=as_numpy, record_stream=record_stream)
        if as_numpy and torch.is_tensor(tensor):
            tensor = tensor.numpy()
        return tensor

    maybe_move_tensor_to_cpu.__mohge_original__ = original
    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    module("transformer.moe.token_dispatcher").maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def torch_norm_sequence_parallel() -> None:
    """``WrappedTorchNorm`` asserts ``not config.sequence_parallel`` (MoE with TP>1 needs SP)
    -> build the norm from a shallow config copy with SP off and mark its parameters
    ``sequence_parallel=True``, so ``finalize_model_grads`` all-reduces their grads over TP,
    the contract of Megatron's fused norms. The class itself is patched (layer specs hold
    the class object, bound at import time)."""
    cls = module("transformer.torch_norm").WrappedTorchNorm
    original_new = cls.__new__

    def __new__(cls_, config, *args, **kwargs):
        if not getattr(config, "sequence_parallel", False):
            return original_new(cls_, config, *args, **kwargs)
        cfg = copy.copy(config)  # shallow: no __post_init__ re-validation, only SP differs
        cfg.sequence_parallel = False
        norm = original_new(cls_, cfg, *args, **kwargs)
        for param in norm.parameters():
            setattr(param, "sequence_parallel", True)
        return norm

    __new__.__mohge_original__ = original_new
    cls.__new__ = staticmethod(__new__)


def uneven_collectives() -> None:
    """``_gather_along_first_dim`` with explicit split sizes uses a list ``all_gather``, which
    gloo rejects for unequal shapes (alltoall dispatcher with expert-TP>1 and EP>1) -> for
    CPU tensors with split sizes: pad to the largest split, ``all_gather_into_tensor``,
    slice; every other call goes to Megatron's original. (The list ``reduce_scatter`` of its
    backward works on gloo with unequal splits in torch 2.13; not patched.)"""
    mappings = module("tensor_parallel.mappings")
    original = mappings._gather_along_first_dim

    @functools.wraps(original)
    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or input_.is_cuda or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(s) for s in output_split_sizes]
        width = max(sizes)
        padded = input_.new_zeros((width,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = input_.new_empty((width * len(sizes),) + tuple(input_.shape[1:]))
        torch.distributed.all_gather_into_tensor(gathered, padded, group=group)
        return torch.cat([gathered[i * width: i * width + n] for i, n in enumerate(sizes)])

    _gather_along_first_dim.__mohge_original__ = original
    mappings._gather_along_first_dim = _gather_along_first_dim
