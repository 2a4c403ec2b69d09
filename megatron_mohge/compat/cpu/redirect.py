"""CPU-mode patches of devices and RNG: the ``torch`` proxy and the RNG tracker's state."""

from __future__ import annotations

import importlib
import logging

import torch

from megatron_mohge.compat.cpu.proxy import torch_proxy

MC = "megatron.core."

#: Megatron modules whose global ``torch`` is replaced by the CPU proxy (``device-redirect``).
#: Each reaches ``torch.cuda.*`` or a ``device="cuda"`` literal on a CPU-capable path.
REDIRECTED_MODULES = tuple(MC + m for m in (
    # Hit by the CPU-mode tests (train / pipeline / dist-ckpt of GPT + MoE).
    "utils",  # global memory buffer (SP all-gather), local multi-tensor l2 norm
    "tensor_parallel.layers",  # weights, SP all-gather buffers
    "tensor_parallel.mappings",  # collective output buffers
    "tensor_parallel.random",  # RNG tracker: get_rng_state / manual_seed
    "distributed.param_and_grad_buffer",  # DDP grad / param buffers
    "models.common.embeddings.rotary_pos_embedding",  # inv_freq device
    "transformer.utils",  # default causal mask
    "transformer.dot_product_attention",  # softmax offset (softmax_type != vanilla)
    "transformer.moe.router",  # router weight / expert-bias buffers
    "transformer.moe.token_dispatcher",  # alltoall DtoH stream
    "transformer.moe.shared_experts",  # moe_shared_expert_overlap stream
    "transformer.moe.moe_layer",  # 0.19: shared-expert overlap wait, delayed-wgrad stream
    "pipeline_parallel.p2p_communication",  # shape exchange, batch_p2p_sync
    "pipeline_parallel.schedules",  # total_num_tokens
    "optimizer.optimizer",  # found_inf / scale tensors
    "optimizer.clip_grads",  # grad-norm buffers
    "dist_checkpointing.exchange_utils",  # fully-parallel load buffers
    "dist_checkpointing.strategies.state_dict_saver",  # save verification
    "dist_checkpointing.strategies.filesystem_async",  # writer synchronize
    "dist_checkpointing.strategies.fully_parallel",  # synchronize
    "dist_checkpointing.strategies.async_utils",  # async (non-persistent) save
    # Reachable with other CPU-capable options or Megatron-LM utilities.
    "parallel_state",  # update_pg_timeout synchronize
    "timers",  # Megatron timers (synchronize, gathered times)
    "tensor_parallel.data",  # broadcast_data (Megatron-LM get_batch)
    "tensor_parallel.utils",  # gather_split_1d_tensor (distributed saved activations)
    "distributed.distributed_data_parallel",  # partial-DistOpt stream, buffer offload
    "transformer.moe.moe_utils",  # track_moe_metrics tracker tensors
    "optimizer.distrib_optimizer",  # optimizer-state checkpoint buffers
    "optimizer.grad_scaler",  # fp16 loss scaler tensors
    "models.gpt.gpt_model",  # static-batch inference offsets
    "transformer.attention",  # static inference KV cache
    "transformer.multi_token_prediction",  # MTP loss tracker (training forward with MTP)
))


def module(name: str):
    return importlib.import_module(name if name.startswith(MC) else MC + name)


def check_redirect_targets() -> None:
    """Preflight: every redirected module imports and holds the real ``torch``."""
    for name in REDIRECTED_MODULES:
        if module(name).__dict__.get("torch") is not torch:
            raise RuntimeError(f"CPU mode: {name}.torch is not the torch module; cannot redirect")


def device_redirect() -> None:
    """The modules in ``REDIRECTED_MODULES`` call ``torch.cuda.current_device()``, streams,
    ``synchronize()``, the CUDA RNG and create tensors with ``device="cuda"``, all of which
    raise on a CPU build -> each sees :class:`~megatron_mohge.compat.cpu.proxy.TorchProxy`
    instead of ``torch``; modules outside the list are untouched."""
    proxy = torch_proxy()
    for name in REDIRECTED_MODULES:
        module(name).torch = proxy


def _cpu_get_cuda_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False):
    if graph_safe:
        raise NotImplementedError("CPU mode: cudagraph-safe RNG states are CUDA-only")
    return torch.get_rng_state()


def _cpu_set_cuda_rng_state(new_state, device=-1, graph_safe: bool = False):
    if graph_safe:
        raise NotImplementedError("CPU mode: cudagraph-safe RNG states are CUDA-only")
    torch.set_rng_state(new_state)


def rng_state() -> None:
    """``_get/_set_cuda_rng_state`` use CUDA generators, and the setter goes through
    ``torch.cuda._lazy_call``, which without CUDA queues the callback forever (the state is
    silently never set, so ``fork()`` would not switch RNG streams) -> read / write the CPU
    generator. The tracker's ``fork(name)`` then swaps CPU generator states, so dropout and
    init stay reproducible per tracker state and recomputation replays the same masks."""
    random = module("tensor_parallel.random")
    random._get_cuda_rng_state = _cpu_get_cuda_rng_state
    random._set_cuda_rng_state = _cpu_set_cuda_rng_state


FORK_WARNING = "CPU RNG state changed within GPU RNG context"


class _DropForkWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != FORK_WARNING


def rng_fork_warning() -> None:
    """``CudaRNGStatesTracker.fork`` warns "CPU RNG state changed within GPU RNG context"
    whenever anything random runs inside a fork, which on CPU is every time -> a logging
    filter drops exactly that message (Megatron's tracker class and ``fork`` are kept)."""
    logging.getLogger(MC + "tensor_parallel.random").addFilter(_DropForkWarning())


def has_share_storage() -> bool:
    return hasattr(module("tensor_parallel.random"), "_get_share_storage")


def _copy_storage(dst: torch.Tensor, src: torch.Tensor) -> None:
    # megatron-core 0.16's way: give the released storage back its bytes, then copy them in.
    dst.untyped_storage().resize_(src.untyped_storage().size())
    dst.untyped_storage().copy_(src.untyped_storage())


def share_storage() -> None:
    """0.19's ``CheckpointWithoutOutput`` (selective recompute of norms / activations)
    re-points the discarded output's storage at the recomputed one with a C++ extension it
    compiles with ``load_inline`` on first use (about 20 s; needs g++ and ninja) -> on CPU
    copy the recomputed bytes into the output's storage instead, as 0.16 did: every view of
    the output sees the data, with no compiler. (Absent before 0.19: not applied.)"""
    module("tensor_parallel.random")._get_share_storage = lambda: _copy_storage


def recompute_without_te() -> None:
    """``CheckpointWithoutOutput.__init__(fp8=False)`` sets ``self.fp8 = fp8 is not None``
    (True for False), so its forward calls Transformer Engine's ``FP8GlobalStateManager``,
    a ``NameError`` without TE: output-discarding recompute (``recompute_modules``
    ``layernorm`` / ``moe_act`` / ``mla_up_proj``) fails -> FP8 off after ``__init__`` (CPU
    has no TE, so FP8 cannot be on)."""
    cls = module("tensor_parallel.random").CheckpointWithoutOutput
    original = cls.__init__

    def __init__(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.fp8 = False

    __init__.__mohge_original__ = original
    cls.__init__ = __init__
