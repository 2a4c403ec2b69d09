"""Shared helpers for Megatron test workers and single-process tests (CPU mode + gloo).

Used two ways:

* by multi-rank workers launched with ``tests._launch.run_workers(script, nproc, ...)``
  (``torchrun``; the script gets ``--out PATH --tmp DIR`` plus its own arguments), e.g.::

      import common as C                       # workers run with tests/workers on sys.path

      def main():
          args = C.parse_args(extra=lambda p: p.add_argument("--steps", type=int, default=4))
          C.init_distributed()                 # CPU mode + gloo from the torchrun env
          C.init_layout(tp=2, ep=1, pp=1)
          config = C.tiny_gpt_config(sequence_parallel=True)
          model = C.wrap_ddp(C.build_gpt(config), config)
          opt = C.build_optimizer(model)
          losses = C.train(model, opt, config, args.steps)  # train_step x steps
          C.write_result(args, {"losses": losses})
          C.destroy_layout()

      if __name__ == "__main__":               # needed: dist-ckpt save uses spawn
          main()

* in-process from pytest (``from tests.workers import common``): ``init_distributed()``
  without torchrun env vars creates a 1-rank gloo group on a free local port.

Conventions: every rank builds the same global batch of a step from ``(seed, step)`` and
keeps its data-parallel slice, so losses are comparable across layouts with the same
global batch; the loss reported by :func:`train_step` / :func:`eval_loss` is the
token-mean over the whole global batch, identical on every rank.

Weights: with ``use_cpu_initialization=True`` (the default here) TP shards are slices of
the 1-rank weights, so TP layouts reproduce 1-rank losses. Expert weights are *not*
layout-independent: every EP rank initialises its local experts from the same RNG stream.
To compare layouts on identical weights, save a checkpoint in one layout and
:func:`load_checkpoint` it in another (dist-ckpt reshards TP / EP / PP).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import torch

# The generic plumbing lives in the package (examples and the trainer use it too); the
# workers keep calling it through this module.
from megatron_mohge.training import mcore_plumbing as _mcore
from megatron_mohge.training.mcore_plumbing import (  # noqa: F401  (re-exported for the workers)
    ModelArg,
    all_gather_object,
    model_chunks,
    destroy_layout,
    device,
    eval_loss,
    forward_backward,
    init_distributed,
    init_layout,
    layout,
    rank,
    sharded_state_dict,
    unwrap,
    use_cuda,
    wrap_ddp,
    build_optimizer,
)

# Test-only helpers (nothing in the package trains without the Trainer or digests params).


def train_step(model: ModelArg, optimizer, batches: List[dict]) -> float:
    """One training step: zero grad buffers, forward/backward schedule over ``batches``
    (+ ``finalize_model_grads``), optimizer step (Adam, grad clipping). Returns the loss
    (before the update) as in :func:`forward_backward`."""
    for chunk in model_chunks(model):
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    loss = forward_backward(model, batches)
    optimizer.step()  # (update_successful, grad_norm, num_zeros); fp16 may skip on overflow
    return loss


def param_digest(model: ModelArg) -> dict:
    """{name: sum of |param|} of this rank's local parameters (cheap equality check)."""
    out = {}
    for i, chunk in enumerate(model_chunks(model)):
        for name, p in unwrap(chunk).named_parameters():
            out[f"{i}.{name}"] = float(p.detach().double().abs().sum())
    return out


#: Defaults of the tiny model (small enough for 2 CPU cores and 4 ranks).
VOCAB_SIZE = 128
SEQ_LENGTH = 16
MICRO_BATCH_SIZE = 2
GLOBAL_BATCH_SIZE = 8
SEED = 1234



# --------------------------------------------------------------------------------------
# process setup
# --------------------------------------------------------------------------------------


def parse_args(argv: Optional[Sequence[str]] = None,
               extra: Optional[Callable[[argparse.ArgumentParser], None]] = None
               ) -> argparse.Namespace:
    """Parse ``--out`` (result JSON path) and ``--tmp`` (scratch dir shared by all ranks),
    which ``tests/_launch.py`` always passes, plus the options ``extra(parser)`` adds."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True, help="result JSON written by rank 0")
    parser.add_argument("--tmp", required=True, help="scratch directory shared by the ranks")
    if extra is not None:
        extra(parser)
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------
# model
# --------------------------------------------------------------------------------------


def tiny_gpt_config(**overrides):
    """A tiny fp32 GPT + MoE ``TransformerConfig`` (4 layers, hidden 32, 4 heads, 8 experts
    top-2, SwiGLU, no bias, dropout 0, CPU init); keyword ``overrides`` replace fields
    (``bf16=True`` / ``fp16=True`` also switch params / pipeline dtype).

    Parallel sizes are filled in from the current layout (``init_layout`` first), and
    ``sequence_parallel`` defaults to ``tp > 1`` (Megatron requires it for MoE with TP).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    tp = ps.get_tensor_model_parallel_world_size()
    fields = dict(
        num_layers=4,
        hidden_size=32,
        ffn_hidden_size=64,
        num_attention_heads=4,
        num_query_groups=2,
        kv_channels=8,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=0.02,
        use_cpu_initialization=True,
        perform_initialization=True,
        bf16=False,
        fp16=False,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        num_moe_experts=8,
        moe_ffn_hidden_size=32,
        moe_router_topk=2,
        moe_token_dispatcher_type="allgather",
        moe_aux_loss_coeff=1e-2,
        moe_router_load_balancing_type="aux_loss",
        moe_grouped_gemm=False,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
        sequence_parallel=tp > 1,
    )
    for flag, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if overrides.get(flag):
            fields.update(params_dtype=dtype, pipeline_dtype=dtype)
    fields.update(overrides)
    return TransformerConfig(**fields)


def save_checkpoint(model: ModelArg, directory: Union[str, Path], *,
                    fully_parallel: bool = False) -> None:
    """The model's sharded state into ``directory`` (created; collective), written as the
    trainer writes checkpoints (:func:`megatron_mohge.training.checkpoint.dist_save`)."""
    from megatron_mohge.training.checkpoint import dist_save

    Path(directory).mkdir(parents=True, exist_ok=True)
    dist_save(sharded_state_dict(model), Path(directory), fully_parallel=fully_parallel)


def load_checkpoint(model: ModelArg, directory: Union[str, Path], *,
                    fully_parallel: bool = False) -> None:
    """Load a :func:`save_checkpoint` directory into ``model`` in place, from any layout."""
    from megatron_mohge.training.checkpoint import dist_load

    state = dist_load(sharded_state_dict(model), Path(directory), fully_parallel=fully_parallel)
    _mcore.load_model_state(model, state)


def build_gpt(config, spec=None, *, vocab_size: int = VOCAB_SIZE, seq_length: int = SEQ_LENGTH,
              **gpt_kwargs):
    """:func:`megatron_mohge.training.mcore_plumbing.build_gpt` with the tiny-model vocab / length."""
    return _mcore.build_gpt(config, spec, vocab_size=vocab_size, seq_length=seq_length,
                            **gpt_kwargs)


# --------------------------------------------------------------------------------------
# data and steps
# --------------------------------------------------------------------------------------


def synthetic_batches(step: int, *, global_batch_size: int = GLOBAL_BATCH_SIZE,
                      micro_batch_size: int = MICRO_BATCH_SIZE, seq_length: int = SEQ_LENGTH,
                      vocab_size: int = VOCAB_SIZE, seed: int = SEED) -> List[dict]:
    """This data-parallel rank's micro-batches of the global batch of ``step``.

    The global batch (``global_batch_size`` sequences) depends only on ``(seed, step)``:
    learnable arithmetic token sequences ``(a + i*d) mod vocab``. It is split over the DP
    ranks and then into micro-batches of ``micro_batch_size``. Each micro-batch is a dict
    with ``tokens``, ``labels``, ``position_ids`` ``[b, s]`` and ``loss_mask``.
    """
    from megatron.core import parallel_state as ps

    dp = ps.get_data_parallel_world_size()
    dp_rank = ps.get_data_parallel_rank()
    if global_batch_size % (dp * micro_batch_size):
        raise ValueError(f"global batch {global_batch_size} not divisible by dp {dp} x "
                         f"micro batch {micro_batch_size}")
    gen = torch.Generator().manual_seed(seed * 100003 + step)
    start = torch.randint(0, vocab_size, (global_batch_size, 1), generator=gen)
    stride = torch.randint(1, 4, (global_batch_size, 1), generator=gen)
    seqs = (start + stride * torch.arange(seq_length + 1)) % vocab_size
    local = seqs.chunk(dp)[dp_rank]
    position_ids = torch.arange(seq_length).unsqueeze(0).expand(micro_batch_size, -1)
    dev = device()
    return [
        dict(tokens=mb[:, :-1].to(dev), labels=mb[:, 1:].to(dev),
             position_ids=position_ids.to(dev),
             loss_mask=torch.ones(micro_batch_size, seq_length, device=dev))
        for mb in local.split(micro_batch_size)
    ]


def train(model: ModelArg, optimizer, config, steps: int, **batch_kwargs) -> List[float]:
    """``steps`` :func:`train_step` calls on ``synthetic_batches(step, **batch_kwargs)``
    for step = 0, 1, ...; returns the losses. (``config``, the model's TransformerConfig,
    is not needed by the loop; it is kept in the signature that callers already use.)"""
    return [train_step(model, optimizer, synthetic_batches(step, **batch_kwargs))
            for step in range(steps)]


# --------------------------------------------------------------------------------------
# dist checkpointing and comparisons
# --------------------------------------------------------------------------------------


def write_result(args: argparse.Namespace, result: dict) -> None:
    """Write ``result`` as JSON to ``args.out`` from global rank 0 (other ranks: no-op)."""
    if rank() == 0:
        Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True))
