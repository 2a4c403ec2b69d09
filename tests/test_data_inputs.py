"""Input formats (JSON lines, Parquet, split plain text, compressed) and dataset integrity.

Each case here reproduced a failure of issue 12 before the fix: JSONL tokenized as raw JSON,
one big text file giving one document (no train/validation split), a sample-index cache
reused after re-preparing data at the same prefix, a truncated ``.bin`` / foreign ``.idx``
not caught.
"""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from megatron_mohge import ConfigError
from megatron_mohge.cli.prepare_data import main as prepare_main
from megatron_mohge.data import build_gpt_datasets, check_dataset, collect_text_files, prepare_data
from megatron_mohge.data.formats import DocumentSpec, format_of, iter_documents
from megatron_mohge.data.prepare import prepare_datasets

DOCS = [
    {"text": "First document.\nWith \"quotes\" and a second line.", "title": "one"},
    {"text": "Ünïcødé → ✓ 漢字", "title": "two"},
    {"text": "", "title": "empty text"},  # preprocess_data.py: an empty document, no eod
    {"text": "x" * 300, "title": "four"},
]


def write_jsonl(path: Path, docs=DOCS) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in docs) + "\n", encoding="utf-8")
    return path


def read_back(prefix) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix), mmap=True)
    out = [ds[i].tolist() for i in range(len(ds))]
    del ds
    return out


def byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8")) + [256]


def prose(n_paragraphs: int) -> str:
    """Paragraphs of varied text, blank-line separated (one big text file)."""
    words = "mixture heterogeneous grouped experts route tokens narrow wide cheap strong".split()
    paras = [" ".join(words[(i * 7 + j) % len(words)] for j in range(20 + i % 13)) + "."
             for i in range(n_paragraphs)]
    return "\n\n".join(paras) + "\n"


# --- JSON lines --------------------------------------------------------------------------

def test_jsonl_is_one_document_per_line(tmp_path):
    # Before: the whole file (JSON syntax and escapes included) became one document.
    src = write_jsonl(tmp_path / "docs.jsonl")
    meta = prepare_data([src], tmp_path / "ds", "byte", progress=False)
    non_empty = [d["text"] for d in DOCS if d["text"]]
    assert read_back(tmp_path / "ds") == [byte_ids(t) for t in non_empty]
    assert meta["num_documents"] == len(DOCS)  # the empty one is an empty document
    assert meta["documents"]["json_key"] == "text"


def test_jsonl_several_keys_give_several_datasets(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl")
    metas = prepare_datasets([src], tmp_path / "ds", "byte", progress=False,
                             json_keys=("text", "title"))
    assert list(metas) == [str(tmp_path / "ds_text"), str(tmp_path / "ds_title")]
    assert read_back(tmp_path / "ds_title") == [byte_ids(d["title"]) for d in DOCS]
    assert prepare_main([str(src), "--json-keys", "text", "title", "--output-prefix",
                         str(tmp_path / "cli"), "--no-progress"]) == 0
    assert read_back(tmp_path / "cli_title") == read_back(tmp_path / "ds_title")


def test_json_array_file(tmp_path):
    src = tmp_path / "docs.json"
    src.write_text(json.dumps(DOCS), encoding="utf-8")
    prepare_data([src], tmp_path / "ds", "byte", progress=False)
    assert read_back(tmp_path / "ds") == [byte_ids(d["text"]) for d in DOCS if d["text"]]


@pytest.mark.parametrize("lines, match", [
    (['{"text": "ok"}', '{"text": "unterminated'], r"docs.jsonl:2: not valid JSON"),
    (['{"text": "ok"}', '', '{"body": "no text key"}'], r"docs.jsonl:3: no key 'text' "
                                                        r"\(keys: 'body'\).*--json-keys"),
    (['{"text": 5}'], r"docs.jsonl:1: key 'text' holds int, not a string"),
    (['["a list"]', '{"text": "x"}'], r"not valid JSON|expected a JSON object"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, lines, match, capsys):
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=match):
        prepare_data([src], tmp_path / "ds", "byte", progress=False)
    assert not list(tmp_path.glob("ds*"))  # nothing half-written
    assert prepare_main([str(src), "--output-prefix", str(tmp_path / "ds"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mohge-prepare-data: error: ") and "docs.jsonl" in err[-1]


# --- byte tokenizer output = Megatron-LM preprocess_data.py ------------------------------

def test_byte_output_identical_to_megatron_builder(tmp_path):
    """The .bin/.idx bytes equal those of megatron-core's IndexedDatasetBuilder driven the way
    Megatron-LM's tools/preprocess_data.py drives it (Encoder.encode + add_document) for the
    same documents, tokenized as UTF-8 bytes with eod 256 (NullTokenizer's layout)."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    ref = str(tmp_path / "ref")
    builder = IndexedDatasetBuilder(ref + ".bin", dtype=DType.optimal_dtype(257))
    for d in DOCS:  # preprocess_data.py: ids of the text, eod appended if there are any
        ids = list(d["text"].encode("utf-8"))
        if ids:
            ids.append(256)
        builder.add_document(ids, [len(ids)] if ids else [])
    builder.finalize(ref + ".idx")

    prepare_data([write_jsonl(tmp_path / "docs.jsonl")], tmp_path / "ours", "byte",
                 progress=False)
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"ours{ext}").read_bytes() == Path(ref + ext).read_bytes()


# --- plain text --------------------------------------------------------------------------

TEXT = "para one line 1\npara one line 2\n\n\n  \npara two\r\nstill two\r\n\nlast line"


@pytest.mark.parametrize("split, docs", [
    ("blank-line", ["para one line 1\npara one line 2", "para two\r\nstill two", "last line"]),
    ("line", ["para one line 1", "para one line 2", "para two", "still two", "last line"]),
    ("file", [TEXT]),
])
def test_text_split_rules(tmp_path, split, docs):
    src = tmp_path / "book.txt"
    src.write_bytes(TEXT.encode("utf-8"))
    assert [d[0] for d in iter_documents(src, DocumentSpec(split=split))] == docs
    prepare_data([src], tmp_path / split, "byte", progress=False, split=split)
    assert read_back(tmp_path / split) == [byte_ids(d) for d in docs]


def test_default_split_is_blank_line():
    assert DocumentSpec().split == "blank-line"
    with pytest.raises(ConfigError, match="--split-documents 'para' is not one of"):
        DocumentSpec(split="para")


def test_one_big_text_file_trains_without_flags(tmp_path):
    # Before: one file = one document, so the validation split had 0 tokens and every run
    # failed ("documents 1..1 of 1 has 0 tokens").
    src = tmp_path / "corpus.txt"
    src.write_text(prose(400), encoding="utf-8")
    meta = prepare_data([src], tmp_path / "corpus", "byte", progress=False)
    assert meta["num_documents"] == 400
    train, valid = build_gpt_datasets(tmp_path / "corpus", "byte", seq_length=64, seed=1,
                                      train_samples=20, valid_samples=2,
                                      cache_dir=tmp_path / "idx")
    assert len(train) >= 20 and len(valid) >= 2


def _one_sentence_per_line(path: Path, lines: int = 2000) -> Path:
    path.write_text("".join(f"Sentence {i} of a corpus without any blank line in it.\n"
                            for i in range(lines)), encoding="utf-8")
    return path


def test_text_without_blank_lines_is_cut_by_line_in_the_bench(tmp_path):
    """Issue 25.5: one sentence per line and no blank lines was one document, so
    ``mohge-bench --data corpus.txt`` stopped ("the validation split ... has 0 tokens"); the
    bench now cuts it by line, saying so, and the split error names --split-documents line."""
    from megatron_mohge.bench.e2e import resolve_data
    from megatron_mohge.data.datasets import check_split_sizes
    from megatron_mohge.data.prepare import read_metadata

    src = _one_sentence_per_line(tmp_path / "corpus.txt")
    said = []
    prefix, = resolve_data([str(src)], "byte", tmp_path / "bench", said.append,
                           splits={("949,50,1", 64)})
    notes = [s for s in said if s.startswith("note:")]
    assert len(notes) == 1 and "--split-documents line" in notes[0] and "\n" not in notes[0]
    assert read_metadata(prefix)["num_documents"] == 2000
    check_split_sizes(prefix, "949,50,1", 64)
    # an explicit --split-documents is kept; the split error then names the fix
    said.clear()
    prefix, = resolve_data([str(src)], "byte", tmp_path / "kept", said.append,
                           split_documents="blank-line", splits={("949,50,1", 64)})
    assert read_metadata(prefix)["num_documents"] == 1
    assert not [s for s in said if s.startswith("note:")]
    with pytest.raises(ConfigError, match=r"has 0 tokens.*cut into 1 document\(s\) at blank "
                                          r"lines.*prepare it with --split-documents line"):
        check_split_sizes(prefix, "949,50,1", 64)


def test_folder_walk_takes_rst_txt_and_any_text_name(tmp_path):
    # /usr/share/doc/python3.11/html/_sources holds *.rst.txt files: plain text, picked up.
    (tmp_path / "docs" / "library").mkdir(parents=True)
    (tmp_path / "docs" / "library" / "json.rst.txt").write_text("JSON\n====\n\nText.\n")
    (tmp_path / "docs" / "index.rst.txt").write_text("Index\n")
    (tmp_path / "docs" / "notes").write_text("no suffix at all\n")
    files = collect_text_files([tmp_path / "docs"])
    assert [f.name for f in files] == ["index.rst.txt", "notes", "json.rst.txt"]
    assert {format_of(f) for f in files} == {"text"}
    assert format_of(Path("a.jsonl.gz")) == "json" and format_of(Path("a.PARQUET")) == "parquet"


# --- compressed inputs and Parquet -------------------------------------------------------

@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".xz", ".zst"])
def test_compressed_inputs_read_like_plain(tmp_path, suffix):
    raw = write_jsonl(tmp_path / "docs.jsonl").read_bytes()
    if suffix == ".zst":
        zstandard = pytest.importorskip("zstandard")
        packed = zstandard.ZstdCompressor().compress(raw)
    else:
        packed = {".gz": gzip, ".bz2": bz2, ".xz": lzma}[suffix].compress(raw)
    (tmp_path / f"docs.jsonl{suffix}").write_bytes(packed)
    prepare_data([tmp_path / "docs.jsonl"], tmp_path / "plain", "byte", progress=False)
    prepare_data([tmp_path / f"docs.jsonl{suffix}"], tmp_path / "packed", "byte", progress=False)
    assert (tmp_path / "packed.bin").read_bytes() == (tmp_path / "plain.bin").read_bytes()


def test_truncated_gzip_is_named(tmp_path):
    (tmp_path / "t.txt.gz").write_bytes(gzip.compress(prose(50).encode())[:-20])
    with pytest.raises(ConfigError, match=r"cannot read input file .*t.txt.gz"):
        prepare_data([tmp_path / "t.txt.gz"], tmp_path / "ds", "byte", progress=False)


def test_parquet_columns(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"text": [d["text"] for d in DOCS], "title": [d["title"] for d in DOCS],
                      "n": list(range(len(DOCS)))})
    pq.write_table(table, tmp_path / "docs.parquet", row_group_size=2)
    prepare_data([tmp_path / "docs.parquet"], tmp_path / "pq", "byte", progress=False)
    prepare_data([write_jsonl(tmp_path / "docs.jsonl")], tmp_path / "js", "byte", progress=False)
    assert (tmp_path / "pq.bin").read_bytes() == (tmp_path / "js.bin").read_bytes()
    with pytest.raises(ConfigError, match=r"no column 'body' \(columns: 'text', 'title', 'n'\)"):
        prepare_data([tmp_path / "docs.parquet"], tmp_path / "x", "byte", progress=False,
                     json_keys=("body",))
    with pytest.raises(ConfigError, match=r"row 0: column 'n' holds int"):
        prepare_data([tmp_path / "docs.parquet"], tmp_path / "x", "byte", progress=False,
                     json_keys=("n",))


# --- integrity and the sample-index cache -------------------------------------------------

@pytest.fixture
def two_datasets(tmp_path):
    for name, n in (("a", 300), ("b", 120)):
        (tmp_path / f"{name}.txt").write_text(prose(n), encoding="utf-8")
        prepare_data([tmp_path / f"{name}.txt"], tmp_path / name, "byte", progress=False)
    return tmp_path


def test_truncated_bin_is_named(two_datasets):
    a = two_datasets / "a"
    data = (two_datasets / "a.bin").read_bytes()
    (two_datasets / "a.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"a.bin' has \d+ bytes but .*a.idx describes \d+ .*"
                                          r"truncated.*re-run mohge-prepare-data"):
        check_dataset(a, "byte")
    (two_datasets / "a.json").unlink()  # no sidecar (Megatron-LM's tools): still caught
    with pytest.raises(ConfigError, match="truncated"):
        check_dataset(a, "byte")


def test_idx_from_another_dataset_is_named(two_datasets):
    shutil.copy(two_datasets / "b.idx", two_datasets / "a.idx")
    with pytest.raises(ConfigError, match=r"a.bin' has \d+ bytes but .*a.idx describes"):
        check_dataset(two_datasets / "a", "byte")
    # Same token count, different boundaries: only the sidecar's .idx hash can tell.
    (two_datasets / "c.txt").write_text("ab\n\ncd\n", encoding="utf-8")
    (two_datasets / "d.txt").write_text("a\n\nbcd\n", encoding="utf-8")
    for name in "cd":
        prepare_data([two_datasets / f"{name}.txt"], two_datasets / name, "byte", progress=False)
    shutil.copy(two_datasets / "d.idx", two_datasets / "c.idx")
    with pytest.raises(ConfigError, match=r"sidecar .*c.json' does not describe .*c.idx"):
        check_dataset(two_datasets / "c", "byte")


def test_not_an_idx_file(two_datasets):
    (two_datasets / "a.idx").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match=r"a.idx' is not a Megatron .idx file"):
        check_dataset(two_datasets / "a", "byte")


def test_reprepared_prefix_rebuilds_the_index_cache(two_datasets):
    # Before: the cache was keyed on the path, so re-preparing at the same prefix reused the
    # old sample indices (wrong documents, or IndexError past the new end).
    kw = dict(seq_length=32, seed=7, train_samples=40, valid_samples=4)
    cache = two_datasets / "idx"
    prefix = two_datasets / "data"
    shutil.copy(two_datasets / "a.txt", two_datasets / "in.txt")
    prepare_data([two_datasets / "in.txt"], prefix, "byte", progress=False)
    build_gpt_datasets(prefix, "byte", cache_dir=cache, **kw)
    shutil.copy(two_datasets / "b.txt", two_datasets / "in.txt")  # smaller corpus
    prepare_data([two_datasets / "in.txt"], prefix, "byte", progress=False)
    train, valid = build_gpt_datasets(prefix, "byte", cache_dir=cache, **kw)
    fresh_train, fresh_valid = build_gpt_datasets(prefix, "byte",
                                                  cache_dir=two_datasets / "fresh", **kw)
    for ds, ref in ((train, fresh_train), (valid, fresh_valid)):
        assert len(ds) == len(ref)
        for i in range(len(ds)):
            assert np.array_equal(ds[i]["tokens"], ref[i]["tokens"])
    assert len(list(cache.glob("content-*"))) == 2


def test_stdlib_default_corpus_still_one_document_per_file(tmp_path):
    meta = prepare_data(None, tmp_path / "std", "byte", max_bytes=20_000, progress=False)
    assert meta["documents"]["split"] == "file"
    first = Path(meta["sources"]["first"][0])
    assert first.is_relative_to(Path(sysconfig.get_paths()["stdlib"]))
    assert read_back(tmp_path / "std")[0] == byte_ids(first.read_text(encoding="utf-8"))


def test_input_file_given_as_dataset_prefix(tmp_path):
    src = write_jsonl(tmp_path / "docs.jsonl")
    with pytest.raises(ConfigError, match=r"docs.jsonl' is an input file, not a prepared "
                                          r"dataset: tokenize it first with `mohge-prepare-data"):
        check_dataset(src, "byte")
