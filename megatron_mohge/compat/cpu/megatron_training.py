"""CPU-mode patches of ``megatron.training`` (Megatron's own loop, ``pretrain()``).

Applied by ``enable_cpu_mode(megatron_training=True)`` only (``mohge-pretrain`` on a machine
without CUDA), after the megatron.core patches; ``megatron.training`` itself is never edited.
Each function's docstring is its row in the CPU-mode table.
"""

from __future__ import annotations

import functools

from megatron_mohge.compat.cpu.proxy import CudaShim, TorchProxy, torch_proxy

MT = "megatron.training."

#: Modules of Megatron's loop whose global ``torch`` is the CPU proxy (``training-redirect``).
TRAINING_REDIRECTED_MODULES = ("megatron.core.rerun_state_machine",  # CUDA RNG state per step
                               ) + tuple(MT + m for m in (
    "training",  # start-time all-reduces, data-loader flags, loss totals, memory report, timers
    "checkpointing",  # iteration all-reduce, CUDA RNG state saved / restored
    "models.dist_utils",  # DDP wrapping on a side CUDA stream
    "utils.common_utils",  # loss / grad-norm reductions, memory report strings
))


def module(name: str):
    import importlib

    return importlib.import_module(name if name.startswith("megatron.") else MT + name)


def training_redirect() -> None:
    """``pretrain()``, ``initialize_megatron``, checkpointing and the log helpers create
    tensors on ``"cuda"`` / ``torch.cuda.current_device()``, read CUDA memory statistics and
    the CUDA RNG state, which raise without CUDA -> these modules see the CPU ``torch`` proxy
    (the ``device-redirect`` of megatron.core, for ``TRAINING_REDIRECTED_MODULES``)."""
    proxy = torch_proxy()
    for name in TRAINING_REDIRECTED_MODULES:
        module(name).torch = proxy


def one_device_initialize() -> None:
    """``initialize_megatron`` creates Megatron's process groups (``initialize_model_parallel``)
    and seeds the model-parallel RNG tracker only when ``torch.cuda.device_count() > 0``, and
    makes its aux-loss scale on ``current_device()`` -> ``megatron.training.initialize`` sees a
    CPU proxy that counts the CPU as one device (``set_device`` is a no-op; the ``cuda:N``
    device it then names is used only by NCCL's in-process restart)."""
    shim = CudaShim()
    shim.__dict__["device_count"] = lambda: 1
    module("initialize").torch = TorchProxy(shim)


def allow_no_cuda() -> None:
    """``pretrain()`` calls ``initialize_megatron()``, which asserts
    ``torch.cuda.is_available()`` unless ``allow_no_cuda=True`` -> the name ``pretrain()``
    calls passes ``allow_no_cuda=True`` (distributed init then uses ``--distributed-backend
    gloo`` and no device)."""
    training = module("training")
    original = training.initialize_megatron

    @functools.wraps(original)
    def initialize_megatron(*args, **kwargs):
        kwargs["allow_no_cuda"] = True
        return original(*args, **kwargs)

    initialize_megatron.__mohge_original__ = original
    training.initialize_megatron = initialize_megatron


def no_jit_warmup() -> None:
    """``pretrain()`` calls ``set_jit_fusion_options``, which compiles and runs the fused
    bias-SwiGLU / GeLU / dropout-add kernels (``torch.compile``) on ``"cuda"`` tensors to warm
    them up -- about a minute on CPU, for kernels CPU mode never uses (``--no-bias-*-fusion``)
    -> the name ``pretrain()`` calls does nothing (a fusion turned on anyway still compiles on
    first use)."""
    training = module("training")
    original = training.set_jit_fusion_options

    @functools.wraps(original)
    def set_jit_fusion_options(*args, **kwargs):
        return None

    set_jit_fusion_options.__mohge_original__ = original
    training.set_jit_fusion_options = set_jit_fusion_options


def device_arch() -> None:
    """``validate_args`` reads the GPU's compute capability (``get_device_arch_version``,
    CUDA device properties) to pick Blackwell-only paths and the TP/CP stream rule -> on CPU it
    is 0: no architecture-specific path (the rule's ``CUDA_DEVICE_MAX_CONNECTIONS=1`` is set
    by ``mohge-pretrain``; CPU ops run in order anyway)."""
    module("arguments").get_device_arch_version = lambda: 0


def distopt_fully_reshardable_load() -> None:
    """Megatron's distributed optimizer without Apex / TE wraps ``torch.optim.Adam``, which
    keeps a ``step`` tensor per parameter; ``load_parameter_state_from_fully_reshardable``
    (a ``--dist-ckpt-optim-fully-reshardable`` checkpoint, what ``mohge-pretrain`` saves)
    copies every tensor state of a parameter from the checkpoint, which never holds ``step``
    (it travels in the param groups): KeyError -> the steps are hidden meanwhile (as
    ``mohge-train``'s loader does, ``training.checkpoint._adam_steps_hidden``); the
    ``distopt-load`` patch then gives each state the saved step."""
    from megatron_mohge.training.checkpoint import _adam_steps_hidden

    cls = module("megatron.core.optimizer.distrib_optimizer").DistributedOptimizer
    original = cls.load_parameter_state_from_fully_reshardable

    @functools.wraps(original)
    def load_parameter_state_from_fully_reshardable(self, *args, **kwargs):
        with _adam_steps_hidden(self.optimizer):
            return original(self, *args, **kwargs)

    load_parameter_state_from_fully_reshardable.__mohge_original__ = original
    cls.load_parameter_state_from_fully_reshardable = load_parameter_state_from_fully_reshardable
