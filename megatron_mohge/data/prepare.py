"""Tokenize text files into a Megatron ``.bin``/``.idx`` dataset plus a JSON sidecar.

The ``.bin``/``.idx`` pair is written by megatron-core's own ``IndexedDatasetBuilder`` with
the token dtype Megatron-LM's ``tools/preprocess_data.py`` picks (``DType.optimal_dtype``:
uint16 below 65500 ids, else int32), so the files load in Megatron-LM unchanged. Documents
come from ``formats.py`` (JSON lines / Parquet by key, plain text by a splitting rule); each
is followed by one ``eod`` token, as ``preprocess_data.py`` writes them.

The sidecar ``<prefix>.json`` records the tokenizer (spec, content fingerprint, vocab size,
eod), so training can refuse data prepared with another tokenizer (:func:`check_dataset`)
instead of silently training on wrong ids, and the ``.bin`` size and ``.idx`` hash, so a
``.bin`` / ``.idx`` / sidecar that do not belong together are caught at load time
(``integrity.py``).

megatron-core is imported inside the functions that need it: importing it takes seconds,
and tokenizer worker processes import this module.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from megatron_mohge.config import ConfigError
from megatron_mohge.data.corpus import collect_text_files, default_corpus_files
from megatron_mohge.data.formats import (DEFAULT_JSON_KEYS, DEFAULT_SPLIT, DocumentSpec,
                                         format_of, iter_documents)
from megatron_mohge.data.integrity import file_sha256, verify_dataset_files
from megatron_mohge.data.tokenizers import Tokenizer, describe, load_tokenizer, tokenizer_metadata
from megatron_mohge.version import __version__

# Default size of the cached stdlib corpus used when training is given no data: every
# supported Python's stdlib has more .py text than this (about 11 MiB on 3.11), so the
# corpus size barely depends on the version; ~8M byte tokens tokenize in seconds.
DEFAULT_CORPUS_MAX_BYTES = 8 * 2**20
SIDECAR_FORMAT = "megatron-mohge-dataset/1"
_SOURCES_LISTED = 5  # the sidecar lists this many source paths, then only counts


def normalize_prefix(prefix: Union[str, Path]) -> str:
    """``data/x``, ``data/x.bin`` and ``data/x.idx`` all name the dataset ``data/x``."""
    text = os.fspath(prefix)
    for ext in (".bin", ".idx"):
        if text.endswith(ext):
            text = text[: -len(ext)]
    if not text or text.endswith(("/", os.sep)):
        raise ConfigError(f"dataset prefix {os.fspath(prefix)!r} names a folder, not a dataset; "
                          f"use e.g. data/stdlib_byte (files data/stdlib_byte.bin/.idx/.json)")
    return text


def _paths(prefix: str) -> dict[str, str]:
    return {"bin": prefix + ".bin", "idx": prefix + ".idx", "json": prefix + ".json"}


# --- tokenization, in-process or in spawned workers -------------------------------------

_WORKER_TOKENIZER: Optional[Tokenizer] = None


def _init_worker(tokenizer: Tokenizer) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = tokenizer


def _tokenize_document(texts: tuple[str, ...], tokenizer: Optional[Tokenizer] = None
                       ) -> tuple[list[np.ndarray], int]:
    """Token ids of one document per text (``eod`` appended), and the texts' UTF-8 bytes.

    As Megatron-LM's ``preprocess_data.py`` (``Encoder.encode``): the ``eod`` goes after a
    document's last token, and an empty text stays an empty document without one.
    """
    tok = tokenizer if tokenizer is not None else _WORKER_TOKENIZER
    out, nbytes = [], 0
    for text in texts:
        ids = tok.tokenize(text)
        arr = np.empty(len(ids) + 1 if ids else 0, dtype=np.int64)
        if ids:
            arr[:-1] = ids
            arr[-1] = tok.eod
        out.append(arr)
        nbytes += len(text.encode("utf-8"))
    return out, nbytes


def _documents(files: Sequence[Path], spec: DocumentSpec) -> Iterator[tuple[str, ...]]:
    for f in files:
        yield from iter_documents(f, spec)


def _tokenized(docs: Iterable[tuple[str, ...]], tokenizer: Tokenizer,
               workers: int) -> Iterator[tuple[list[np.ndarray], int]]:
    if workers <= 1:
        for doc in docs:
            yield _tokenize_document(doc, tokenizer)
        return
    import multiprocessing

    # spawn, not fork: the parent may hold torch / Rust-tokenizers threads, which fork copies
    # in a broken state. imap keeps document order, so the dataset does not depend on
    # `workers`; documents are read in this process, so errors name the file and line.
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        yield from pool.imap(_tokenize_document, docs, chunksize=64)


def iter_texts(inputs: Optional[Sequence[Union[str, Path]]], spec: DocumentSpec,
               max_bytes: Optional[int] = None) -> Iterator[str]:
    """The document texts ``prepare_datasets`` would tokenize (all keys), e.g. to train a
    tokenizer on exactly them rather than on raw files (JSON syntax, Parquet bytes)."""
    if not inputs:
        files, spec = default_corpus_files(max_bytes), DocumentSpec("file", spec.json_keys)
    else:
        files = collect_text_files(inputs)
    total = 0
    for doc in _documents(files, spec):
        yield from doc
        total += sum(len(t.encode("utf-8")) for t in doc)
        if max_bytes is not None and total >= max_bytes:
            return


def _remove_quietly(paths: Iterable[str]) -> None:
    for p in paths:
        try:
            os.remove(p)
        except FileNotFoundError:
            pass


def output_prefixes(output_prefix: Union[str, Path], json_keys: Sequence[str]) -> list[str]:
    """One dataset per JSON key: ``PREFIX`` for one key, ``PREFIX_<key>`` for several (as
    Megatron-LM's ``preprocess_data.py`` names one dataset per ``--json-keys`` entry)."""
    prefix = normalize_prefix(output_prefix)
    if len(json_keys) == 1:
        return [prefix]
    return [f"{prefix}_{k}" for k in json_keys]


def prepare_data(inputs: Optional[Sequence[Union[str, Path]]], output_prefix: Union[str, Path],
                 tokenizer: Union[str, Tokenizer], *, max_bytes: Optional[int] = None,
                 progress: bool = True, workers: int = 1, split: str = DEFAULT_SPLIT,
                 json_keys: Sequence[str] = DEFAULT_JSON_KEYS) -> dict:
    """Tokenize ``inputs`` into ``<output_prefix>.bin/.idx/.json``; return the sidecar.

    One JSON key only; :func:`prepare_datasets` writes one dataset per key.
    """
    if len(tuple(json_keys)) != 1:
        raise ConfigError(f"prepare_data writes one dataset but json_keys={list(json_keys)}; "
                          f"use prepare_datasets for several keys")
    return next(iter(prepare_datasets(inputs, output_prefix, tokenizer, max_bytes=max_bytes,
                                      progress=progress, workers=workers, split=split,
                                      json_keys=json_keys).values()))


def prepare_datasets(inputs: Optional[Sequence[Union[str, Path]]],
                     output_prefix: Union[str, Path], tokenizer: Union[str, Tokenizer], *,
                     max_bytes: Optional[int] = None, progress: bool = True, workers: int = 1,
                     split: str = DEFAULT_SPLIT,
                     json_keys: Sequence[str] = DEFAULT_JSON_KEYS) -> dict[str, dict]:
    """Tokenize ``inputs`` (files / folders; None or empty: the stdlib corpus, one document
    per file) into one ``.bin/.idx/.json`` dataset per JSON key; returns prefix -> sidecar.

    Documents come from :mod:`megatron_mohge.data.formats` (JSON lines / Parquet by
    ``json_keys``, plain text by ``split``). ``max_bytes`` stops after the document that
    reaches that many bytes of text. Files are written under temporary names and renamed at
    the end, sidecars last, so an interrupted run never leaves a dataset that looks complete.
    """
    from tqdm import tqdm
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    tok = load_tokenizer(tokenizer)
    if workers < 1:
        raise ConfigError(f"workers={workers} must be >= 1")
    if max_bytes is not None and max_bytes <= 0:
        raise ConfigError(f"max_bytes={max_bytes} must be positive (or None for no limit)")
    default_corpus = not inputs
    # The stdlib corpus is code: one document per file, as it always was (its cache key).
    spec = DocumentSpec(split="file" if default_corpus else split, json_keys=tuple(json_keys))
    files = default_corpus_files(max_bytes) if default_corpus else collect_text_files(inputs)
    prefixes = output_prefixes(output_prefix, spec.json_keys)
    Path(prefixes[0]).parent.mkdir(parents=True, exist_ok=True)
    finals = [_paths(p) for p in prefixes]
    tmps = [_paths(f"{p}.tmp{os.getpid()}") for p in prefixes]
    dtype = DType.optimal_dtype(tok.vocab_size)

    num_docs = num_bytes = 0
    num_tokens = [0] * len(prefixes)
    builders = []
    try:
        for tmp in tmps:
            builders.append(IndexedDatasetBuilder(tmp["bin"], dtype=dtype))
        bar = tqdm(_tokenized(_documents(files, spec), tok, workers), unit="doc",
                   desc=f"tokenizing -> {Path(prefixes[0]).name}", file=sys.stderr,
                   disable=not progress, dynamic_ncols=True)
        for docs, nbytes in bar:
            for i, ids in enumerate(docs):
                builders[i].add_document(ids, [len(ids)] if len(ids) else [])
                num_tokens[i] += len(ids)
            num_docs += 1
            num_bytes += nbytes
            if max_bytes is not None and num_bytes >= max_bytes:
                break
        bar.close()
        if num_docs == 0:
            raise ConfigError(f"the inputs ({len(files)} file(s), e.g. {str(files[0])!r}) hold "
                              f"no documents (only blank text); pass files with text in them")
        metas = {}
        for i, (prefix, tmp) in enumerate(zip(prefixes, tmps)):
            builders[i].finalize(tmp["idx"])
            metas[prefix] = {
                "format": SIDECAR_FORMAT,
                **tokenizer_metadata(tok),
                "dtype": np.dtype(dtype).name,
                "num_documents": num_docs,
                "num_tokens": num_tokens[i],
                "num_bytes": num_bytes,
                # Integrity: checked against the .idx / .bin at load time (integrity.py).
                "bin_bytes": os.path.getsize(tmp["bin"]),
                "idx_sha256": file_sha256(tmp["idx"]),
                "documents": {"split": spec.split, "json_key": spec.json_keys[i],
                              "formats": sorted({format_of(f) for f in files})},
                "sources": {
                    "count": len(files),
                    "first": [str(f) for f in files[:_SOURCES_LISTED]],
                    "default_corpus": default_corpus,
                    "max_bytes": max_bytes,
                    **({"python": platform.python_version()} if default_corpus else {}),
                },
                "megatron_mohge_version": __version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"),
            }
            Path(tmp["json"]).write_text(json.dumps(metas[prefix], indent=1) + "\n",
                                         encoding="utf-8")
        for final, tmp in zip(finals, tmps):
            # A stale sidecar must not vouch for a half-replaced pair: drop it first, write last.
            _remove_quietly([final["json"]])
            os.replace(tmp["bin"], final["bin"])
            os.replace(tmp["idx"], final["idx"])
            os.replace(tmp["json"], final["json"])
    except BaseException:
        for b in builders:
            if not b.data_file.closed:
                b.data_file.close()
        for tmp in tmps:
            _remove_quietly(tmp.values())
        raise
    return metas


# --- reading back / checking -------------------------------------------------------------

def read_metadata(prefix: Union[str, Path]) -> Optional[dict]:
    """The sidecar of dataset ``prefix``; None for datasets without one (Megatron-LM's).

    Raises ConfigError when the ``.bin``/``.idx`` pair itself is missing.
    """
    prefix = normalize_prefix(prefix)
    paths = _paths(prefix)
    missing = [paths[k] for k in ("bin", "idx") if not os.path.isfile(paths[k])]
    if missing and os.path.exists(prefix):  # e.g. data.path: [docs.jsonl]
        raise ConfigError(
            f"dataset {prefix!r} is an input {'folder' if os.path.isdir(prefix) else 'file'}, "
            f"not a prepared dataset: tokenize it first with `mohge-prepare-data {prefix} "
            f"--output-prefix data/NAME` and use data/NAME (mohge-bench --data takes input "
            f"files directly)")
    if missing:
        raise ConfigError(
            f"dataset {prefix!r} not found: missing {' and '.join(missing)}. Prepare it with "
            f"`mohge-prepare-data [INPUT ...] --output-prefix {prefix}` (no INPUT: the stdlib "
            f"corpus), or pass the prefix of an existing .bin/.idx pair")
    if not os.path.isfile(paths["json"]):
        return None
    try:
        meta = json.loads(Path(paths["json"]).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"dataset sidecar {paths['json']!r} is not readable JSON ({err}); "
                          f"re-run mohge-prepare-data for {prefix!r} or delete the sidecar "
                          f"to skip the tokenizer check") from err
    if not isinstance(meta, dict) or "vocab_size" not in meta or "eod" not in meta:
        raise ConfigError(f"dataset sidecar {paths['json']!r} lacks 'vocab_size'/'eod'; re-run "
                          f"mohge-prepare-data for {prefix!r} or delete the sidecar")
    return meta


def _max_token_id(prefix: str) -> Optional[int]:
    """Largest token id in the .bin (None if too large to scan quickly)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if os.path.getsize(prefix + ".bin") > 2**30:
        return None
    ds = IndexedDataset(prefix, mmap=True)
    data = np.memmap(prefix + ".bin", dtype=ds.index.dtype, mode="r")
    return int(data.max()) if data.size else None


def check_dataset(prefix: Union[str, Path], tokenizer: Union[str, Tokenizer]) -> Optional[dict]:
    """Check dataset ``prefix`` exists and was prepared with ``tokenizer``; return its sidecar.

    Datasets without a sidecar (prepared by Megatron-LM's tools) are accepted with a
    warning, after checking that no token id exceeds the tokenizer's vocab when the file is
    small enough to scan.
    """
    tok = load_tokenizer(tokenizer)
    prefix = normalize_prefix(prefix)
    meta = read_metadata(prefix)
    verify_dataset_files(prefix, meta)
    if meta is None:
        top = _max_token_id(prefix)
        if top is not None and top >= tok.vocab_size:
            raise ConfigError(
                f"dataset {prefix!r} holds token id {top}, beyond the vocab of the training "
                f"tokenizer {describe(tok)}: it was prepared with another tokenizer; set the "
                f"training tokenizer to that one or re-run mohge-prepare-data --tokenizer "
                f"{tok.spec} --output-prefix {prefix}")
        warnings.warn(f"dataset {prefix!r} has no {prefix}.json sidecar (not prepared by "
                      f"mohge-prepare-data), so its tokenizer cannot be checked against "
                      f"{describe(tok)}; make sure they match", stacklevel=2)
        return None
    differ = []
    if int(meta["vocab_size"]) != tok.vocab_size:
        differ.append(f"vocab_size {meta['vocab_size']} vs {tok.vocab_size}")
    if int(meta["eod"]) != tok.eod:
        differ.append(f"eod {meta['eod']} vs {tok.eod}")
    fp = meta.get("tokenizer_fingerprint")
    if fp is not None and fp != tok.fingerprint:
        differ.append(f"tokenizer content {fp} vs {tok.fingerprint}")
    if differ:
        raise ConfigError(
            f"dataset {prefix!r} was prepared with tokenizer {meta.get('tokenizer')!r} but "
            f"training uses {describe(tok)} ({'; '.join(differ)}). Use the dataset's tokenizer "
            f"({meta.get('tokenizer')!r}) for training, or re-prepare the data: "
            f"mohge-prepare-data ... --tokenizer {tok.spec} --output-prefix {prefix}")
    return meta


def _is_complete(prefix: str) -> bool:
    # The sidecar is renamed into place last, so its presence marks a finished run.
    return all(os.path.isfile(p) for p in _paths(prefix).values())


def default_dataset_prefix(cache_dir: Union[str, Path], tokenizer: Union[str, Tokenizer],
                           max_bytes: Optional[int] = DEFAULT_CORPUS_MAX_BYTES) -> str:
    """Prefix under ``cache_dir`` of the stdlib corpus for this Python, tokenizer and size."""
    tok = load_tokenizer(tokenizer)
    size = "all" if max_bytes is None else f"{int(max_bytes)}B"
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    return os.path.join(os.path.abspath(os.fspath(cache_dir)), f"stdlib-{py}-{tok.name}-{size}")


def ensure_default_dataset(cache_dir: Union[str, Path], tokenizer: Union[str, Tokenizer],
                           max_bytes: Optional[int] = DEFAULT_CORPUS_MAX_BYTES, *,
                           progress: bool = True) -> str:
    """Prefix of the stdlib corpus tokenized with ``tokenizer``, prepared once in ``cache_dir``.

    Under ``torch.distributed`` every rank must call this: global rank 0 prepares (if
    needed), the others wait for it. ``cache_dir`` must be visible to all ranks.
    """
    tok = load_tokenizer(tokenizer)
    prefix = default_dataset_prefix(cache_dir, tok, max_bytes)

    def build() -> None:
        if not _is_complete(prefix):
            prepare_data(None, prefix, tok, max_bytes=max_bytes, progress=progress)

    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        build()
        return prefix
    rank = dist.get_rank()
    failure: Optional[BaseException] = None
    if rank == 0:
        try:
            build()
        except Exception as err:  # reported to every rank below, then re-raised here
            failure = err
    # A broadcast instead of a bare barrier: it also tells the waiting ranks whether rank 0
    # failed, so they raise instead of hanging or reading a missing dataset.
    status = [None if failure is None else f"{type(failure).__name__}: {failure}"]
    dist.broadcast_object_list(status, src=0)
    if failure is not None:
        raise failure
    if status[0] is not None:
        raise ConfigError(f"rank 0 failed to prepare the default dataset {prefix!r}: {status[0]}")
    if not _is_complete(prefix):
        raise ConfigError(f"rank 0 prepared {prefix!r} but rank {rank} cannot see it; the data "
                          f"cache folder {os.fspath(cache_dir)!r} must be on a file system "
                          f"shared by all ranks")
    return prefix


__all__ = ["prepare_data", "prepare_datasets", "output_prefixes", "iter_texts", "read_metadata",
           "check_dataset", "ensure_default_dataset",
           "default_dataset_prefix", "normalize_prefix", "DEFAULT_CORPUS_MAX_BYTES"]
