"""The dataset provider, forward step and embedding ranks ``pretrain()`` is given.

Megatron-LM's ``pretrain_gpt.py`` defines these next to its main block; the megatron-core
wheel ships ``megatron.training`` but not that script, so here they are for GPT pretraining
on indexed data (no SFT, FIM, packed sequences, ModelOpt or distillation -- ``mohge-pretrain``
never enables those):

* :func:`dataset_provider` -- our ``build_gpt_datasets`` (megatron.core ``GPTDataset``) on the
  run's prepared data, or the default corpus prepared on first use;
* :func:`forward_step` -- ``pretrain_gpt.forward_step`` (TP broadcast and CP slicing by
  megatron.core's helpers, the same ``lm loss`` report and NaN / Inf checks), after telling
  the routers the training progress (``hooks.update_training_progress``);
* :func:`get_embedding_ranks` -- ``pretrain_gpt.get_embedding_ranks``.
"""

from __future__ import annotations

from functools import partial
from typing import List

import torch

#: The batch fields a GPTDataset sample holds (no packed-sequence metadata).
BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids", "attention_mask")

#: Megatron-LM flags this provider implies. Our GPTDatasets carry no attention mask (attention
#: builds the causal mask, ``data.datasets``), while ``get_batch_on_this_tp_rank`` broadcasts
#: one from TP rank 0 whenever Megatron's ``create_attention_mask_in_dataloader`` (default
#: on) says the data loader made it: TP rank 0 skips the missing mask and the other TP ranks
#: wait for it forever (TP > 1 hung before its first iteration).
DATASET_FLAGS = ("--no-create-attention-mask-in-dataloader",)


def dataset_provider(run):
    """``train_valid_test_dataset_provider`` of ``run`` (``is_distributed``: every rank builds
    its datasets, as megatron.core's builder expects; no test split)."""

    def provider(train_val_test_num_samples, vp_stage=None):
        from megatron.training import print_rank_0

        from megatron_mohge.data import build_gpt_datasets, ensure_default_dataset, load_tokenizer

        tokenizer = load_tokenizer(run.data.tokenizer)
        prefixes = list(run.data.path) or [ensure_default_dataset(
            run.data.cache_dir, tokenizer, max_bytes=run.data.default_corpus_bytes)]
        train, valid, _ = train_val_test_num_samples
        print_rank_0(f"> building GPTDatasets on {', '.join(prefixes)} ...")
        train_ds, valid_ds = build_gpt_datasets(
            prefixes, tokenizer, seq_length=run.model.seq_length, seed=run.train.seed,
            split=run.data.split, train_samples=train, valid_samples=valid or 0,
            cache_dir=run.data.cache_dir, valid_seed=run.data.valid_seed)
        return train_ds, valid_ds, None

    provider.is_distributed = True
    return provider


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def get_batch(data_iterator, model):
    """``pretrain_gpt.get_batch`` without packed sequences: TP rank 0 reads the iterator and
    broadcasts; middle pipeline stages get ``None``s; then the CP slice."""
    from megatron.core import mpu
    from megatron.core.transformer.multi_token_prediction import mtp_on_this_rank
    from megatron.core.utils import (
        get_attr_wrapped_model,
        get_batch_on_this_cp_rank,
        get_batch_on_this_tp_rank,
    )
    from megatron.training import get_args
    from megatron.training.utils import is_first_or_last_pipeline_stage

    args = get_args()
    config = get_attr_wrapped_model(model, "config")
    vp_stage = get_attr_wrapped_model(model, "vp_stage")
    mtp_here = mtp_on_this_rank(layout=config.pipeline_model_parallel_layout,
                                mtp_num_layers=config.mtp_num_layers, ignore_virtual=False,
                                vp_stage=vp_stage)
    if not is_first_or_last_pipeline_stage(vp_stage) and not mtp_here:
        return {k: None for k in BATCH_KEYS}
    tp_rank = mpu.get_tensor_model_parallel_rank()
    batch = {}
    if tp_rank == 0:
        sample = next(data_iterator)
        has_mask = sample.get("attention_mask") is not None
        if has_mask != args.create_attention_mask_in_dataloader:
            # fail here, not with the other TP ranks waiting for a broadcast never sent
            raise RuntimeError(
                f"the data sample {'has' if has_mask else 'has no'} attention_mask but "
                f"create_attention_mask_in_dataloader={args.create_attention_mask_in_dataloader}"
                ": the dataset and Megatron's flags disagree (see steps.DATASET_FLAGS)")
        dev = _device()
        batch = {k: sample[k].to(dev, non_blocking=True) if sample.get(k) is not None else None
                 for k in BATCH_KEYS}
    batch = get_batch_on_this_tp_rank(
        batch, has_cu_seqlens=False, is_hybrid_cp=False,
        create_attention_mask_in_dataloader=args.create_attention_mask_in_dataloader,
        broadcast_src_rank=mpu.get_tensor_model_parallel_src_rank(),
        broadcast_group=mpu.get_tensor_model_parallel_group(), cp_size=args.context_parallel_size,
        tp_rank=tp_rank, micro_batch_size=args.micro_batch_size, seq_length=args.seq_length,
        mtp_on_this_rank=mtp_here, pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        is_pipeline_first_stage=mpu.is_pipeline_first_stage(),
        is_pipeline_last_stage=mpu.is_pipeline_last_stage())
    return get_batch_on_this_cp_rank(batch, is_hybrid_cp=False,
                                     cp_group=mpu.get_context_parallel_group())


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """``pretrain_gpt.loss_func``: summed masked loss, token count, the ``lm loss`` report,
    and the rerun state machine's NaN / Inf / spike checks."""
    from megatron.core.rerun_state_machine import get_rerun_state_machine
    from megatron.training import get_args

    args = get_args()
    losses = output_tensor.view(-1).float()
    loss_mask = loss_mask.view(-1).float()
    loss = torch.sum(losses * loss_mask)
    num_tokens = loss_mask.sum().clone().detach().to(torch.int)
    report = {"lm loss": torch.cat([loss.clone().detach().view(1), num_tokens.view(1)])}
    rerun = get_rerun_state_machine()
    if args.check_for_nan_in_loss_and_grad:
        for reject, what in ((torch.isnan, "NaN"), (torch.isinf, "Inf")):
            rerun.validate_result(result=loss, rejection_func=reject,
                                  message=f"found {what} in local forward loss calculation",
                                  tolerance=0.0, fatal=True)
    if args.check_for_spiky_loss:
        rerun.validate_result(
            result=loss, rejection_func=partial(rerun.is_unexpectedly_large, threshold=10,
                                                context="loss"),
            message="Spiky loss", tolerance=0.0, fatal=False)
    return loss, num_tokens, report


def forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """``pretrain_gpt.forward_step`` for indexed GPT data, with MoHGE's training progress."""
    from megatron.training import get_args, get_timers

    from megatron_mohge.integration.megatron_lm.hooks import update_training_progress

    args = get_args()
    update_training_progress(model, args)
    timers = get_timers()
    timers("batch-generator", log_level=2).start()
    b = get_batch(data_iterator, model)
    timers("batch-generator").stop()
    if return_schedule_plan:
        assert args.overlap_moe_expert_parallel_comm, \
            "overlap_moe_expert_parallel_comm must be enabled to return the schedule plan"
        plan = model.build_schedule_plan(b["tokens"], b["position_ids"], b["attention_mask"],
                                         labels=b["labels"], loss_mask=b["loss_mask"])
        return plan, partial(loss_func, b["loss_mask"])
    output = model(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"],
                   loss_mask=b["loss_mask"])
    return output, partial(loss_func, b["loss_mask"])


def get_embedding_ranks(pp_ranks: List[int]) -> List[int]:
    """``pretrain_gpt.get_embedding_ranks``: first stage, last stage when embeddings are tied,
    and the stages holding MTP layers."""
    from megatron.core.transformer.multi_token_prediction import get_mtp_ranks
    from megatron.training import get_args
    from megatron.training.arguments import core_transformer_config_from_args

    ranks = [pp_ranks[0]]
    if len(pp_ranks) > 1:
        args = get_args()
        if not args.untie_embeddings_and_output_weights:
            ranks.append(pp_ranks[-1])
        ranks.extend(get_mtp_ranks(pp_ranks, core_transformer_config_from_args(args)))
    return sorted(set(ranks))


__all__ = ["BATCH_KEYS", "DATASET_FLAGS", "dataset_provider", "forward_step", "get_batch",
           "get_embedding_ranks", "loss_func"]
