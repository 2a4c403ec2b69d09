"""Do a dataset's ``.bin``, ``.idx`` and sidecar ``.json`` belong together? And a content key.

megatron-core trusts the pair: a truncated ``.bin`` fails at the first sample that reaches
past its end (a numpy error naming no file), and an ``.idx`` of another dataset trains on
garbage boundaries silently. Its sample-index cache is named by the dataset *path*, so data
re-prepared at the same prefix reuses indices built for the old documents (wrong split, or an
``IndexError``). Here the ``.idx`` header is read directly (``MMIDIDX`` v1, the layout of
megatron-core's ``indexed_dataset._IndexWriter``), checked against the ``.bin`` size and the
sidecar, and hashed: the hash is the key under which sample indices are cached.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from typing import Optional

import numpy as np

from megatron_mohge.config import ConfigError

_INDEX_HEADER = b"MMIDIDX\x00\x00"  # megatron-core indexed_dataset._INDEX_HEADER
_HEADER_BYTES = 9 + 8 + 1 + 8 + 8  # header, version, dtype code, #sequences, #documents
_HASH_CHUNK = 1 << 20


@dataclass(frozen=True)
class IndexSummary:
    """What an ``.idx`` says about its ``.bin``."""

    dtype: str  # numpy name of the token dtype
    num_sequences: int
    num_documents: int  # megatron-core's document_indices has one more entry than documents
    num_tokens: int
    bin_bytes: int  # the .bin size the index implies
    sha256: str  # of the whole .idx file


def _refresh(prefix: str) -> str:
    return (f"re-run mohge-prepare-data for it (--output-prefix {prefix}) or point data.path / "
            f"--data at the right files")


def read_index(prefix: str) -> IndexSummary:
    """Parse and hash ``prefix.idx``; ConfigError naming the file when it is not a valid one."""
    from megatron.core.datasets.indexed_dataset import DType

    path = prefix + ".idx"
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except OSError as err:
        raise ConfigError(f"cannot read dataset index {path!r} ({err}); {_refresh(prefix)}") \
            from None
    bad = f"dataset index {path!r} is not a Megatron .idx file"
    if len(raw) < _HEADER_BYTES or raw[:9] != _INDEX_HEADER:
        raise ConfigError(f"{bad} (no MMIDIDX header); {_refresh(prefix)}")
    version, code, n_seq, n_doc = struct.unpack_from("<QBQQ", raw, 9)
    try:
        dtype = np.dtype(DType.dtype_from_code(code))
    except (KeyError, ValueError):
        dtype = None
    need = _HEADER_BYTES + n_seq * (4 + 8) + n_doc * 8
    if version != 1 or dtype is None or len(raw) < need:
        raise ConfigError(f"{bad} (version {version}, dtype code {code}, {len(raw)} bytes for "
                          f"{n_seq} sequences; truncated?); {_refresh(prefix)}")
    lengths = np.frombuffer(raw, dtype=np.int32, count=n_seq, offset=_HEADER_BYTES)
    num_tokens = int(lengths.sum(dtype=np.int64))
    return IndexSummary(dtype=dtype.name, num_sequences=int(n_seq),
                        num_documents=max(int(n_doc) - 1, 0), num_tokens=num_tokens,
                        bin_bytes=num_tokens * dtype.itemsize,
                        sha256=hashlib.sha256(raw).hexdigest())


def verify_dataset_files(prefix: str, meta: Optional[dict]) -> IndexSummary:
    """Check ``prefix.bin`` against ``prefix.idx``, and both against the sidecar ``meta``
    (None for datasets without one, e.g. from Megatron-LM's tools). Returns the index summary.
    """
    index = read_index(prefix)
    bin_path = prefix + ".bin"
    size = os.path.getsize(bin_path)
    if size != index.bin_bytes:
        what = "truncated" if size < index.bin_bytes else "longer than its index"
        raise ConfigError(f"dataset file {bin_path!r} has {size} bytes but {prefix}.idx "
                          f"describes {index.bin_bytes} ({index.num_tokens} {index.dtype} "
                          f"tokens): the .bin is {what} or the two files come from different "
                          f"datasets; {_refresh(prefix)}")
    if meta is None:
        return index
    differ = []
    if meta.get("idx_sha256") not in (None, index.sha256):
        differ.append("content hash")
    for key in ("dtype", "num_tokens", "bin_bytes"):
        if key in meta and meta[key] != getattr(index, key):
            differ.append(f"{key} {meta[key]} vs {getattr(index, key)}")
    if differ:
        raise ConfigError(f"dataset sidecar {prefix + '.json'!r} does not describe {prefix}.idx/"
                          f".bin ({'; '.join(differ)}): the files come from different "
                          f"preparations; {_refresh(prefix)}")
    return index


def content_key(summaries: list[IndexSummary]) -> str:
    """Short key of the datasets' contents (their .idx hashes, in order): sample indices
    built by megatron-core depend only on the sequence lengths the .idx files hold."""
    h = hashlib.sha256()
    for s in summaries:
        h.update(s.sha256.encode())
    return h.hexdigest()[:16]


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


__all__ = ["IndexSummary", "read_index", "verify_dataset_files", "content_key", "file_sha256"]
