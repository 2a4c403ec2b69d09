"""The tokenizer of an export: files for ``AutoTokenizer`` and the ids ``config.json`` names.

``byte`` (megatron-mohge's ``ByteTokenizer``: id = UTF-8 byte, ``<|endoftext|>`` = 256)
becomes a ``tokenizer.json`` that maps every byte to its id (byte-level pre-tokenizer, no
merges) so ``PreTrainedTokenizerFast`` encodes exactly as training did; a trained
``tokenizer.json`` is copied as it is. The end-of-document token is ``eos``; no ``bos``, so
lm-eval-harness prefixes rolling windows with ``eos`` (what each document followed in
training, and what ``mohge-eval`` conditions the first token on).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from megatron_mohge.config import ConfigError
from megatron_mohge.data.tokenizers import bytes_to_unicode


def byte_tokenizer_json(eod_token: str, eod_id: int) -> str:
    table = bytes_to_unicode()
    level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
             "use_regex": False}
    return json.dumps({
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": eod_id, "content": eod_token, "single_word": False,
                          "lstrip": False, "rstrip": False, "normalized": False,
                          "special": True}],
        "normalizer": None, "pre_tokenizer": level, "post_processor": None, "decoder": level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {table[b]: b for b in range(256)}, "merges": []},
    }, ensure_ascii=False)


def tokenizer_files(spec: str, max_length: int, override: Optional[str] = None):
    """``({file name: text}, {eos/pad/bos_token_id}, tokenizer)`` for the run's
    ``data.tokenizer`` (``override``: another path to the same tokenizer.json)."""
    from megatron_mohge.data.tokenizers import TRAINED_EOD, ByteTokenizer, load_tokenizer

    try:
        tok = load_tokenizer(override or spec)
    except ConfigError as exc:
        raise ConfigError(f"data.tokenizer={spec!r}: {exc} (pass --tokenizer PATH when the "
                          "tokenizer.json moved)") from exc
    if isinstance(tok, ByteTokenizer):
        eod_token, pad_token = TRAINED_EOD, TRAINED_EOD
        files = {"tokenizer.json": byte_tokenizer_json(eod_token, tok.eod)}
    else:
        eod_token = tok.eod_token_used
        pad_token = tok._tok.id_to_token(tok.pad)
        files = {"tokenizer.json": Path(tok.path).read_text(encoding="utf-8")}
    files["tokenizer_config.json"] = json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eod_token,
        "pad_token": pad_token, "model_max_length": max_length,
        "clean_up_tokenization_spaces": False}, indent=1)
    files["special_tokens_map.json"] = json.dumps({"eos_token": eod_token,
                                                   "pad_token": pad_token}, indent=1)
    ids = {"eos_token_id": tok.eod, "pad_token_id": tok.pad, "bos_token_id": None}
    return files, ids, tok
