"""The ``torch`` stand-in that CPU mode installs as the global ``torch`` of some Megatron modules.

It forwards everything to the real ``torch`` except ``cuda`` (a CPU shim: current device
``"cpu"``, no-op streams / events / synchronize, the CPU generator as the "device" RNG,
``is_available() -> False``), the tensor factories (``device="cuda"`` -> CPU) and
``autocast("cuda")`` (-> ``"cpu"``). ``torch.device`` and all types stay the real ones, so
``isinstance`` checks are unaffected.
"""

from __future__ import annotations

import contextlib
import functools
import sys
import types
from typing import Any, Callable, Optional

import torch


def is_cuda_device(device: Any) -> bool:
    if isinstance(device, str):
        return device == "cuda" or device.startswith("cuda:")
    return isinstance(device, torch.device) and device.type == "cuda"


def _cpu_device_factory(fn: Callable) -> Callable:
    """Wrap a tensor factory so that ``device="cuda"`` (or ``cuda:N``) means CPU."""

    @functools.wraps(fn)
    def factory(*args, **kwargs):
        if is_cuda_device(kwargs.get("device")):
            kwargs["device"] = "cpu"
            kwargs.pop("pin_memory", None)
        return fn(*args, **kwargs)

    return factory


#: Tensor factories of the proxy whose ``device=`` keyword is redirected to CPU.
FACTORIES = (
    "arange", "as_tensor", "empty", "empty_like", "empty_strided", "eye", "full",
    "full_like", "linspace", "ones", "ones_like", "rand", "rand_like", "randint", "randn",
    "randn_like", "randperm", "tensor", "zeros", "zeros_like",
)


class NullEvent:
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


class NullStream:
    """Stand-in for ``torch.cuda.Stream``: one implicit CPU "stream", nothing to order."""

    device = torch.device("cpu")

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, stream):
        pass

    def wait_event(self, event):
        pass

    def record_event(self, event=None):
        return event if event is not None else NullEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


_DEFAULT_STREAM = NullStream()


def _noop(*args, **kwargs):
    return None


def _cpu_manual_seed(seed) -> None:
    torch.default_generator.manual_seed(int(seed))


def _cpu_get_rng_state(device=None) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device=None) -> None:
    torch.set_rng_state(new_state)


class CudaShim(types.ModuleType):
    """``torch.cuda`` as seen by redirected Megatron modules in CPU mode.

    Explicit CPU behaviour for what Megatron calls; any other attribute is looked up on the
    real ``torch.cuda`` (so e.g. ``torch.cuda.FloatTensor`` stays the real type).
    """

    def __init__(self):
        super().__init__("torch.cuda", "torch.cuda as seen by megatron_mohge CPU mode")
        rng = dict(get_rng_state=_cpu_get_rng_state, set_rng_state=_cpu_set_rng_state,
                   manual_seed=_cpu_manual_seed, manual_seed_all=_cpu_manual_seed)
        self.__dict__.update(
            is_available=lambda: False, is_initialized=lambda: False, device_count=lambda: 0,
            current_device=lambda: "cpu", set_device=_noop,
            device=lambda *a, **k: contextlib.nullcontext(),
            synchronize=_noop, empty_cache=_noop, is_current_stream_capturing=lambda: False,
            Stream=NullStream, Event=NullEvent,
            stream=lambda stream=None: contextlib.nullcontext(),
            current_stream=lambda device=None: _DEFAULT_STREAM,
            default_stream=lambda device=None: _DEFAULT_STREAM,
            initial_seed=lambda: torch.initial_seed(),
            default_generators=(torch.default_generator,),
            random=types.SimpleNamespace(**rng),
            nvtx=types.SimpleNamespace(range_push=_noop, range_pop=_noop, mark=_noop,
                                       range=lambda *a, **k: contextlib.nullcontext()),
            memory_allocated=lambda device=None: 0, max_memory_allocated=lambda device=None: 0,
            memory_reserved=lambda device=None: 0, max_memory_reserved=lambda device=None: 0,
            reset_peak_memory_stats=_noop,
            **rng,
        )

    def __getattr__(self, name):
        return getattr(sys.modules["torch.cuda"], name)


def _cpu_autocast(device_type, *args, **kwargs):
    return torch.autocast("cpu" if device_type == "cuda" else device_type, *args, **kwargs)


class TorchProxy(types.ModuleType):
    """``torch`` as seen by a redirected Megatron module in CPU mode.

    Its ``__dict__`` is a snapshot of ``torch``'s (fast attribute access); names added to
    ``torch`` later are forwarded by ``__getattr__``. Overridden: ``cuda`` (the CPU shim),
    the tensor factories in ``FACTORIES`` and ``autocast`` (``"cuda"`` -> ``"cpu"``).
    """

    def __init__(self, cuda_shim: CudaShim):
        super().__init__("torch")
        snapshot = {k: v for k, v in vars(torch).items() if k not in ("__getattr__", "__dir__")}
        self.__dict__.update(snapshot)
        for name in FACTORIES:
            self.__dict__[name] = _cpu_device_factory(getattr(torch, name))
        self.__dict__["autocast"] = _cpu_autocast
        self.__dict__["cuda"] = cuda_shim
        self.__dict__["_mohge_cpu_mode_proxy"] = True

    def __getattr__(self, name):
        return getattr(torch, name)

    def __repr__(self):
        return "<torch proxy of megatron_mohge CPU mode>"


_TORCH_PROXY: Optional[TorchProxy] = None


def torch_proxy() -> TorchProxy:
    """The process-wide proxy (one instance, so re-imports see the same object)."""
    global _TORCH_PROXY
    if _TORCH_PROXY is None:
        _TORCH_PROXY = TorchProxy(CudaShim())
    return _TORCH_PROXY


@contextlib.contextmanager
def swapped_tensor_method(name: str, make: Callable[[Callable], Callable]):
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


def tensor_cuda_is_identity():
    """Context: ``Tensor.cuda()`` returns the tensor itself."""
    return swapped_tensor_method("cuda", lambda original: lambda self, *args, **kwargs: self)


def cuda_tensor_type_strings():
    """Context: ``Tensor.type()`` (no argument) reports CPU tensors under their CUDA type
    names (``torch.FloatTensor`` -> ``torch.cuda.FloatTensor``)."""

    def make(original):
        def type_(self, dtype=None, non_blocking=False, **kwargs):
            if dtype is None and not kwargs and not self.is_cuda:
                return original(self).replace("torch.", "torch.cuda.", 1)
            return original(self, dtype, non_blocking, **kwargs)

        return type_

    return swapped_tensor_method("type", make)
