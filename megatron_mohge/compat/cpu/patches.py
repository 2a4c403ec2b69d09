"""The CPU-mode patch table: every patch once, in the order :func:`enable_cpu_mode` applies it.

A row names the patch, its target in ``megatron.core``, what fails on CPU (one line), the
function that applies it (its docstring explains the fix) and, for patches that exist only
on some megatron-core lines, a predicate read from the installed release's shape. The
package docstring's table is rendered from these rows (:func:`describe`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Tuple

from megatron_mohge.compat.cpu import megatron_training as mt
from megatron_mohge.compat.cpu import moe, redirect, training


@dataclass(frozen=True)
class CpuModePatch:
    """One documented CPU-mode patch."""

    name: str
    target: str
    why: str
    apply: Callable[[], None] = field(repr=False, compare=False)
    applies: Optional[Callable[[], bool]] = field(default=None, repr=False, compare=False)

    def needed(self) -> bool:
        return self.applies is None or self.applies()


_P = CpuModePatch
PATCHES: Tuple[CpuModePatch, ...] = (
    _P("device-redirect", "global `torch` of the modules in cpu.redirect.REDIRECTED_MODULES",
       "torch.cuda.* calls and device='cuda' tensors raise on CPU", redirect.device_redirect),
    _P("rng-state", "tensor_parallel.random._get_cuda_rng_state / _set_cuda_rng_state",
       "CUDA generators; _lazy_call never runs without CUDA", redirect.rng_state),
    _P("rng-fork-warning", "logger megatron.core.tensor_parallel.random",
       "CudaRNGStatesTracker.fork warns on every random op inside a fork",
       redirect.rng_fork_warning),
    _P("recompute-without-te", "tensor_parallel.random.CheckpointWithoutOutput.__init__",
       "fp8=False reads as FP8 on: NameError on TE's FP8GlobalStateManager",
       redirect.recompute_without_te),
    _P("share-storage", "tensor_parallel.random._get_share_storage (0.19+)",
       "selective recompute compiles a C++ extension with load_inline", redirect.share_storage,
       redirect.has_share_storage),
    _P("te-general-gemm", "transformer.moe.moe_utils.te_general_gemm (< 0.17)",
       "undefined without TE: NameError in router_gating_linear", moe.te_general_gemm,
       moe.te_general_gemm_missing),
    _P("split-sizes-numpy", "moe_utils.maybe_move_tensor_to_cpu (+ token_dispatcher's import)",
       "as_numpy ignored for CPU tensors; all_to_all_single rejects tensor split sizes",
       moe.split_sizes_numpy),
    _P("torch-norm-sequence-parallel", "transformer.torch_norm.WrappedTorchNorm.__new__",
       "asserts not sequence_parallel (MoE with TP>1 needs SP)",
       moe.torch_norm_sequence_parallel),
    _P("uneven-collectives", "tensor_parallel.mappings._gather_along_first_dim",
       "gloo rejects list all_gather with unequal shapes", moe.uneven_collectives),
    _P("clip-grads", "optimizer.clip_grads.clip_grad_by_total_norm_fp32 (+ optimizer's import)",
       "asserts torch.cuda.FloatTensor grads", training.clip_grads),
    _P("tied-embedding-cuda", "LanguageModule.setup_embeddings_and_output_layer",
       "weight.data.cuda() on the tied embedding under PP>1", training.tied_embedding_cuda),
    _P("dist-ckpt-exchange", "ShardedTensor.init_data, exchange_by_distribution",
       "fully-parallel load stages shards on CUDA", training.dist_ckpt_exchange),
    _P("optimizer-type-checks", "Float16OptimizerWithFloat16Params / DistributedOptimizer "
       "__init__", "param.type() compared with 'torch.cuda.*Tensor'",
       training.optimizer_type_checks),
    _P("distopt-state-gather", "DistributedOptimizer.get_parameter_state_dp_zero",
       "stages the optimizer-state shards with .cuda() to gather them",
       training.distopt_state_gather),
    _P("distopt-load", "DistributedOptimizer.sharded_state_dict / "
       "load_parameter_state_from_dp_reshardable",
       "loading a checkpoint: assert on torch Adam's missing step; in-place copy into fp32 "
       "parameter views", training.distopt_load),
)

#: ``enable_cpu_mode(megatron_training=True)``: Megatron's own loop (``megatron.training``,
#: ``mohge-pretrain``), applied after :data:`PATCHES`.
TRAINING_PATCHES: Tuple[CpuModePatch, ...] = (
    _P("training-redirect", "global `torch` of cpu.megatron_training.TRAINING_REDIRECTED_MODULES",
       "CUDA tensors, devices, memory stats and RNG state in pretrain() and its helpers",
       mt.training_redirect),
    _P("one-device-initialize", "global `torch` of megatron.training.initialize",
       "no CUDA device: no model-parallel groups, no RNG tracker seeds",
       mt.one_device_initialize),
    _P("allow-no-cuda", "megatron.training.training.initialize_megatron",
       "asserts torch.cuda.is_available()", mt.allow_no_cuda),
    _P("device-arch", "megatron.training.arguments.get_device_arch_version",
       "reads CUDA device properties (validate_args with TP or CP > 1)", mt.device_arch),
    _P("no-jit-warmup", "megatron.training.training.set_jit_fusion_options",
       "warms fused kernels up with torch.compile on CUDA tensors", mt.no_jit_warmup),
    _P("distopt-fully-reshardable-load",
       "DistributedOptimizer.load_parameter_state_from_fully_reshardable",
       "KeyError 'step': torch Adam's per-parameter step is not in the checkpoint",
       mt.distopt_fully_reshardable_load),
)

#: Modules whose functions / classes the patches wrap, imported before anything is patched.
PATCHED_MODULES = (
    "transformer.torch_norm", "models.common.language_module.language_module",
    "dist_checkpointing.mapping", "transformer.moe.moe_utils", "optimizer.distrib_optimizer",
)


def describe(patches: Tuple[CpuModePatch, ...] = PATCHES) -> str:
    """The table as reStructuredText (name -- target: what fails; then how it is fixed)."""
    rows = []
    for p in patches:
        fix = " ".join((p.apply.__doc__ or "").split())
        rows.append(f"``{p.name}`` -- {p.target}: {p.why}.\n    {fix}")
    return "\n".join(rows)
