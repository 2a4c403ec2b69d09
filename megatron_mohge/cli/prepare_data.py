"""``mohge-prepare-data``: tokenize text files into a Megatron ``.bin``/``.idx`` dataset.

Examples::

    mohge-prepare-data                                  # stdlib corpus -> data/stdlib_byte
    mohge-prepare-data docs/ notes.txt --output-prefix data/notes_byte
    mohge-prepare-data --train-tokenizer 8192 --tokenizer-out data/bpe8k.json \\
        --output-prefix data/stdlib_bpe8k
    mohge-prepare-data corpus/ --tokenizer data/bpe8k.json --output-prefix data/corpus_bpe8k
    mohge-prepare-data docs.jsonl --json-keys text --output-prefix data/docs_byte
    mohge-prepare-data book.txt --split-documents line --output-prefix data/book_byte

Input formats (by file name; ``.gz``/``.bz2``/``.xz``/``.zst`` compressed too): ``.jsonl`` /
``.json`` (one JSON object per line, text under --json-keys, as Megatron-LM's
``tools/preprocess_data.py``; several keys write one dataset per key, PREFIX_<key>),
``.parquet`` (the --json-keys columns; needs pyarrow), anything else is UTF-8 text cut into
documents by --split-documents.

Exit codes: 0 success, 2 bad input (message on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_mohge.cli import common, notices
from megatron_mohge.config import ConfigError
from megatron_mohge.util.usage_errors import print_error
from megatron_mohge.data.formats import (DEFAULT_JSON_KEYS, DEFAULT_SPLIT, SPLIT_RULES,
                                         DocumentSpec)

PROG = "mohge-prepare-data"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Tokenize documents (eod after each) into a Megatron-LM compatible "
                    ".bin/.idx dataset plus a .json sidecar that records the tokenizer. "
                    "Inputs: JSON lines (.jsonl/.json, text under --json-keys), Parquet, or "
                    "UTF-8 text cut into documents by --split-documents; .gz/.bz2/.xz/.zst "
                    "compressed too. Without INPUT, the Python standard library's .py sources "
                    "are used, one document per file.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-v", "--verbose", action=notices.VerboseAction)
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="files or folders (recursive; hidden files skipped)")
    p.add_argument("--json-keys", nargs="+", default=list(DEFAULT_JSON_KEYS), metavar="KEY",
                   help="JSON lines / Parquet: the text field(s); several keys write one "
                        "dataset per key (PREFIX_<key>)")
    p.add_argument("--split-documents", choices=SPLIT_RULES, default=DEFAULT_SPLIT,
                   help="plain text: a document is a paragraph (text between blank lines), "
                        "a non-blank line, or a whole file")
    p.add_argument("--output-prefix", default=None,
                   help="write PREFIX.bin/.idx/.json (default: data/<stdlib|corpus>_<tokenizer>)")
    p.add_argument("--tokenizer", default=None,
                   help="'byte' (UTF-8 bytes, vocab 257; the default) or PATH/tokenizer.json")
    p.add_argument("--train-tokenizer", type=int, default=None, metavar="VOCAB_SIZE",
                   help="first train a byte-level BPE of this vocab size on the inputs")
    p.add_argument("--tokenizer-out", default=None, metavar="PATH",
                   help="where --train-tokenizer saves tokenizer.json "
                        "(default: PREFIX.tokenizer.json)")
    p.add_argument("--max-bytes", type=int, default=None, metavar="N",
                   help="stop after the document that reaches N bytes of text (default: all)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # unreachable


def _run(args: argparse.Namespace) -> int:
    from megatron_mohge.data.tokenizers import load_tokenizer, train_hf_tokenizer

    if args.train_tokenizer is not None and args.tokenizer is not None:
        raise ConfigError("--tokenizer and --train-tokenizer both given; use --tokenizer to "
                          "tokenize with an existing tokenizer, or --train-tokenizer to train one")
    if args.tokenizer_out is not None and args.train_tokenizer is None:
        raise ConfigError("--tokenizer-out only makes sense with --train-tokenizer VOCAB_SIZE")
    source = "corpus" if args.inputs else "stdlib"
    if args.train_tokenizer is not None:
        tok_tag = f"bpe{args.train_tokenizer}"
    elif args.tokenizer is None or args.tokenizer.strip().lower() == "byte":
        tok_tag = "byte"
    else:
        tok_tag = Path(args.tokenizer).stem.replace("tokenizer", "hf") or "hf"
    prefix = args.output_prefix or f"data/{source}_{tok_tag}"

    spec = DocumentSpec(split=args.split_documents, json_keys=tuple(args.json_keys))
    if args.train_tokenizer is not None:
        from megatron_mohge.data.prepare import iter_texts

        out = args.tokenizer_out or f"{prefix}.tokenizer.json"
        texts = iter_texts(args.inputs or None, spec, args.max_bytes)
        tokenizer = train_hf_tokenizer([], args.train_tokenizer, out, texts=texts)
        print(f"{PROG}: trained a byte-level BPE (vocab {tokenizer.vocab_size}) on the inputs "
              f"-> {tokenizer.spec}", file=sys.stderr)
    else:
        tokenizer = load_tokenizer(args.tokenizer or "byte")

    from megatron_mohge.data.prepare import prepare_datasets

    metas = prepare_datasets(args.inputs or None, prefix, tokenizer, max_bytes=args.max_bytes,
                             progress=not args.no_progress, workers=args.workers,
                             split=spec.split, json_keys=spec.json_keys)
    for out_prefix, meta in metas.items():
        print(f"{PROG}: {meta['num_documents']} documents, {meta['num_tokens']:,} tokens from "
              f"{_human_bytes(meta['num_bytes'])} (tokenizer {tokenizer.spec}, vocab "
              f"{meta['vocab_size']}) -> {out_prefix}.bin, {out_prefix}.idx, {out_prefix}.json")
    return 0


@common.entry
def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2, already printed)
        return int(exit_.code or 0)
    try:  # "PROG: error: message", the form of argparse's own usage errors above
        return common.run_cli(PROG, _run, args,
                              report=lambda prog, exc: print_error(prog, f"error: {exc}"))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no dataset was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
