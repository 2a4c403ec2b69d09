"""Finding the text files to tokenize: user inputs, or the default stdlib corpus.

The default corpus is the Python standard library's own ``.py`` sources: real, varied text
that exists on every machine that can run this package, so examples and smoke trainings
need no download. It differs between Python versions; callers that cache it key the cache
on the version (see ``prepare.ensure_default_dataset``).
"""

from __future__ import annotations

import codecs
import os
import sysconfig
import warnings
from pathlib import Path
from typing import Iterable, Optional, Union

from megatron_mohge.config import ConfigError
from megatron_mohge.data.formats import compression_of, format_of

# Folders of the stdlib that are not "library text": regression tests (huge, repetitive
# data files), the IDLE app, and third-party packages installed into the base interpreter.
STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idlelib", "site-packages", "dist-packages",
                              "__pycache__"})
# How much of a file is sniffed for binary content (git uses the same 8 KiB heuristic).
SNIFF_BYTES = 8192


def stdlib_dir() -> Path:
    """Folder of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def _is_utf8_file(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
    except (UnicodeDecodeError, OSError):
        return False
    return True


def default_corpus_files(max_bytes: Optional[int] = None) -> list[Path]:
    """The stdlib's ``.py`` files in sorted (deterministic) order, until ``max_bytes``.

    Files are added while the running total is below ``max_bytes``, so the last one may
    overshoot it and the result is never empty for ``max_bytes > 0``. Empty files and files
    that are not valid UTF-8 are skipped.
    """
    if max_bytes is not None and max_bytes <= 0:
        raise ConfigError(f"max_bytes={max_bytes} must be positive (or None for the whole "
                          f"default corpus)")
    root = stdlib_dir()
    if not root.is_dir():
        raise ConfigError(f"the Python standard library folder {str(root)!r} (from sysconfig) "
                          f"does not exist, so there is no default corpus; pass input files")
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames
                       if d not in STDLIB_SKIP_DIRS and not d.startswith(".")]
        for f in filenames:
            if f.endswith(".py") and not f.startswith("."):
                p = Path(dirpath) / f
                found.append((p.relative_to(root).as_posix(), p))
    # Sort by relative path so the order does not depend on the file system's walk order.
    found.sort(key=lambda t: t[0])
    out: list[Path] = []
    total = 0
    for _, p in found:
        if max_bytes is not None and total >= max_bytes:
            break
        size = p.stat().st_size
        if size == 0 or not _is_utf8_file(p):
            continue
        out.append(p)
        total += size
    if not out:
        raise ConfigError(f"no usable .py files found under {str(root)!r}; pass input files")
    return out


def _iter_folder(folder: Path) -> Iterable[Path]:
    """Files under ``folder``, recursively, sorted, skipping hidden files and folders."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith("."):
                yield Path(dirpath) / f


def check_text_file(path: Path) -> None:
    """Raise ConfigError if ``path`` looks binary (NUL byte or invalid UTF-8 at its start)."""
    with open(path, "rb") as fh:
        head = fh.read(SNIFF_BYTES)
    bad = b"\x00" in head
    if not bad:
        try:
            # Incremental decode: a multi-byte character cut at 8 KiB is not an error,
            # but a truncated one at the real end of a short file is.
            codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) < SNIFF_BYTES)
        except UnicodeDecodeError:
            bad = True
    if bad:
        raise ConfigError(f"input file {str(path)!r} looks binary (NUL byte or invalid UTF-8 "
                          f"in its first {SNIFF_BYTES // 1024} KiB); only UTF-8 text can be "
                          f"tokenized: remove it from the inputs or pass the text files only")


def collect_text_files(inputs: Iterable[Union[str, Path]]) -> list[Path]:
    """Expand files and folders into a de-duplicated list of input files.

    Order: inputs as given, folders expanded recursively in sorted order (hidden files and
    folders skipped). Every file name is accepted: ``.parquet`` and compressed files
    (``.gz``/``.bz2``/``.xz``/``.zst``) are read by format (``formats.py``), any other file
    (``.txt``, ``.rst.txt``, ``.md``, ``.py``, ``.jsonl`` ...) must look like UTF-8 text.
    Empty files are skipped with a warning; binary files are an error rather than silently
    dropped, because a wrong folder would otherwise quietly train on junk.
    """
    inputs = list(inputs)
    if not inputs:
        raise ConfigError("no input files given; pass text files or folders (or none at all "
                          "on the command line to use the default stdlib corpus)")
    files: list[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found = list(_iter_folder(p))
            if not found:
                raise ConfigError(f"input folder {str(item)!r} contains no (non-hidden) files; "
                                  f"remove it from the inputs or add text files to it")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(f"input path {str(item)!r} does not exist; check the spelling "
                              f"or remove it from the inputs")
    seen: set[Path] = set()
    unique: list[Path] = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    non_empty = [f for f in unique if f.stat().st_size > 0]
    if not non_empty:
        raise ConfigError(f"all {len(unique)} input file(s) are empty (0 bytes), e.g. "
                          f"{str(unique[0])!r}; pass files with text in them")
    if len(non_empty) < len(unique):
        empty = [str(f) for f in unique if f.stat().st_size == 0]
        warnings.warn(f"skipping {len(empty)} empty input file(s): {', '.join(empty[:5])}"
                      f"{' ...' if len(empty) > 5 else ''}", stacklevel=2)
    for f in non_empty:
        if format_of(f) != "parquet" and not compression_of(f):  # the others are binary
            check_text_file(f)
    return non_empty


__all__ = ["default_corpus_files", "collect_text_files", "check_text_file",
           "stdlib_dir"]
