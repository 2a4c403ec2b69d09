"""Data for MoHGE training: tokenizers, text corpora, Megatron ``.bin``/``.idx`` datasets.

``mohge-prepare-data`` (``prepare_data`` / ``prepare_datasets``) tokenizes JSON lines,
Parquet or text files (``formats``) -- by default the Python
standard library's sources -- into megatron-core indexed datasets; ``build_gpt_datasets``
and ``get_micro_batches`` turn them into deterministic training batches. Importing this
package does not import torch or megatron-core.
"""

from megatron_mohge.data.corpus import collect_text_files, default_corpus_files
from megatron_mohge.data.datasets import build_gpt_datasets, get_micro_batches
from megatron_mohge.data.prepare import (
    DEFAULT_CORPUS_MAX_BYTES,
    check_dataset,
    ensure_default_dataset,
    prepare_data,
    prepare_datasets,
    read_metadata,
)
from megatron_mohge.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    load_tokenizer,
    train_hf_tokenizer,
)

__all__ = [
    "ByteTokenizer", "HFTokenizer", "load_tokenizer", "train_hf_tokenizer",
    "default_corpus_files", "collect_text_files",
    "prepare_data", "prepare_datasets", "read_metadata", "check_dataset", "ensure_default_dataset",
    "DEFAULT_CORPUS_MAX_BYTES",
    "build_gpt_datasets", "get_micro_batches",
]
