"""``mohge-eval MODEL INPUT... [--json]``: held-out loss, perplexity and bits per byte.

``MODEL``: a Megatron checkpoint (a run's output folder, its checkpoint folder or one
``iter_XXXXXXX`` folder; scored by the plugin's own model on this process) or a folder
written by ``mohge-export-hf`` (scored through ``transformers``). ``INPUT``: any text input
``mohge-prepare-data`` reads (JSON lines / JSON / Parquet / plain text, compressed or not,
folders); every document is scored on its own, conditioned on the end-of-document token, in
lm-eval-harness's rolling windows of ``--max-length`` tokens (default: the training sequence
length), so ``lm_eval``'s ``bits_per_byte`` on the same text agrees. Bits per byte = summed
NLL / (UTF-8 bytes x ln 2): comparable across tokenizers.

Exit codes: 0 done; 2 bad input (one line naming the file or field).
"""

from __future__ import annotations

import json
import sys

from megatron_mohge.cli import common

PROG = "mohge-eval"


def parse_args(argv=None):
    from megatron_mohge.data.formats import DEFAULT_JSON_KEYS, DEFAULT_SPLIT, SPLIT_RULES

    p = common.parser(PROG, __doc__)
    p.add_argument("model", metavar="MODEL", help="Megatron checkpoint or exported HF folder")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="text inputs (files / folders)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--json-keys", nargs="+", default=list(DEFAULT_JSON_KEYS), metavar="KEY")
    p.add_argument("--split-documents", choices=SPLIT_RULES, default=DEFAULT_SPLIT)
    p.add_argument("--max-length", type=int, default=None, help="window length (tokens)")
    p.add_argument("--max-documents", type=int, default=None)
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration")
    p.add_argument("--config", default=None, metavar="RUN.yaml", help="the checkpoint's run "
                   "file (default: its run.yaml)")
    p.add_argument("--tokenizer", default=None, help="the run's tokenizer.json if it moved")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def evaluate(args) -> dict:
    """The figures ``mohge-eval`` prints (a dict), from parsed arguments."""
    import itertools

    from megatron_mohge.config import ConfigError
    from megatron_mohge.data.formats import DocumentSpec
    from megatron_mohge.data.prepare import iter_texts
    from megatron_mohge.evaluation import evaluate_texts
    from megatron_mohge.evaluation import models

    if args.max_length is not None and args.max_length < 1:
        raise ConfigError(f"--max-length {args.max_length}: must be >= 1")
    spec = DocumentSpec(args.split_documents, tuple(args.json_keys))
    texts = iter_texts(args.inputs, spec)
    if args.max_documents is not None:
        texts = itertools.islice(texts, args.max_documents)
    texts = list(texts)  # read (and checked) before a model is loaded
    if not texts:
        raise ConfigError(f"{' '.join(args.inputs)}: no documents")
    if models.is_hf_export(args.model):
        scorer = models.hf_scorer(args.model, args.max_length)
    else:
        scorer = models.checkpoint_scorer(args.model, iteration=args.iteration,
                                          run_file=args.config, tokenizer=args.tokenizer,
                                          max_length=args.max_length)
    from tqdm import tqdm

    with tqdm(desc=PROG, unit="tok", disable=args.no_progress, file=sys.stderr) as bar:
        totals = evaluate_texts(texts, scorer.tokenize, scorer.prefix, scorer.logits_fn,
                                scorer.max_length, progress=bar.update)
    return {**totals.as_dict(), "model": scorer.what, "max_length": scorer.max_length}


def _run(args) -> int:
    result = evaluate(args)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['model']}: loss {result['loss']:.4f}  perplexity "
              f"{result['perplexity']:.3f}  bits/byte {result['bits_per_byte']:.4f}  "
              f"({result['tokens']} tokens, {result['bytes']} bytes, "
              f"{result['documents']} documents)")
    return 0


@common.entry
def main(argv=None) -> int:
    return common.run_cli(PROG, _run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
