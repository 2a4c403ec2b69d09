"""Minimal training plumbing on megatron.core alone (no Megatron-LM checkout needed).

The pattern of Megatron's ``run_simple_mcore_train_loop.py``, done with Megatron's own
pieces: process groups, ``GPTModel``, ``Float16Module`` + ``DistributedDataParallel`` with
``finalize_model_grads``, ``get_megatron_optimizer`` and the pipeline schedules
(checkpoints: :mod:`megatron_mohge.training.checkpoint`). CPU (gloo + :func:`megatron_mohge.compat.enable_cpu_mode`) or
GPUs (NCCL). Batches are dicts with ``tokens``, ``labels``, ``position_ids`` ``[b, s]``
and ``loss_mask``. Used by the examples and the tests.
"""

from __future__ import annotations

import contextlib
import os
import socket
from datetime import timedelta
from functools import partial
from typing import Dict, List, Optional, Sequence, Union

import torch
import torch.distributed as dist

ModelArg = Union[torch.nn.Module, Sequence[torch.nn.Module]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def use_cuda() -> bool:
    """True on a machine with CUDA: the helpers then use NCCL and put models and batches on
    the GPU (Megatron's own code paths); otherwise CPU mode + gloo."""
    return torch.cuda.is_available()


def device() -> torch.device:
    """Where models and batches live: the current CUDA device, or the CPU."""
    return torch.device("cuda", torch.cuda.current_device()) if use_cuda() else torch.device("cpu")


def init_distributed(timeout_s: Optional[float] = None) -> int:
    """Initialise ``torch.distributed`` and return the world size.

    Without CUDA: :func:`megatron_mohge.compat.enable_cpu_mode` + gloo; with CUDA: NCCL on
    ``LOCAL_RANK``'s GPU (not exercised by the CPU test suite). Under ``torchrun``
    (``RANK`` / ``WORLD_SIZE`` set) it joins the launched job; otherwise it creates a 1-rank
    group on a free local port (single-process tests). An already initialised default
    group is reused. ``timeout_s``: how long a collective may wait before it fails
    (torch's default when None).
    """
    if use_cuda():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    else:
        from megatron_mohge.compat import enable_cpu_mode

        enable_cpu_mode()
        backend = "gloo"
    if not dist.is_initialized():
        kw = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
            dist.init_process_group(backend, **kw)
        else:
            dist.init_process_group(
                backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                **kw)
    return dist.get_world_size()


def rank() -> int:
    """Global rank (0 when torch.distributed is not initialised)."""
    return dist.get_rank() if dist.is_initialized() else 0


def init_layout(tp: int = 1, ep: int = 1, pp: int = 1, etp: Optional[int] = None,
                seed: int = 1234, timeout_s: Optional[float] = None) -> None:
    """``initialize_model_parallel(tp, pp, ep, etp)`` + Megatron's RNG seeding.

    The data-parallel size is ``world / (tp * pp)``; EP is carved out of DP x TP as in
    Megatron (``etp`` defaults to ``tp``). Seeds the CPU RNG and Megatron's RNG tracker
    (``model_parallel_cuda_manual_seed``) identically on every rank, so with
    ``use_cpu_initialization=True`` TP shards are slices of the 1-rank weights.
    ``timeout_s``: collective timeout of the new groups (Megatron's 30 min when None).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if parallel_state.model_parallel_is_initialized():
        destroy_layout()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        **({} if timeout_s is None else {"distributed_timeout_minutes": timeout_s / 60}),
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)


def destroy_layout() -> None:
    """Tear down the model-parallel groups and the MoE aux-loss tracker (between layouts)."""
    from megatron.core import parallel_state
    from megatron_mohge.compat.mcore import clear_metrics

    if parallel_state.model_parallel_is_initialized():
        clear_metrics()
    parallel_state.destroy_model_parallel()


def layout() -> Dict[str, int]:
    """Sizes and ranks of the current layout (for result JSON / assertions)."""
    from megatron.core import parallel_state as ps

    return dict(
        world=dist.get_world_size(),
        tp=ps.get_tensor_model_parallel_world_size(), tp_rank=ps.get_tensor_model_parallel_rank(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        ep=ps.get_expert_model_parallel_world_size(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        etp=ps.get_expert_tensor_parallel_world_size(),
        dp=ps.get_data_parallel_world_size(), dp_rank=ps.get_data_parallel_rank(),
    )


def build_gpt(config, spec=None, *, vocab_size: int, seq_length: int, **gpt_kwargs):
    """Build this rank's ``GPTModel`` stage (pre/post process from the PP stage).

    ``spec``: a layer ``ModuleSpec`` or a ``TransformerBlockSubmodules`` (already sliced for
    this PP stage); default: Megatron's local (no-TE) ``get_gpt_decoder_block_spec``.
    Rotary embeddings by default; ``gpt_kwargs`` go to ``GPTModel``.
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    if spec is None:
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False)
    gpt_kwargs.setdefault("position_embedding_type", "rope")
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=seq_length,
        pre_process=ps.is_pipeline_first_stage(),
        post_process=ps.is_pipeline_last_stage(),
        **gpt_kwargs,
    )
    return model.to(device()) if use_cuda() else model


def build_hybrid(config, stack_spec, pattern: str, *, vocab_size: int, seq_length: int,
                 **model_kwargs):
    """Build this rank's ``HybridModel`` stage (``MambaModel`` on megatron-core 0.16.1: the
    same model under its former name; :func:`~megatron_mohge.compat.versions.hybrid_model_api`).
    ``model_kwargs`` go to the model (rotary embeddings by default, as :func:`build_gpt`)."""
    from megatron.core import parallel_state as ps

    from megatron_mohge.compat.versions import hybrid_model_api

    api = hybrid_model_api()
    model_kwargs.setdefault("position_embedding_type", "rope")
    model = api.model_cls(
        config=config, vocab_size=vocab_size, max_sequence_length=seq_length,
        pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
        **{api.spec_kwarg: stack_spec, api.pattern_kwarg: pattern}, **model_kwargs)
    return model.to(device()) if use_cuda() else model


def wrap_ddp(model, config=None, **ddp_overrides):
    """Wrap for training as Megatron-LM does: ``Float16Module`` when the config is bf16 /
    fp16, then Megatron ``DistributedDataParallel`` (contiguous grad buffers, fp32 grad
    reduction, no overlap unless overridden; ``ddp_overrides`` go to
    ``DistributedDataParallelConfig``, e.g. ``use_distributed_optimizer=True``)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.transformer.module import Float16Module

    config = config if config is not None else model.config
    if config.bf16 or config.fp16:
        model = Float16Module(config, model)
    ddp_config = DistributedDataParallelConfig(
        **{**dict(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                  use_distributed_optimizer=False), **ddp_overrides}
    )
    return DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)


def build_optimizer(model: ModelArg, *, lr: float = 3e-3, clip_grad: float = 1.0, **overrides):
    """Megatron optimizer (``get_megatron_optimizer``): Adam, no weight decay, gradient
    clipping; precision and ``use_distributed_optimizer`` follow the model's config / DDP
    config. ``overrides`` go to ``OptimizerConfig``."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    chunks = model_chunks(model)
    config = unwrap(chunks[0]).config
    ddp_config = getattr(chunks[0], "ddp_config", None)
    opt_config = OptimizerConfig(
        **{**dict(optimizer="adam", lr=lr, weight_decay=0.0, clip_grad=clip_grad,
                  bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype,
                  initial_loss_scale=2.0**12,  # fp16 only; Megatron's 2**32 skips many steps
                  use_distributed_optimizer=bool(
                      ddp_config is not None and ddp_config.use_distributed_optimizer)),
           **overrides}
    )
    return get_megatron_optimizer(opt_config, chunks)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model under DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def model_chunks(model: ModelArg) -> List[torch.nn.Module]:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def _loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron-LM style: (sum of token losses, #tokens, {'lm loss': [sum, #tokens]})."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    total = torch.sum(losses * mask)
    num_tokens = mask.sum()
    return total, num_tokens.to(torch.int), {"lm loss": torch.stack([total.detach(), num_tokens])}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


@contextlib.contextmanager
def _training_hooks(chunks: List[torch.nn.Module]):
    """Install DDP's ``no_sync`` and ``finalize_model_grads`` (wrapped by
    :func:`megatron_mohge.routing.balance.wrap_finalize_model_grads`) on the model config for one
    schedule call (DDP-wrapped chunks only), as Megatron-LM's training setup does, and
    remove them afterwards: a
    config holding bound methods of a DDP model cannot be deep-copied (MoE expert modules
    deep-copy their config), so it could not build another model."""
    from megatron.core.distributed import finalize_model_grads

    from megatron_mohge.routing.balance import wrap_finalize_model_grads

    config = unwrap(chunks[0]).config
    saved = config.no_sync_func, config.finalize_model_grads_func
    if all(hasattr(c, "finish_grad_sync") for c in chunks):  # Megatron DDP chunks
        no_sync = [c.no_sync for c in chunks]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
        # + end-of-step balancing (loss-free bias update, global-batch MaxVio)
        config.finalize_model_grads_func = wrap_finalize_model_grads(finalize_model_grads)
    try:
        yield
    finally:
        config.no_sync_func, config.finalize_model_grads_func = saved


def forward_backward(model: ModelArg, batches: List[dict], forward_only: bool = False) -> float:
    """Run Megatron's ``get_forward_backward_func()`` schedule (no-pipelining or 1F1B, per
    the layout) over ``batches`` (this rank's micro-batches) and return the global-batch
    token-mean LM loss, identical on all ranks (reduced over DP, broadcast from the last PP
    stage). With ``forward_only=False`` grads end up finalized (``finalize_model_grads``)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = model_chunks(model)
    tokens = batches[0]["tokens"]
    with _training_hooks(chunks):
        outputs = get_forward_backward_func()(
            forward_step_func=_forward_step,
            data_iterator=iter(batches) if len(chunks) == 1 else [iter(batches) for _ in chunks],
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(batches),
            seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0],
            forward_only=forward_only,
        )
    stats = torch.zeros(2, dtype=torch.float64, device=device())
    if ps.is_pipeline_last_stage():
        for out in outputs:
            stats += out["lm loss"].double()
        dist.all_reduce(stats, group=ps.get_data_parallel_group(with_context_parallel=True))
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(stats, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return float(stats[0] / stats[1])


def eval_loss(model: ModelArg, batches: List[dict]) -> float:
    """Forward-only loss in eval mode (no dropout, no grads, no update) through the same
    schedule; the chunks' train / eval mode is restored afterwards."""
    chunks = model_chunks(model)
    modes = [c.training for c in chunks]
    for c in chunks:
        c.eval()
    try:
        with torch.no_grad():
            return forward_backward(model, batches, forward_only=True)
    finally:
        for c, mode in zip(chunks, modes):
            c.train(mode)


def load_model_state(model: ModelArg, state: dict) -> None:
    """``load_state_dict(strict=True)`` of a loaded (unsharded) state into each chunk."""
    chunks = model_chunks(model)
    if len(chunks) == 1:
        unwrap(chunks[0]).load_state_dict(state, strict=True)
    else:
        for i, chunk in enumerate(chunks):
            unwrap(chunk).load_state_dict(state[f"model{i}"], strict=True)


def sharded_state_dict(model: ModelArg) -> dict:
    chunks = model_chunks(model)
    if len(chunks) == 1:
        return unwrap(chunks[0]).sharded_state_dict()
    return {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(chunks)}


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (a picklable value), in rank order."""
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out

