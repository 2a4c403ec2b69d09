"""``mohge-prepare-data``: tokenize text files into a Megatron ``.bin``/``.idx`` dataset.

Examples::

    mohge-prepare-data                                  # stdlib corpus -> data/stdlib_byte
    mohge-prepare-data docs/ notes.txt --output-prefix data/notes_byte
    mohge-prepare-data --train-tokenizer 8192 --tokenizer-out data/bpe8k.json \\
        --output-prefix data/stdlib_bpe8k
    mohge-prepare-data corpus/ --tokenizer data/bpe8k.json --output-prefix data/corpus_bpe8k

Exit codes: 0 success, 2 bad input (message on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_mohge.config import ConfigError

PROG = "mohge-prepare-data"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Tokenize text files (one document per file, eod after each) into a "
                    "Megatron-LM compatible .bin/.idx dataset plus a .json sidecar that "
                    "records the tokenizer. Without INPUT, the Python standard library's "
                    ".py sources are used.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="text files or folders (recursive; hidden files skipped)")
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
                   help="stop after N bytes of input files (default: all)")
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
    from megatron_mohge.data.corpus import (collect_text_files, default_corpus_files,
                                            limit_bytes)
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

    if args.train_tokenizer is not None:
        files = (limit_bytes(collect_text_files(args.inputs), args.max_bytes) if args.inputs
                 else default_corpus_files(args.max_bytes))
        out = args.tokenizer_out or f"{prefix}.tokenizer.json"
        tokenizer = train_hf_tokenizer(files, args.train_tokenizer, out)
        print(f"{PROG}: trained a byte-level BPE (vocab {tokenizer.vocab_size}) on "
              f"{len(files)} files -> {tokenizer.spec}", file=sys.stderr)
    else:
        tokenizer = load_tokenizer(args.tokenizer or "byte")

    from megatron_mohge.data.prepare import prepare_data

    meta = prepare_data(args.inputs or None, prefix, tokenizer, max_bytes=args.max_bytes,
                        progress=not args.no_progress, workers=args.workers)
    print(f"{PROG}: {meta['num_documents']} documents, {meta['num_tokens']:,} tokens from "
          f"{_human_bytes(meta['num_bytes'])} (tokenizer {tokenizer.spec}, vocab "
          f"{meta['vocab_size']}) -> {prefix}.bin, {prefix}.idx, {prefix}.json")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse: --help (0) or a usage error (2, already printed)
        return int(exit_.code or 0)
    try:
        return _run(args)
    except ConfigError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; no dataset was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
