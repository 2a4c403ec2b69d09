"""Documents -> rolling token windows -> summed negative log-likelihood and bytes.

Each document is scored on its own, its first token conditioned on the end-of-document
token (``prefix``: what every document followed in training; lm-eval-harness's ``eos``
prefix). Windows are lm-eval-harness's ``get_rolling_token_windows(..., context_len=1)`` +
``make_disjoint_window``: disjoint blocks of ``max_length`` predicted tokens, each predicted
from the tokens before it inside its block; the last, shorter block is given a full
``max_length`` context. Bits per byte divide the summed NLL by the documents' UTF-8 bytes
(lm-eval's ``bits_per_byte``), so they do not depend on the tokenizer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch

from megatron_mohge.data.token_bytes import bits_per_byte


def rolling_windows(tokens: list, prefix: int, max_length: int) -> Iterator[tuple[list, int]]:
    """``(input ids, n)``: the model reads ``input ids`` and its last ``n`` positions predict
    the next ``n`` tokens of the document (every token exactly once)."""
    if not tokens:
        return
    done = min(max_length, len(tokens))
    yield [prefix] + tokens[: done - 1], done
    while done < len(tokens):
        n = min(len(tokens) - done, max_length)
        end = done + n
        yield tokens[max(0, end - max_length - 1): end - 1], n  # a full window of context
        done = end


def window_targets(tokens: list, prefix: int, max_length: int) -> Iterator[tuple[list, list]]:
    """``(input ids, target ids)`` per window (targets: the last ``len`` positions)."""
    done = 0
    for inputs, n in rolling_windows(tokens, prefix, max_length):
        yield inputs, tokens[done: done + n]
        done += n


@dataclass
class EvalTotals:
    nll: float = 0.0  # summed negative log-likelihood, nats
    tokens: int = 0  # predicted tokens
    bytes: int = 0  # UTF-8 bytes of the documents
    documents: int = 0

    def as_dict(self) -> dict:
        loss = self.nll / self.tokens if self.tokens else float("nan")
        return {"loss": loss, "perplexity": math.exp(loss) if self.tokens else float("nan"),
                "bits_per_byte": bits_per_byte(self.nll, self.bytes), "tokens": self.tokens,
                "bytes": self.bytes, "documents": self.documents, "nll_nats": self.nll}


@torch.no_grad()
def evaluate_texts(texts: Iterable[str], tokenize: Callable[[str], list], prefix: int,
                   logits_fn: Callable[[torch.Tensor], torch.Tensor], max_length: int,
                   progress: Optional[Callable[[int], None]] = None) -> EvalTotals:
    """Score ``texts`` (``logits_fn``: ``[1, s]`` token ids -> ``[1, s, V]`` logits);
    ``progress(n)`` is called with the tokens each window predicted."""
    totals = EvalTotals()
    for text in texts:
        ids = list(tokenize(text))
        totals.documents += 1
        totals.bytes += len(text.encode("utf-8"))
        for inputs, targets in window_targets(ids, prefix, max_length):
            logits = logits_fn(torch.tensor([inputs], dtype=torch.long))[0, -len(targets):]
            logp = torch.log_softmax(logits.double(), dim=-1)
            totals.nll -= float(logp.gather(1, torch.tensor(targets).unsqueeze(1)).sum())
            totals.tokens += len(targets)
            if progress is not None:
                progress(len(targets))
    return totals
