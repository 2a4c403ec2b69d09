"""Held-out loss, perplexity and bits per byte of a model on text (``mohge-eval``).

:mod:`.rolling` scores documents with lm-eval-harness's rolling-window scheme (so its
``loglikelihood_rolling`` tasks and ``mohge-eval`` give the same numbers); :mod:`.models`
loads what is scored: a Megatron checkpoint through the plugin's own model, or an exported
Hugging Face folder through ``transformers``.
"""

from megatron_mohge.evaluation.rolling import EvalTotals, evaluate_texts

__all__ = ["EvalTotals", "evaluate_texts"]
