"""CPU mode: run stock Megatron-Core (GPT + MoE) on CPU with the gloo backend.

"Develop and test MoE layers on a laptop": after :func:`enable_cpu_mode`, megatron-core
0.16.x builds, trains (forward, backward, Megatron DDP + ``finalize_model_grads``, the
Megatron optimizer incl. grad clipping) and dist-checkpoints a GPTModel with MoE on CPU,
in one process or under ``torchrun`` with gloo, with TP (+ sequence parallel), EP, PP and
their combinations::

    from megatron_mohge.compat import enable_cpu_mode

    enable_cpu_mode()                       # before building models; True when applied
    torch.distributed.init_process_group("gloo")
    parallel_state.initialize_model_parallel(...)   # then stock Megatron code

It is **opt-in**: importing this module changes nothing. :func:`enable_cpu_mode` applies
the patches below once (a second call is a no-op), in place on megatron's modules and
classes, so it works whether megatron was imported before or after. It refuses untested
megatron-core versions (:func:`megatron_mohge.compat.versions.require_tested_mcore`), and
on a machine where CUDA is available it only warns and patches nothing. The patches are
process-wide and permanent (restart the process to get stock behaviour).

Patches (name -- target: what Megatron does and why it fails on CPU -> what we do):

``device-redirect`` -- the global name ``torch`` of the modules in :data:`REDIRECTED_MODULES`:
    they call ``torch.cuda.current_device()``, ``torch.cuda.Stream()`` / ``stream()`` /
    ``current_stream()``, ``torch.cuda.synchronize()``, ``torch.cuda.get_rng_state()`` /
    ``manual_seed()`` and create tensors with ``device="cuda"``, all of which raise on a CPU
    build -> each of these modules sees a proxy of ``torch`` that forwards everything to
    the real ``torch`` except ``cuda`` (a CPU shim: current device ``"cpu"``, no-op
    streams / events / synchronize, the CPU generator as the "device" RNG,
    ``is_available() -> False``), the tensor factories (``device="cuda"`` -> CPU) and
    ``autocast("cuda")`` (-> ``"cpu"``). ``torch.device`` and all types stay the real
    ones, so ``isinstance`` checks are unaffected; modules outside the list are untouched.
``rng-state`` -- ``tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``:
    they use CUDA generators, and the setter goes through ``torch.cuda._lazy_call``, which
    without CUDA queues the callback forever (the state is silently never set, so
    ``fork()`` would not switch RNG streams) -> read / write the CPU generator. On CPU the
    "device" RNG *is* the CPU RNG: the tracker's ``fork(name)`` swaps CPU generator
    states, so dropout and init stay reproducible per tracker state name and activation
    recomputation replays the same masks.
``rng-fork-warning`` -- logger ``megatron.core.tensor_parallel.random``:
    ``CudaRNGStatesTracker.fork`` warns "CPU RNG state changed within GPU RNG context"
    whenever anything random runs inside a fork, which on CPU is every time -> a logging
    filter drops exactly that message (Megatron's tracker class and ``fork`` are kept).
``te-general-gemm`` -- ``transformer.moe.moe_utils.te_general_gemm``:
    ``router_gating_linear`` references it but it is only defined when Transformer
    Engine imports (``NameError`` without TE; fixed upstream in 0.17) -> define it as None.
``split-sizes-numpy`` -- ``transformer.moe.moe_utils.maybe_move_tensor_to_cpu`` (and the
    name imported into ``token_dispatcher``): it converts only CUDA tensors, so with
    ``as_numpy=True`` CPU split sizes stay tensors and ``all_to_all_single`` rejects them
    (alltoall dispatcher, EP>1) -> honour ``as_numpy`` for CPU tensors too.
``torch-norm-sequence-parallel`` -- ``transformer.torch_norm.WrappedTorchNorm.__new__``:
    asserts ``not config.sequence_parallel`` (MoE with TP>1 requires SP) -> build the norm
    from a shallow config copy with SP off and mark its parameters
    ``sequence_parallel=True``, so ``finalize_model_grads`` all-reduces their grads over
    TP, the contract of Megatron's fused norms. The class itself is patched (layer specs
    hold the class object, bound at import time).
``clip-grads`` -- ``optimizer.clip_grads.clip_grad_by_total_norm_fp32`` (and the name
    imported into ``optimizer.optimizer``): asserts
    ``grad.type() == 'torch.cuda.FloatTensor'`` -> the same in-place scaling with an fp32
    dtype check. (``get_grad_norm_fp32`` / ``count_zeros_fp32`` work via device-redirect.)
``uneven-collectives`` -- ``tensor_parallel.mappings._gather_along_first_dim``:
    with explicit split sizes it uses a list ``all_gather``, which gloo rejects for
    unequal shapes; hit by the alltoall dispatcher with expert-TP>1 and EP>1 -> for CPU
    tensors with split sizes: pad to the largest split, ``all_gather_into_tensor``, slice;
    every other call goes to Megatron's original. (The matching list ``reduce_scatter``
    in its backward works on gloo with unequal splits in torch 2.13; not patched.)
``tied-embedding-cuda`` -- ``LanguageModule.setup_embeddings_and_output_layer``:
    calls ``weight.data.cuda()`` on the tied embedding / output weight under PP>1 ->
    run it with ``Tensor.cuda`` as the identity for the duration of that call.
``dist-ckpt-exchange`` -- ``dist_checkpointing.mapping.ShardedTensor.init_data`` and
    ``exchange_utils.exchange_by_distribution`` (+ the name in ``fully_parallel``): the
    fully-parallel load exchanges shards through CUDA buffers (``init_data("cuda")``,
    ``.cuda()``) -> ``init_data`` maps a CUDA device to CPU, and the exchange runs with
    ``Tensor.cuda`` as the identity.
``optimizer-type-checks`` -- ``Float16OptimizerWithFloat16Params.__init__`` and
    ``DistributedOptimizer.__init__``: sort parameters by comparing ``param.type()`` with
    ``'torch.cuda.{Float,Half,BFloat16}Tensor'`` and raise ``TypeError`` for CPU tensors ->
    during these constructors only, ``Tensor.type()`` reports CPU tensors under the CUDA
    type names. This enables bf16 / fp16 (``Float16Module``, fp16 with loss scaling)
    training and the distributed optimizer on CPU.

Known limits on CPU (not patched; CUDA-only features): Transformer Engine / apex kernels,
``moe_grouped_gemm`` (needs TE or the CUDA ``grouped_gemm`` package), CUDA graphs, fused
kernels (``moe_permute_fusion``, fused rope / cross-entropy), the flex / DeepEP
dispatcher, Megatron FSDP, the persistent async checkpoint worker, NCCL-specific options
(SHARP, user buffers).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import logging
import sys
import threading
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple

import torch

from megatron_mohge.compat.versions import require_tested_mcore

__all__ = [
    "enable_cpu_mode",
    "is_cpu_mode_enabled",
    "cpu_mode_patches",
    "CpuModePatch",
    "REDIRECTED_MODULES",
]

log = logging.getLogger(__name__)

_MC = "megatron.core."

#: Megatron modules whose global ``torch`` is replaced by the CPU proxy (``device-redirect``).
#: Each reaches ``torch.cuda.*`` or a ``device="cuda"`` literal on a CPU-capable path.
REDIRECTED_MODULES: Tuple[str, ...] = tuple(
    _MC + m
    for m in (
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
    )
)


@dataclass(frozen=True)
class CpuModePatch:
    """One documented CPU-mode patch (see the module docstring for the full table)."""

    name: str
    target: str
    why: str


_LOCK = threading.Lock()
_ENABLED = False
_APPLIED: List[CpuModePatch] = []


def is_cpu_mode_enabled() -> bool:
    """True once :func:`enable_cpu_mode` has applied its patches in this process."""
    return _ENABLED


def cpu_mode_patches() -> Tuple[CpuModePatch, ...]:
    """The patches applied by :func:`enable_cpu_mode` (empty before, or on a CUDA machine)."""
    return tuple(_APPLIED)


def enable_cpu_mode() -> bool:
    """Patch megatron-core in place so that it runs on CPU with gloo.

    Returns True when the patches were applied by this call, False when CPU mode was
    already enabled (no-op) or CUDA is available (a warning is emitted, nothing is
    patched: use the real GPU code paths there). Raises
    :class:`~megatron_mohge.compat.versions.UnsupportedMegatronVersion` for a
    megatron-core release CPU mode was not validated on.
    """
    global _ENABLED
    with _LOCK:
        if _ENABLED:
            return False
        if torch.cuda.is_available():
            warnings.warn(
                "megatron_mohge CPU mode was requested but CUDA is available; nothing was "
                "patched (Megatron's GPU code paths are used).",
                RuntimeWarning,
                stacklevel=2,
            )
            return False
        require_tested_mcore("CPU mode")
        if _APPLIED:  # an earlier call failed half-way: never wrap anything twice
            raise RuntimeError("megatron_mohge CPU mode failed earlier in this process and is "
                               "partially applied; restart the process")
        _preflight()  # fail before patching anything
        for apply in _PATCH_FUNCS:
            _APPLIED.append(apply())
        _ENABLED = True
        log.info("megatron_mohge CPU mode enabled: %s", ", ".join(p.name for p in _APPLIED))
        return True


# --------------------------------------------------------------------------------------
# device-redirect: a per-module stand-in for ``torch``
# --------------------------------------------------------------------------------------


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    return isinstance(device, torch.device) and device.type == "cuda"


def _cpu_device_factory(fn: Callable) -> Callable:
    """Wrap a tensor factory so that ``device="cuda"`` (or ``cuda:N``) means CPU."""

    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if _is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
            kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return factory


#: Tensor factories of the proxy whose ``device=`` keyword is redirected to CPU.
_FACTORIES = (
    "arange", "as_tensor", "empty", "empty_like", "empty_strided", "eye", "full",
    "full_like", "linspace", "ones", "ones_like", "rand", "rand_like", "randint", "randn",
    "randn_like", "randperm", "tensor", "zeros", "zeros_like",
)


class _NullEvent:
    """Stand-in for ``torch.cuda.Event``: CPU ops are synchronous, so it is always done."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, stream=None):
        pass

    def wait(self, stream=None):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, end_event):
        return 0.0


class _NullStream:
    """Stand-in for ``torch.cuda.Stream``: one implicit CPU "stream", nothing to order."""

    device = torch.device("cpu")

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else _NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


_DEFAULT_STREAM = _NullStream()


def _noop(*args, **kwargs):
    return None


def _cpu_manual_seed(seed) -> None:
    torch.default_generator.manual_seed(int(seed))


def _cpu_get_rng_state(device=None) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=None) -> None:
    torch.set_rng_state(new_state)


class _CudaShim(types.ModuleType):
    """``torch.cuda`` as seen by redirected Megatron modules in CPU mode.

    Explicit CPU behaviour for what Megatron calls; any other attribute is looked up on the
    real ``torch.cuda`` (so e.g. ``torch.cuda.FloatTensor`` stays the real type).
    """

    def __init__(self):
        super().__init__("torch.cuda", "torch.cuda as seen by megatron_mohge CPU mode")
        ns = dict(
            is_available=lambda: False,
            is_initialized=lambda: False,
            device_count=lambda: 0,
            current_device=lambda: "cpu",
            set_device=_noop,
            device=lambda *a, **k: contextlib.nullcontext(),
            synchronize=_noop,
            empty_cache=_noop,
            is_current_stream_capturing=lambda: False,
            Stream=_NullStream,
            Event=_NullEvent,
            stream=lambda stream=None: contextlib.nullcontext(),
            current_stream=lambda device=None: _DEFAULT_STREAM,
            default_stream=lambda device=None: _DEFAULT_STREAM,
            get_rng_state=_cpu_get_rng_state,
            set_rng_state=_cpu_set_rng_state,
            manual_seed=_cpu_manual_seed,
            manual_seed_all=_cpu_manual_seed,
            initial_seed=lambda: torch.initial_seed(),
            default_generators=(torch.default_generator,),
            random=types.SimpleNamespace(
                get_rng_state=_cpu_get_rng_state,
                set_rng_state=_cpu_set_rng_state,
                manual_seed=_cpu_manual_seed,
                manual_seed_all=_cpu_manual_seed,
            ),
            nvtx=types.SimpleNamespace(
                range_push=_noop, range_pop=_noop, mark=_noop,
                range=lambda *a, **k: contextlib.nullcontext(),
            ),
            memory_allocated=lambda device=None: 0,
            max_memory_allocated=lambda device=None: 0,
            memory_reserved=lambda device=None: 0,
            max_memory_reserved=lambda device=None: 0,
            reset_peak_memory_stats=_noop,
        )
        self.__dict__.update(ns)

    def __getattr__(self, name):
        return getattr(sys.modules["torch.cuda"], name)


def _cpu_autocast(device_type, *args, **kwargs):
    return torch.autocast("cpu" if device_type == "cuda" else device_type, *args, **kwargs)


class _TorchProxy(types.ModuleType):
    """``torch`` as seen by a redirected Megatron module in CPU mode.

    Its ``__dict__`` is a snapshot of ``torch``'s (fast attribute access); names added to
    ``torch`` later are forwarded by ``__getattr__``. Overridden: ``cuda`` (the CPU shim),
    the tensor factories in ``_FACTORIES`` and ``autocast`` (``"cuda"`` -> ``"cpu"``).
    """

    def __init__(self, cuda_shim: _CudaShim):
        super().__init__("torch")
        snapshot = {k: v for k, v in vars(torch).items() if k not in ("__getattr__", "__dir__")}
        self.__dict__.update(snapshot)
        for name in _FACTORIES:
            self.__dict__[name] = _cpu_device_factory(getattr(torch, name))
        self.__dict__["autocast"] = _cpu_autocast
        self.__dict__["cuda"] = cuda_shim
        self.__dict__["_mohge_cpu_mode_proxy"] = True

    def __getattr__(self, name):
        return getattr(torch, name)

    def __repr__(self):
        return "<torch proxy of megatron_mohge CPU mode>"


_TORCH_PROXY: Optional[_TorchProxy] = None


def _torch_proxy() -> _TorchProxy:
    global _TORCH_PROXY
    if _TORCH_PROXY is None:
        _TORCH_PROXY = _TorchProxy(_CudaShim())
    return _TORCH_PROXY


def _module(name: str) -> types.ModuleType:
    return importlib.import_module(name)


def _preflight() -> None:
    """Import every module CPU mode touches and check the redirect targets."""
    for name in REDIRECTED_MODULES + _PATCHED_MODULES:
        mod = _module(name)
        if name in REDIRECTED_MODULES and mod.__dict__.get("torch") is not torch:
            raise RuntimeError(f"CPU mode: {name}.torch is not the torch module; cannot redirect")


def _patch_device_redirect() -> CpuModePatch:
    proxy = _torch_proxy()
    for name in REDIRECTED_MODULES:
        _module(name).torch = proxy
    return CpuModePatch(
        "device-redirect",
        f"global `torch` of {len(REDIRECTED_MODULES)} megatron.core modules",
        "torch.cuda.* calls and device='cuda' tensors -> CPU shim / CPU device",
    )


# --------------------------------------------------------------------------------------
# RNG
# --------------------------------------------------------------------------------------


def _cpu_get_cuda_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False):
    """CPU mode ``_get_cuda_rng_state``: the CPU generator is the device generator."""
    if graph_safe:
        raise NotImplementedError("CPU mode: cudagraph-safe RNG states are CUDA-only")
    return torch.get_rng_state()


def _cpu_set_cuda_rng_state(new_state, device=-1, graph_safe: bool = False):
    """CPU mode ``_set_cuda_rng_state``: set the CPU generator now (no ``_lazy_call``)."""
    if graph_safe:
        raise NotImplementedError("CPU mode: cudagraph-safe RNG states are CUDA-only")
    torch.set_rng_state(new_state)


def _patch_rng_state() -> CpuModePatch:
    random = _module(_MC + "tensor_parallel.random")
    random._get_cuda_rng_state = _cpu_get_cuda_rng_state
    random._set_cuda_rng_state = _cpu_set_cuda_rng_state
    return CpuModePatch(
        "rng-state",
        "tensor_parallel.random._get_cuda_rng_state/_set_cuda_rng_state",
        "CUDA generators; _lazy_call never runs without CUDA -> CPU generator",
    )


_FORK_WARNING = "CPU RNG state changed within GPU RNG context"


class _DropForkWarning(logging.Filter):
    """Drops the tracker's "CPU RNG state changed" warning, meaningless on CPU."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != _FORK_WARNING


def _patch_rng_fork_warning() -> CpuModePatch:
    logging.getLogger(_MC + "tensor_parallel.random").addFilter(_DropForkWarning())
    return CpuModePatch(
        "rng-fork-warning",
        "logger megatron.core.tensor_parallel.random",
        "CudaRNGStatesTracker.fork warns on every random op inside a fork on CPU",
    )


# --------------------------------------------------------------------------------------
# MoE utilities
# --------------------------------------------------------------------------------------


def _patch_te_general_gemm() -> CpuModePatch:
    moe_utils = _module(_MC + "transformer.moe.moe_utils")
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    return CpuModePatch(
        "te-general-gemm",
        "transformer.moe.moe_utils.te_general_gemm",
        "undefined without Transformer Engine (NameError in router_gating_linear)",
    )


def _patch_split_sizes_numpy() -> CpuModePatch:
    moe_utils = _module(_MC + "transformer.moe.moe_utils")
    dispatcher = _module(_MC + "transformer.moe.token_dispatcher")
    original = moe_utils.maybe_move_tensor_to_cpu

    @functools.wraps(original)
    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        tensor = original(tensor, as_numpy=as_numpy, record_stream=record_stream)
        if as_numpy and torch.is_tensor(tensor):
            tensor = tensor.numpy()
        return tensor

    maybe_move_tensor_to_cpu.__mohge_original__ = original
    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    return CpuModePatch(
        "split-sizes-numpy",
        "moe_utils.maybe_move_tensor_to_cpu (+ token_dispatcher's import)",
        "as_numpy ignored for CPU tensors; all_to_all_single rejects tensor split sizes",
    )


# --------------------------------------------------------------------------------------
# Norm with sequence parallel
# --------------------------------------------------------------------------------------


def _patch_torch_norm_sequence_parallel() -> CpuModePatch:
    torch_norm = _module(_MC + "transformer.torch_norm")
    cls = torch_norm.WrappedTorchNorm
    original_new = cls.__new__

    def __new__(cls_, config, *args, **kwargs):
        if not getattr(config, "sequence_parallel", False):
            return original_new(cls_, config, *args, **kwargs)
        # Shallow copy: no __post_init__ re-validation, only the flag differs.
        cfg = copy.copy(config)
        cfg.sequence_parallel = False
        norm = original_new(cls_, cfg, *args, **kwargs)
        for param in norm.parameters():
            # Same contract as Megatron's fused norms: grads are partial over TP ranks and
            # are all-reduced by finalize_model_grads (_allreduce_non_tensor_model_parallel_grads).
            setattr(param, "sequence_parallel", True)
        return norm

    __new__.__mohge_original__ = original_new
    cls.__new__ = staticmethod(__new__)
    return CpuModePatch(
        "torch-norm-sequence-parallel",
        "transformer.torch_norm.WrappedTorchNorm.__new__",
        "asserts not sequence_parallel (MoE with TP>1 needs SP) -> SP-marked params",
    )


# --------------------------------------------------------------------------------------
# Gradient clipping
# --------------------------------------------------------------------------------------


def _patch_clip_grads() -> CpuModePatch:
    clip_grads = _module(_MC + "optimizer.clip_grads")
    optimizer = _module(_MC + "optimizer.optimizer")
    original = clip_grads.clip_grad_by_total_norm_fp32

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
                grads.append(clip_grads.to_local_if_dtensor(param.grad).detach())
        clip_coeff = max_norm / (total_norm + 1.0e-6)
        if clip_coeff < 1.0 and grads:
            torch._foreach_mul_(grads, clip_coeff)

    clip_grad_by_total_norm_fp32.__mohge_original__ = original
    clip_grads.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    optimizer.clip_grad_by_total_norm_fp32 = clip_grad_by_total_norm_fp32
    return CpuModePatch(
        "clip-grads",
        "optimizer.clip_grads.clip_grad_by_total_norm_fp32 (+ optimizer.optimizer's import)",
        "asserts torch.cuda.FloatTensor grads",
    )


# --------------------------------------------------------------------------------------
# Uneven collectives on gloo
# --------------------------------------------------------------------------------------


def _patch_uneven_collectives() -> CpuModePatch:
    mappings = _module(_MC + "tensor_parallel.mappings")
    original = mappings._gather_along_first_dim

    @functools.wraps(original)
    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or input_.is_cuda or group.size() == 1:
            return original(input_, group, output_split_sizes, use_global_buffer)
        # gloo's list all_gather needs equal shapes: pad every shard to the largest one.
        sizes = [int(s) for s in output_split_sizes]
        width = max(sizes)
        padded = input_.new_zeros((width,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = input_.new_empty((width * len(sizes),) + tuple(input_.shape[1:]))
        torch.distributed.all_gather_into_tensor(gathered, padded, group=group)
        return torch.cat([gathered[i * width: i * width + n] for i, n in enumerate(sizes)])

    _gather_along_first_dim.__mohge_original__ = original
    mappings._gather_along_first_dim = _gather_along_first_dim
    return CpuModePatch(
        "uneven-collectives",
        "tensor_parallel.mappings._gather_along_first_dim",
        "gloo rejects list all_gather with unequal shapes",
    )


# --------------------------------------------------------------------------------------
# Tied embeddings under PP
# --------------------------------------------------------------------------------------


@contextlib.contextmanager
def _swapped_tensor_method(name: str, make: Callable[[Callable], Callable]):
    """Temporarily replace ``torch.Tensor.<name>`` by ``make(original)``; restored exactly
    (the method normally lives on ``torch._C.TensorBase``, not in ``Tensor.__dict__``)."""
    had_own = name in vars(torch.Tensor)
    original = getattr(torch.Tensor, name)
    setattr(torch.Tensor, name, make(original))
    try:
        yield
    finally:
        if had_own:
            setattr(torch.Tensor, name, original)
        else:
            delattr(torch.Tensor, name)


def _tensor_cuda_is_identity():
    """Context: ``Tensor.cuda()`` returns the tensor itself."""
    return _swapped_tensor_method("cuda", lambda original: lambda self, *args, **kwargs: self)


def _patch_tied_embedding_cuda() -> CpuModePatch:
    language_module = _module(_MC + "models.common.language_module.language_module")
    cls = language_module.LanguageModule
    original = cls.setup_embeddings_and_output_layer

    @functools.wraps(original)
    def setup_embeddings_and_output_layer(self, *args, **kwargs):
        with _tensor_cuda_is_identity():
            return original(self, *args, **kwargs)

    setup_embeddings_and_output_layer.__mohge_original__ = original
    cls.setup_embeddings_and_output_layer = setup_embeddings_and_output_layer
    return CpuModePatch(
        "tied-embedding-cuda",
        "LanguageModule.setup_embeddings_and_output_layer",
        "weight.data.cuda() on the tied embedding under PP>1",
    )


# --------------------------------------------------------------------------------------
# Fully-parallel dist-checkpoint load
# --------------------------------------------------------------------------------------


def _patch_dist_ckpt_exchange() -> CpuModePatch:
    mapping = _module(_MC + "dist_checkpointing.mapping")
    exchange_utils = _module(_MC + "dist_checkpointing.exchange_utils")
    fully_parallel = _module(_MC + "dist_checkpointing.strategies.fully_parallel")

    original_init_data = mapping.ShardedTensor.init_data

    @functools.wraps(original_init_data)
    def init_data(self, device, init_fn=torch.empty):
        return original_init_data(self, "cpu" if _is_cuda_device(device) else device, init_fn)

    init_data.__mohge_original__ = original_init_data
    mapping.ShardedTensor.init_data = init_data

    original_exchange = exchange_utils.exchange_by_distribution

    @functools.wraps(original_exchange)
    def exchange_by_distribution(*args, **kwargs):
        with _tensor_cuda_is_identity():
            return original_exchange(*args, **kwargs)

    exchange_by_distribution.__mohge_original__ = original_exchange
    exchange_utils.exchange_by_distribution = exchange_by_distribution
    fully_parallel.exchange_by_distribution = exchange_by_distribution
    return CpuModePatch(
        "dist-ckpt-exchange",
        "ShardedTensor.init_data, exchange_utils.exchange_by_distribution "
        "(+ fully_parallel's import)",
        "fully-parallel load stages exchanged shards on CUDA (init_data('cuda'), .cuda())",
    )


# --------------------------------------------------------------------------------------
# Mixed-precision / distributed optimizers
# --------------------------------------------------------------------------------------


def _cuda_tensor_type_strings():
    """Context: ``Tensor.type()`` (no argument) reports CPU tensors under their CUDA type
    names (``torch.FloatTensor`` -> ``torch.cuda.FloatTensor``)."""

    def make(original):
        def type_(self, dtype=None, non_blocking=False, **kwargs):
            if dtype is None and not kwargs and not self.is_cuda:
                return original(self).replace("torch.", "torch.cuda.", 1)
            return original(self, dtype, non_blocking, **kwargs)

        return type_

    return _swapped_tensor_method("type", make)


def _patch_optimizer_type_checks() -> CpuModePatch:
    optimizer = _module(_MC + "optimizer.optimizer")
    distrib_optimizer = _module(_MC + "optimizer.distrib_optimizer")
    classes = (optimizer.Float16OptimizerWithFloat16Params, distrib_optimizer.DistributedOptimizer)
    for cls in classes:
        original = cls.__init__

        @functools.wraps(original)
        def __init__(self, *args, _original=original, **kwargs):
            with _cuda_tensor_type_strings():
                _original(self, *args, **kwargs)

        __init__.__mohge_original__ = original
        cls.__init__ = __init__
    return CpuModePatch(
        "optimizer-type-checks",
        "Float16OptimizerWithFloat16Params.__init__, DistributedOptimizer.__init__",
        "param.type() compared with 'torch.cuda.*Tensor' strings",
    )


#: Other modules whose functions / classes the patches below wrap.
_PATCHED_MODULES: Tuple[str, ...] = tuple(
    _MC + m
    for m in (
        "transformer.torch_norm",
        "models.common.language_module.language_module",
        "dist_checkpointing.mapping",
    )
)

_PATCH_FUNCS: Tuple[Callable[[], CpuModePatch], ...] = (
    _patch_device_redirect,
    _patch_rng_state,
    _patch_rng_fork_warning,
    _patch_te_general_gemm,
    _patch_split_sizes_numpy,
    _patch_torch_norm_sequence_parallel,
    _patch_clip_grads,
    _patch_uneven_collectives,
    _patch_tied_embedding_cuda,
    _patch_dist_ckpt_exchange,
    _patch_optimizer_type_checks,
)
