"""Training / validation datasets (megatron-core ``GPTDataset``) and deterministic batches.

``build_gpt_datasets`` is a thin, checked front end to megatron-core's
``BlendedMegatronDatasetBuilder``: it validates what megatron-core would otherwise turn into
asserts or hangs (missing files, wrong tokenizer, a split with no tokens), then lets the
builder do its distributed dance (global rank 0 builds and caches the sample indices, a
barrier, then the other ranks load them), exactly as Megatron-LM's ``pretrain_gpt.py``.

``get_micro_batches`` reads one global batch as a pure function of the iteration, so a run
resumed from a checkpoint sees the same data as an uninterrupted one, without saving any
data-loader state.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

from megatron_mohge.config import ConfigError, parse_split
from megatron_mohge.data.integrity import content_key, read_index
from megatron_mohge.data.prepare import check_dataset, normalize_prefix, read_metadata
from megatron_mohge.data.tokenizers import Tokenizer, load_tokenizer

BATCH_KEYS = ("tokens", "labels", "position_ids", "loss_mask")
_SPLIT_NAMES = ("train", "validation", "test")


def check_split_sizes(prefix: str, split: str, seq_length: int) -> None:
    """Every needed split of ``prefix`` must hold at least one sample of tokens.

    megatron-core would otherwise loop forever: ``GPTDataset._get_num_epochs`` adds epochs
    of 0 tokens until it reaches the requested sample count (gpt_dataset.py).
    """
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix)
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    # Copy while the IndexedDataset is alive: its __del__ closes the mmap that
    # `sequence_lengths` views, so using the view after dropping it segfaults.
    ds = IndexedDataset(prefix, mmap=True)
    lengths = ds.sequence_lengths.copy()
    del ds
    n = lengths.shape[0]
    matrix = convert_split_vector_to_split_matrix(parse_split(split))
    for i in (0, 1):  # train, validation (the test split is not built, see build_gpt_datasets)
        beg, end = (int(round(b * float(n))) for b in matrix[i])  # as the builder rounds
        tokens = int(lengths[beg:end].sum())
        if tokens < seq_length + 1:  # one sample = seq_length inputs + 1 shifted label
            raise ConfigError(
                f"the {_SPLIT_NAMES[i]} split of dataset {prefix!r} (split={split!r}: documents "
                f"{beg}..{end} of {n}) has {tokens} tokens, fewer than one sample of "
                f"seq_length+1={seq_length + 1}; use a bigger corpus (more input files or a "
                f"larger --max-bytes), give {_SPLIT_NAMES[i]} a bigger share in split, or "
                f"lower seq_length{_few_paragraphs_hint(prefix, n)}")


def _few_paragraphs_hint(prefix: str, documents: int) -> str:
    """A text with one sentence (or record) per line and no blank lines, cut at blank lines,
    is one document, which no split divides (the split cuts between documents)."""
    meta = read_metadata(prefix) or {}
    if meta.get("documents", {}).get("split") != "blank-line":
        return ""
    return (f". Its text was cut into {documents} document(s) at blank lines; a text without "
            f"blank lines is one document: prepare it with --split-documents line")


def default_index_cache(prefix: str) -> str:
    """Where sample indices are cached by default: next to the (first) dataset."""
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache", "GPTDataset_indices")


def build_gpt_datasets(prefixes: Union[str, Path, Sequence[Union[str, Path]]],
                       tokenizer: Union[str, Tokenizer], *, seq_length: int, seed: int,
                       split: str = "949,50,1", train_samples: int, valid_samples: int,
                       cache_dir: Optional[Union[str, Path]] = None,
                       valid_seed: Optional[int] = None):
    """Build the train and validation ``GPTDataset`` (or ``BlendedDataset`` for several
    prefixes, blended in proportion to their sizes as Megatron-LM does without weights).

    Which documents are held out never depends on a seed (megatron-core cuts the split by
    document index). ``seed`` shuffles documents into samples; the validation split is
    shuffled with ``valid_seed`` instead when given, so runs with different training seeds
    are evaluated on the same held-out samples.

    Must be called on every rank when ``torch.distributed`` is initialised (the builder
    synchronises with barriers). Returns ``(train_ds, valid_ds)``.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder)
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    if isinstance(prefixes, (str, Path)):
        prefixes = [prefixes]
    prefixes = [normalize_prefix(p) for p in prefixes]
    if not prefixes:
        raise ConfigError("no dataset prefixes given; pass at least one prefix prepared by "
                          "mohge-prepare-data (e.g. data/stdlib_byte)")
    for name, value in (("seq_length", seq_length), ("train_samples", train_samples)):
        if int(value) < 1:
            raise ConfigError(f"{name}={value} must be >= 1")
    if int(valid_samples) < 0:
        raise ConfigError(f"valid_samples={valid_samples} must be >= 0")
    tok = load_tokenizer(tokenizer)
    for p in prefixes:
        check_dataset(p, tok)  # also: .bin / .idx / sidecar belong together (integrity.py)
        check_split_sizes(p, split, int(seq_length))
    cache = os.path.abspath(os.fspath(cache_dir)) if cache_dir else default_index_cache(prefixes[0])
    # megatron-core names cached sample indices by the dataset *path*; data re-prepared at
    # the same prefix would reuse indices of the old documents (a wrong split or IndexError).
    # One sub-folder per content (the .idx hashes) keys the cache on the data instead.
    cache = os.path.join(cache, "content-" + content_key([read_index(p) for p in prefixes]))

    def gpt_config(random_seed: int, keep: tuple) -> GPTDatasetConfig:
        config = GPTDatasetConfig(
            random_seed=int(random_seed),
            sequence_length=int(seq_length),
            blend=(prefixes, None),
            split=split,
            path_to_cache=cache,
            tokenizer=tok,
            mmap_bin_files=True,
            reset_position_ids=False,
            reset_attention_mask=False,
            eod_mask_loss=False,
            # MoHGE / Megatron attention builds the causal mask itself; a [1, s, s] mask per
            # sample would only cost memory.
            create_attention_mask=False,
        )
        # Only the splits in `keep` are built. The test split never is: it is not used, and
        # skipping it avoids megatron-core's endless epoch loop when a small corpus leaves
        # it without documents. Boundaries stay exactly those of `split` (the matrix keeps
        # its book-ends).
        config.split_matrix = [m if i in keep else None
                               for i, m in enumerate(config.split_matrix)]
        return config

    def build(config: GPTDatasetConfig, sizes: list[int]):
        with warnings.catch_warnings():
            # pad == eod (ByteTokenizer, most HF vocabs): megatron-core warns and then uses
            # pad id -1, i.e. masks nothing -- what we want, so the warning is only noise.
            warnings.filterwarnings("ignore",
                                    message="The pad token id in the tokenizer collides")
            # Every rank builds (lambda: True): each one reads its own data-parallel slice.
            return BlendedMegatronDatasetBuilder(GPTDataset, sizes, lambda: True,
                                                 config).build()

    if valid_seed is None or int(valid_seed) == int(seed):
        train_ds, valid_ds, _ = build(gpt_config(seed, (0, 1)),
                                      [int(train_samples), int(valid_samples), 0])
    else:
        train_ds = build(gpt_config(seed, (0,)), [int(train_samples), 0, 0])[0]
        valid_ds = build(gpt_config(valid_seed, (1,)), [0, int(valid_samples), 0])[1]

    if valid_ds is None or len(valid_ds) == 0:
        raise ConfigError(f"the validation split is empty for datasets {prefixes} with "
                          f"split={split!r}, seq_length={seq_length}; use a bigger corpus or "
                          f"a larger validation share in split")
    if train_ds is None or len(train_ds) == 0:
        raise ConfigError(f"the train split is empty for datasets {prefixes} with "
                          f"split={split!r}, seq_length={seq_length}; use a bigger corpus")
    return train_ds, valid_ds


def get_micro_batches(dataset, *, iteration: int, global_batch_size: int, micro_batch_size: int,
                      dp_rank: int, dp_size: int, start_sample: Optional[int] = None) -> list[dict]:
    """This data-parallel rank's micro-batches of global batch ``iteration``.

    Global batch ``iteration`` holds samples ``start + j`` (``j < global_batch_size``,
    ``start = iteration * global_batch_size`` unless ``start_sample`` is given, e.g. by a
    trainer that changed the batch size mid-run), taken modulo ``len(dataset)`` so long runs
    wrap around instead of failing. DP rank ``r`` takes the contiguous slice
    ``[r * gbs/dp, (r+1) * gbs/dp)`` as Megatron's ``MegatronPretrainingSampler`` does, split
    into micro-batches of ``micro_batch_size``. Each micro-batch maps ``tokens``, ``labels``,
    ``position_ids`` (int64) and ``loss_mask`` (float32) to ``[micro_batch_size, seq]``.
    """
    import torch

    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ConfigError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
    if micro_batch_size < 1 or global_batch_size < 1:
        raise ConfigError(f"global_batch_size={global_batch_size} and micro_batch_size="
                          f"{micro_batch_size} must be >= 1")
    if global_batch_size % (dp_size * micro_batch_size):
        raise ConfigError(
            f"global_batch_size={global_batch_size} is not divisible by data-parallel size "
            f"{dp_size} x micro_batch_size {micro_batch_size} = {dp_size * micro_batch_size}; "
            f"choose a global batch size that is a multiple of {dp_size * micro_batch_size}")
    if iteration < 0:
        raise ConfigError(f"iteration={iteration} must be >= 0")
    n = len(dataset)
    if n == 0:
        raise ConfigError("the dataset is empty; build it with more data (build_gpt_datasets)")
    per_rank = global_batch_size // dp_size
    start = iteration * global_batch_size if start_sample is None else int(start_sample)
    first = start + dp_rank * per_rank
    samples = [dataset[(first + k) % n] for k in range(per_rank)]
    dtypes = {"tokens": torch.int64, "labels": torch.int64, "position_ids": torch.int64,
              "loss_mask": torch.float32}
    batches = []
    for m in range(0, per_rank, micro_batch_size):
        chunk = samples[m:m + micro_batch_size]
        batches.append({k: torch.stack([torch.as_tensor(s[k]) for s in chunk]).to(dtypes[k])
                        for k in BATCH_KEYS})
    return batches


__all__ = ["build_gpt_datasets", "check_split_sizes", "get_micro_batches", "default_index_cache",
           "BATCH_KEYS"]
