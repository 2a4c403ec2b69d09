"""RunConfig -> Megatron ``TransformerConfig``, decoder / stack spec and the model:
``GPTModel`` (``model.kind: gpt``) or ``HybridModel`` (``model.kind: hybrid``; ``MambaModel``
on megatron-core 0.16.1).

One place decides what ``moe.kind`` means:

* ``mohge``: MoHGE's MoE fields (checked by ``MoHGEConfig.apply_to``) +
  :func:`get_mohge_decoder_block_spec`;
* ``stock`` (formerly ``moe``): Megatron's stock ``MoELayer`` (uniform ``SequentialMLP``/``TEGroupedMLP``
  experts) with its ``TopKRouter`` and aux loss, or the noisy top-k router;
* ``dense``: no experts (every FFN is ``model.ffn_hidden_size`` wide).

The parallel sizes come from the live ``parallel_state`` (call ``init_layout`` first), so the
same function serves every rank and layout.
"""

from __future__ import annotations

import torch

from megatron_mohge.config.megatron import run_moe_transformer_fields
from megatron_mohge.config.run import RunConfig
from megatron_mohge.training import mcore_plumbing as M


def transformer_config(run: RunConfig):
    """The ``TransformerConfig`` of ``run`` for the current parallel layout."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    m, moe = run.model, run.moe
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[m.precision]
    fields = dict(
        num_layers=m.num_layers, hidden_size=m.hidden_size,
        num_attention_heads=m.num_attention_heads, num_query_groups=m.num_query_groups,
        ffn_hidden_size=run.ffn_hidden_size, normalization=m.normalization,
        gated_linear_unit=m.swiglu,
        activation_func=torch.nn.functional.silu if m.swiglu else torch.nn.functional.gelu,
        add_bias_linear=m.add_bias_linear, hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout, init_method_std=m.init_method_std,
        # CPU init is layout-independent (TP/EP shards are slices of one seeded tensor).
        use_cpu_initialization=True, perform_initialization=True,
        bf16=m.precision == "bf16", fp16=m.precision == "fp16", params_dtype=dtype,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=ps.get_pipeline_model_parallel_world_size(),
        expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
        expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
        sequence_parallel=run.sequence_parallel,
        moe_token_dispatcher_type=run.dispatcher(),
        # the MoE fields, stock or MoHGE (TransformerConfig checks EP against num_moe_experts
        # on creation): the same mapping the Megatron-LM flags and argument hook use
        **run_moe_transformer_fields(moe),
    )
    if moe.kind != "dense":
        fields["moe_layer_freq"] = m.moe_layer_freq
    tc = TransformerConfig(**fields)
    if moe.kind == "mohge":  # its refusals and layout checks (the fields are set already)
        tc = moe.mohge.apply_to(tc)
    return tc


def decoder_spec(run: RunConfig, tc):
    """This PP stage's ``TransformerBlockSubmodules`` for ``run.moe.kind``."""
    from megatron_mohge.specs import (
        get_mohge_decoder_block_spec,
        get_noisy_topk_decoder_block_spec,
        get_stock_decoder_block_spec,
        resolve_use_te,
    )

    use_te = resolve_use_te(run.moe.use_te)
    if run.moe.kind == "mohge":
        return get_mohge_decoder_block_spec(tc, run.moe.mohge, use_te=use_te)
    if run.moe.kind == "stock" and run.moe.router == "noisy_topk":
        return get_noisy_topk_decoder_block_spec(tc, use_te, gating=run.moe.noisy_gating)
    # Stock MoE and dense: Megatron's own block spec (dense layers where num_moe_experts is
    # None), its routers counting (CountedTopKRouter: same parameters and routing)
    return get_stock_decoder_block_spec(tc, use_te)


def hybrid_stack_spec(run: RunConfig):
    """The hybrid stack spec for ``run.moe.kind`` (MoHGE, stock or noisy top-k ``E`` layers)."""
    from megatron_mohge.hybrid_specs import (check_pattern_runs_here,
                                             get_mohge_hybrid_stack_spec,
                                             get_stock_hybrid_stack_spec)
    from megatron_mohge.specs import resolve_use_te

    moe = run.moe
    use_te = resolve_use_te(moe.use_te)
    check_pattern_runs_here(run.model.hybrid_layer_pattern, use_te, M.use_cuda())
    if moe.kind == "mohge":
        return get_mohge_hybrid_stack_spec(moe.mohge, use_te)
    if moe.kind == "dense":
        return get_stock_hybrid_stack_spec(None, use_te)
    noisy = dict(gating=moe.noisy_gating) if moe.router == "noisy_topk" else None
    return get_stock_hybrid_stack_spec(moe.num_experts, use_te, noisy_topk=noisy)


def build_language_model(run: RunConfig, vocab_size: int, tc=None):
    """This rank's bare model of ``run``: ``GPTModel`` or ``HybridModel`` (``model.kind``)."""
    tc = tc if tc is not None else transformer_config(run)
    if not run.is_hybrid:
        return build_gpt_model(run, vocab_size, tc)
    return M.build_hybrid(
        tc, hybrid_stack_spec(run), run.model.hybrid_layer_pattern, vocab_size=vocab_size,
        seq_length=run.model.seq_length,
        position_embedding_type=run.model.position_embedding_type,
        rotary_base=run.model.rotary_base,
        share_embeddings_and_output_weights=not run.model.untie_embeddings_and_output_weights,
    )


def build_gpt_model(run: RunConfig, vocab_size: int, tc=None):
    """This rank's bare ``GPTModel`` of ``run`` (``tc``: its ``TransformerConfig``, built
    here when not given)."""
    tc = tc if tc is not None else transformer_config(run)
    return M.build_gpt(
        tc, decoder_spec(run, tc), vocab_size=vocab_size, seq_length=run.model.seq_length,
        position_embedding_type=run.model.position_embedding_type,
        rotary_base=run.model.rotary_base,
        share_embeddings_and_output_weights=not run.model.untie_embeddings_and_output_weights,
    )


def build_model(run: RunConfig, vocab_size: int):
    """(DDP-wrapped ``GPTModel`` / ``HybridModel`` of this rank, its ``TransformerConfig``)."""
    tc = transformer_config(run)
    bare = build_language_model(run, vocab_size, tc)
    model = M.wrap_ddp(bare, tc, use_distributed_optimizer=run.parallel.use_distributed_optimizer)
    return model, tc


def build_optimizer_and_scheduler(run: RunConfig, model):
    """Megatron Adam (``get_megatron_optimizer``) + ``OptimizerParamScheduler``
    (linear warmup, then cosine / linear decay to ``min_lr``; constant weight decay)."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    t = run.train
    opt = M.build_optimizer(model, lr=t.lr, clip_grad=t.clip_grad, min_lr=t.min_lr,
                            weight_decay=t.weight_decay, adam_beta1=t.adam_beta1,
                            adam_beta2=t.adam_beta2, adam_eps=t.adam_eps)
    decay = t.lr_decay_iters or t.iters
    sched = OptimizerParamScheduler(
        opt, init_lr=0.0 if t.lr_warmup_iters else t.lr, max_lr=t.lr, min_lr=t.min_lr,
        lr_warmup_steps=t.lr_warmup_iters, lr_decay_steps=decay,
        lr_decay_style=t.lr_decay_style, start_wd=t.weight_decay, end_wd=t.weight_decay,
        wd_incr_steps=decay, wd_incr_style="constant",
    )
    return opt, sched


def measured_param_counts(model) -> dict:
    """Global parameter counts of the built model (every rank gets the same): ``total_params``
    and ``routed_expert_params`` (routed experts only, not shared experts or routers); the
    configuration-only twin is ``integration.accounting.analytic_param_counts``.

    Each shard is counted once over all ranks: TP-replicated weights on TP rank 0 only, and
    the sums are divided by the replicas a shard has (dense: DP; expert weights: expert-DP).
    """
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    # [dense, dense routed, expert-parallel, expert-parallel routed]; at EP=1 Megatron treats
    # expert weights as ordinary DP-replicated parameters (allreduce=True).
    counts = torch.zeros(4, dtype=torch.float64)
    tied_skip = not ps.is_pipeline_first_stage() and ps.is_pipeline_last_stage()
    for chunk in M.model_chunks(model):
        bare = M.unwrap(chunk)
        for name, p in bare.named_parameters():
            if tied_skip and name.endswith("output_layer.weight") and getattr(
                    bare, "share_embeddings_and_output_weights", False):
                continue  # the tied copy of the word embeddings on the last PP stage
            is_ep = not getattr(p, "allreduce", True)
            tp_rank = (ps.get_expert_tensor_parallel_rank() if is_ep
                       else ps.get_tensor_model_parallel_rank())
            if not getattr(p, "tensor_model_parallel", False) and tp_rank != 0:
                continue  # replicated over (expert-)TP: count it on TP rank 0 only
            routed = ".experts." in name and "shared_experts" not in name
            base = 2 if is_ep else 0
            counts[base] += p.numel()
            if routed:
                counts[base + 1] += p.numel()
    dist.all_reduce(counts)
    counts[:2] /= ps.get_data_parallel_world_size(with_context_parallel=True)
    counts[2:] /= ps.get_expert_data_parallel_world_size()
    return dict(total_params=int(round(float(counts[0] + counts[2]))),
                routed_expert_params=int(round(float(counts[1] + counts[3]))))
