"""Documents out of input files: JSON lines, Parquet and plain text, optionally compressed.

The format is chosen by the file name, after stripping a compression suffix:

* ``.jsonl`` / ``.json`` / ``.ndjson``: one JSON object per line, the document is the string
  under each of ``json_keys`` (default ``text``) -- what Megatron-LM's
  ``tools/preprocess_data.py --json-keys`` reads ("loose JSON"). Blank lines are skipped; a
  ``.json`` file holding one JSON array of objects is read too.
* ``.parquet``: one row per document, ``json_keys`` name the string columns (needs
  ``pyarrow``, the ``[data]`` extra).
* anything else: UTF-8 text, cut into documents by ``split``: ``blank-line`` (the default:
  paragraphs separated by one or more blank lines, so one big text file gives many
  documents), ``line`` (every non-blank line) or ``file`` (the whole file).

``.gz``, ``.bz2`` and ``.xz`` are read with the standard library, ``.zst`` with the
``zstandard`` package (``[data]`` extra). Every error names the file (and line) and the fix.
"""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator, Sequence

from megatron_mohge.config import ConfigError

SPLIT_RULES = ("blank-line", "line", "file")
# Default for plain text: paragraphs, so a corpus that is one big file still has enough
# documents for a train/validation split (one document per file would leave it with one).
DEFAULT_SPLIT = "blank-line"
DEFAULT_JSON_KEYS = ("text",)  # Megatron-LM's preprocess_data.py default
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")
_PARQUET_BATCH_ROWS = 1024


@dataclass(frozen=True)
class DocumentSpec:
    """How input files become documents (one per JSON line / Parquet row / text piece)."""

    split: str = DEFAULT_SPLIT  # plain text only: blank-line | line | file
    json_keys: tuple[str, ...] = DEFAULT_JSON_KEYS  # JSON / Parquet: one dataset per key

    def __post_init__(self) -> None:
        if self.split not in SPLIT_RULES:
            raise ConfigError(f"--split-documents {self.split!r} is not one of "
                              f"{', '.join(SPLIT_RULES)}")
        keys = tuple(self.json_keys)
        if not keys or any(not isinstance(k, str) or not k for k in keys):
            raise ConfigError(f"--json-keys {list(keys)!r}: give one or more non-empty key names, "
                              f"e.g. --json-keys text")
        if len(set(keys)) != len(keys):
            raise ConfigError(f"--json-keys {list(keys)!r} names a key twice")
        object.__setattr__(self, "json_keys", keys)


def compression_of(path: Path) -> str:
    """The compression suffix of ``path`` (``.gz`` ...) or ``""``."""
    suffix = path.suffix.lower()
    return suffix if suffix in COMPRESSION_SUFFIXES else ""


def format_of(path: Path) -> str:
    """``json``, ``parquet`` or ``text``, from the file name (compression suffix ignored)."""
    name = path.name.lower()
    comp = compression_of(path)
    if comp:
        name = name[: -len(comp)]
    if name.endswith(JSON_SUFFIXES):
        return "json"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return "text"


def _open_zstd(path: Path) -> IO[bytes]:
    try:
        import zstandard
    except ImportError:
        raise ConfigError(f"input file {str(path)!r} is zstd-compressed, which needs the "
                          f"'zstandard' package: pip install 'megatron-mohge[data]' (or "
                          f"decompress it: zstd -d {path.name})") from None
    return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)


def open_binary(path: Path) -> IO[bytes]:
    """``path`` opened for reading bytes, decompressed according to its suffix."""
    comp = compression_of(path)
    if comp == ".zst":
        return _open_zstd(path)
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(comp, open)
    return opener(path, "rb")


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """``(line number, line with its newline)`` of a UTF-8 (possibly compressed) file."""
    lineno = 0
    try:
        with open_binary(path) as raw:
            # newline="": keep "\r\n" as written, so documents are the file's exact text.
            text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
            for lineno, line in enumerate(text, start=1):
                yield lineno, line
    except UnicodeDecodeError:
        raise ConfigError(f"input file {str(path)!r} is not valid UTF-8 (near line {lineno + 1})"
                          f"; remove it from the inputs or convert it to UTF-8") from None
    except (OSError, EOFError, lzma.LZMAError) as err:
        raise ConfigError(f"cannot read input file {str(path)!r} ({err}); is it a complete "
                          f"{compression_of(path) or 'text'} file?") from None


def _text_documents(path: Path, split: str) -> Iterator[tuple[str, ...]]:
    if split == "file":
        doc = "".join(line for _, line in _lines(path))
        if doc.strip():
            yield (doc,)
        return
    para: list[str] = []
    for _, line in _lines(path):
        if not line.strip():
            if para:
                yield ("".join(para).rstrip("\r\n"),)
                para = []
        elif split == "line":
            yield (line.rstrip("\r\n"),)
        else:
            para.append(line)
    if para:
        yield ("".join(para).rstrip("\r\n"),)


def _pick(obj, keys: Sequence[str], where: str) -> tuple[str, ...]:
    if not isinstance(obj, dict):
        raise ConfigError(f"{where}: expected a JSON object with key(s) "
                          f"{', '.join(map(repr, keys))}, got {type(obj).__name__}")
    out = []
    for key in keys:
        if key not in obj:
            have = ", ".join(map(repr, list(obj)[:10])) or "none"
            raise ConfigError(f"{where}: no key {key!r} (keys: {have}); choose the text field "
                              f"with --json-keys")
        value = obj[key]
        if not isinstance(value, str):
            raise ConfigError(f"{where}: key {key!r} holds {type(value).__name__}, not a "
                              f"string; choose a text field with --json-keys")
        out.append(value)
    return tuple(out)


def _json_documents(path: Path, keys: Sequence[str]) -> Iterator[tuple[str, ...]]:
    lines = _lines(path)
    first = True
    for lineno, line in lines:
        if not line.strip():
            continue
        if first and line.lstrip().startswith("["):  # one JSON array: parse the whole file
            rest = line + "".join(l for _, l in lines)
            try:
                items = json.loads(rest)
            except ValueError as err:
                raise ConfigError(f"{path}: not valid JSON ({err}); use one JSON object per "
                                  f"line (JSON lines) or one JSON array of objects") from None
            if not isinstance(items, list):
                raise ConfigError(f"{path}: expected JSON lines or an array of objects")
            for i, obj in enumerate(items):
                yield _pick(obj, keys, f"{path} item {i}")
            return
        first = False
        try:
            obj = json.loads(line)
        except ValueError as err:
            raise ConfigError(f"{path}:{lineno}: not valid JSON ({err}); each line must be one "
                              f"JSON object such as {{\"text\": \"...\"}}") from None
        yield _pick(obj, keys, f"{path}:{lineno}")


def _parquet_documents(path: Path, keys: Sequence[str]) -> Iterator[tuple[str, ...]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"input file {str(path)!r} is Parquet, which needs pyarrow: pip "
                          f"install 'megatron-mohge[data]' (or convert it to JSON lines)") from None
    try:
        if compression_of(path):  # Parquet needs random access: decompress into memory
            with open_binary(path) as fh:
                pf = pq.ParquetFile(io.BytesIO(fh.read()))
        else:
            pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own ArrowInvalid / OSError types
        raise ConfigError(f"cannot read Parquet file {str(path)!r}: {err}") from None
    names = pf.schema_arrow.names
    missing = [k for k in keys if k not in names]
    if missing:
        raise ConfigError(f"{path}: no column {missing[0]!r} (columns: "
                          f"{', '.join(map(repr, names[:10]))}); choose the text column with "
                          f"--json-keys")
    row = 0
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=list(keys)):
        columns = [batch.column(k).to_pylist() for k in keys]
        for values in zip(*columns):
            for key, value in zip(keys, values):
                if not isinstance(value, str):
                    raise ConfigError(f"{path} row {row}: column {key!r} holds "
                                      f"{type(value).__name__}, not a string; choose a text "
                                      f"column with --json-keys")
            row += 1
            yield tuple(values)


def iter_documents(path: Path, spec: DocumentSpec) -> Iterator[tuple[str, ...]]:
    """Documents of one input file; each a tuple with one text per ``spec.json_keys`` entry
    (plain text files: a 1-tuple, so they need a single key)."""
    fmt = format_of(path)
    if fmt == "json":
        yield from _json_documents(path, spec.json_keys)
    elif fmt == "parquet":
        yield from _parquet_documents(path, spec.json_keys)
    else:
        if len(spec.json_keys) > 1:
            raise ConfigError(f"input file {str(path)!r} is plain text, which has one text per "
                              f"document, but --json-keys names {len(spec.json_keys)} keys; "
                              f"pass JSON lines / Parquet inputs or a single key")
        yield from _text_documents(path, spec.split)


__all__ = ["DocumentSpec", "iter_documents", "format_of", "compression_of", "open_binary",
           "SPLIT_RULES", "DEFAULT_SPLIT", "DEFAULT_JSON_KEYS"]
