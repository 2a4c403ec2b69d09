"""UTF-8 bytes each token id stands for, so a token-level loss converts to bits per byte
(:func:`bits_per_byte`; the trainer and ``mohge-eval`` both report it).

``byte``: 1 per byte id, 0 for end-of-document. A ``tokenizer.json``: byte-level tokens
(GPT-2 style, what ``mohge-prepare-data --train-tokenizer`` trains) count their characters
(one per byte); other tokens the bytes of their decoded text; special tokens 0.
"""

from __future__ import annotations

import math

import torch


def token_byte_lengths(tokenizer, vocab_size: int) -> torch.Tensor:
    """float64 ``[vocab_size]`` (padded ids: 0)."""
    from megatron_mohge.data.tokenizers import ByteTokenizer, bytes_to_unicode

    out = torch.zeros(vocab_size, dtype=torch.float64)
    if isinstance(tokenizer, ByteTokenizer):
        out[:256] = 1.0
        return out
    tok = tokenizer._tok
    byte_chars = set(bytes_to_unicode().values())
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    for token, i in tok.get_vocab(with_added_tokens=True).items():
        if i >= vocab_size or token in special:
            continue
        if all(c in byte_chars for c in token):
            out[i] = len(token)
        else:
            out[i] = len(tok.decode([i], skip_special_tokens=False).encode("utf-8"))
    return out


def bits_per_byte(nll_nats: float, num_bytes: int) -> float:
    """Summed NLL (nats) over the text's UTF-8 bytes, in bits per byte."""
    return nll_nats / (num_bytes * math.log(2)) if num_bytes else float("nan")
