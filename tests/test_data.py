"""Data pipeline: tokenizers, corpus discovery, .bin/.idx preparation, GPT datasets, batches."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import pytest

from megatron_mohge import ConfigError
from megatron_mohge.cli.prepare_data import main as prepare_main
from megatron_mohge.data import (
    ByteTokenizer,
    HFTokenizer,
    build_gpt_datasets,
    check_dataset,
    collect_text_files,
    default_corpus_files,
    ensure_default_dataset,
    get_micro_batches,
    load_tokenizer,
    prepare_data,
    read_metadata,
    train_hf_tokenizer,
)

DOCS = {
    "a.txt": "Hello, MoHGE!\nExperts of many widths.\n",
    "b.md": "# Groups\n\nNarrow experts are cheap; wide ones are strong. Ünïcødé → ✓ 漢字\n",
    "sub/c.py": "def f(x):\n    return x * 2  # tabs\tand  spaces\n" * 20,
}


def write_docs(root: Path, docs: dict = DOCS) -> Path:
    for name, text in docs.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_docs(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def hf_tok(corpus, tmp_path_factory) -> HFTokenizer:
    files = sorted(p for p in corpus.rglob("*") if p.is_file())
    return train_hf_tokenizer(files, 300, tmp_path_factory.mktemp("tok") / "tokenizer.json")


WORDS = ("expert", "group", "width", "router", "token", "gate", "loss", "rank", "layer",
         "balance", "capacity", "narrow", "wide", "sparse", "dense", "shard")


def synthetic_docs(num_docs: int = 48, words: int = 180) -> dict:
    """``num_docs`` deterministic text files (~1.2 KB each). The tests' datasets are built from
    these, not from the stdlib: its file count at a given byte budget differs between Python
    versions (3.12 has one file fewer at 60 KB), which emptied the validation split."""
    return {f"doc{i:02d}.txt": f"doc {i}: " + " ".join(
        WORDS[(i * 7 + j * j * 3 + j) % len(WORDS)] for j in range(words)) + "\n"
        for i in range(num_docs)}


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> str:
    """~60 KB in 48 documents as bytes: every split of 949,50,1 gets documents at seq 32."""
    corpus = write_docs(tmp_path_factory.mktemp("synthetic"), synthetic_docs())
    prefix = str(tmp_path_factory.mktemp("ds") / "synthetic_byte")
    prepare_data([corpus], prefix, "byte", progress=False)
    return prefix


@pytest.fixture(scope="module")
def train_valid(small_dataset, tmp_path_factory):
    return build_gpt_datasets(small_dataset, "byte", seq_length=32, seed=1234,
                              train_samples=50, valid_samples=4,
                              cache_dir=tmp_path_factory.mktemp("idx"))


def read_back(prefix: str) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix, mmap=True)
    return [ds[i].tolist() for i in range(len(ds))]


# --- tokenizers ---------------------------------------------------------------------------

def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    assert (tok.vocab_size, tok.eod, tok.pad, tok.spec) == (257, 256, 256, "byte")
    text = "MoHGE: ✓ Ünïcødé 漢字\n\ttabs"
    ids = tok.tokenize(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.detokenize(ids) == text
    assert tok.detokenize(ids + [tok.eod] + ids) == text + "<|endoftext|>" + text
    assert isinstance(load_tokenizer("byte"), ByteTokenizer)
    assert isinstance(load_tokenizer(" BYTE "), ByteTokenizer)
    with pytest.raises(ValueError, match="outside the byte tokenizer"):
        tok.detokenize([300])


def test_train_hf_tokenizer_round_trip(hf_tok, corpus):
    assert Path(hf_tok.spec).is_file() and Path(hf_tok.spec).is_absolute()
    assert 257 <= hf_tok.vocab_size <= 300
    assert hf_tok.eod == hf_tok._tok.token_to_id("<|endoftext|>") and hf_tok.pad == hf_tok.eod
    for text in [*DOCS.values(), "unseen wörds 🙂 and\n\n  odd   spacing"]:
        ids = hf_tok.tokenize(text)
        assert ids and max(ids) < hf_tok.vocab_size and hf_tok.eod not in ids
        assert hf_tok.detokenize(ids) == text
    # BPE merges learned from the corpus make its text shorter than its bytes
    assert len(hf_tok.tokenize(DOCS["sub/c.py"])) < len(DOCS["sub/c.py"]) / 2
    # spec, folder and pickle all reload the same tokenizer
    for again in (load_tokenizer(hf_tok.spec), load_tokenizer(Path(hf_tok.spec).parent),
                  pickle.loads(pickle.dumps(hf_tok))):
        assert (again.fingerprint, again.eod, again.vocab_size) == (
            hf_tok.fingerprint, hf_tok.eod, hf_tok.vocab_size)
        assert again.tokenize("abc def") == hf_tok.tokenize("abc def")


def test_hf_tokenizer_eod_errors(hf_tok, tmp_path):
    with pytest.raises(ConfigError, match="'<nope>'.*eod_token"):
        HFTokenizer(hf_tok.spec, eod_token="<nope>")
    # a tokenizer.json without any end-of-document token
    import tokenizers as tk

    plain = tk.Tokenizer(tk.models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    plain.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ConfigError, match=r"no end-of-document token.*'<\|endoftext\|>'.*'</s>'"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert HFTokenizer(tmp_path, eod_token="b").eod == 1


def test_load_tokenizer_errors(tmp_path):
    for bad in ["gpt2", str(tmp_path / "missing.json"), ""]:
        with pytest.raises(ConfigError, match="'byte'"):
            load_tokenizer(bad)
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="cannot load tokenizer"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(ConfigError, match="at least 257"):
        train_hf_tokenizer([tmp_path / "tokenizer.json"], 100, tmp_path / "t.json")


# --- corpus -------------------------------------------------------------------------------

def test_default_corpus_is_deterministic_and_bounded():
    files = default_corpus_files(max_bytes=50_000)
    assert files and files == default_corpus_files(max_bytes=50_000)
    sizes = [f.stat().st_size for f in files]
    assert sum(sizes[:-1]) < 50_000 <= sum(sizes) or len(files) == len(default_corpus_files())
    assert all(f.suffix == ".py" and s > 0 for f, s in zip(files, sizes))
    more = default_corpus_files(max_bytes=200_000)
    assert more[:len(files)] == files and len(more) > len(files)  # a prefix: stable order
    assert not any({"test", "tests", "idlelib", "site-packages"} & set(f.parts) for f in more)


def test_collect_text_files(tmp_path):
    root = write_docs(tmp_path / "docs")
    (root / ".hidden.txt").write_text("secret")
    (root / ".git").mkdir()
    (root / ".git" / "x.txt").write_text("nope")
    (root / "empty.txt").write_text("")
    with pytest.warns(UserWarning, match="empty"):
        files = collect_text_files([root, root / "a.txt"])  # a.txt listed twice: kept once
    assert [f.relative_to(root).as_posix() for f in files] == ["a.txt", "b.md", "sub/c.py"]


def test_collect_text_files_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        collect_text_files([tmp_path / "missing"])
    (tmp_path / "void").mkdir()
    with pytest.raises(ConfigError, match="'.*void' contains no"):
        collect_text_files([tmp_path / "void"])
    with pytest.raises(ConfigError, match="no input files"):
        collect_text_files([])
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(ConfigError, match="empty"):
        collect_text_files([tmp_path / "e.txt"])
    (tmp_path / "blob.bin").write_bytes(b"PK\x03\x04\x00\x00binary")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    for name in ("blob.bin", "latin1.txt"):
        with pytest.raises(ConfigError, match=f"{name}' looks binary.*remove it"):
            collect_text_files([tmp_path / name])


# --- prepare ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["byte", "hf"])
def test_prepare_round_trip(kind, corpus, hf_tok, tmp_path):
    tok = ByteTokenizer() if kind == "byte" else hf_tok
    prefix = str(tmp_path / f"out_{kind}")
    meta = prepare_data([corpus], prefix, tok, progress=False, split="file")
    expected = [tok.tokenize((corpus / n).read_text(encoding="utf-8")) + [tok.eod]
                for n in sorted(DOCS)]  # folder order: a.txt, b.md, sub/c.py
    assert read_back(prefix) == expected
    assert meta == read_metadata(prefix)
    assert (meta["tokenizer"], meta["vocab_size"], meta["eod"]) == (tok.spec, tok.vocab_size,
                                                                  tok.eod)
    assert meta["num_documents"] == 3 and meta["num_tokens"] == sum(map(len, expected))
    assert meta["dtype"] == "uint16" and meta["sources"]["count"] == 3
    assert sorted(os.listdir(tmp_path)) == [f"out_{kind}.{e}" for e in ("bin", "idx", "json")]
    assert check_dataset(prefix + ".bin", load_tokenizer(tok.spec)) == meta


def test_prepare_failure_leaves_nothing(corpus, tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "ok.txt").write_text("fine text")
    # binary content after the sniffed 8 KiB: found while tokenizing, not while collecting
    (tmp_path / "in" / "z.txt").write_bytes(b"x" * 9000 + b"\xff\xfe")
    with pytest.raises(ConfigError, match="z.txt' is not valid UTF-8"):
        prepare_data([tmp_path / "in"], tmp_path / "out" / "ds", "byte", progress=False)
    assert os.listdir(tmp_path / "out") == []


def test_check_dataset_errors(corpus, hf_tok, tmp_path):
    prefix = str(tmp_path / "hf_ds")
    prepare_data([corpus], prefix, hf_tok, progress=False)
    with pytest.raises(ConfigError, match=r"prepared with tokenizer '.*tokenizer.json' but "
                                          r"training uses byte.*vocab_size \d+ vs 257"):
        check_dataset(prefix, "byte")
    with pytest.raises(ConfigError, match=r"missing .*nowhere.bin.*mohge-prepare-data"):
        check_dataset(tmp_path / "nowhere", "byte")
    # Without the sidecar (as from Megatron-LM's tools): ids beyond the vocab still caught...
    os.remove(prefix + ".json")
    with pytest.raises(ConfigError, match=r"token id \d+, beyond the vocab"):
        check_dataset(prefix, "byte")
    # ...and a plausible one is accepted with a warning.
    with pytest.warns(UserWarning, match="no .*sidecar"):
        assert check_dataset(prefix, hf_tok) is None


def test_ensure_default_dataset_reuses(tmp_path):
    prefix = ensure_default_dataset(tmp_path, "byte", max_bytes=20_000, progress=False)
    assert "byte" in prefix and "20000" in prefix
    mtime = os.stat(prefix + ".bin").st_mtime_ns
    assert ensure_default_dataset(tmp_path, ByteTokenizer(), max_bytes=20_000) == prefix
    assert os.stat(prefix + ".bin").st_mtime_ns == mtime
    assert read_metadata(prefix)["sources"]["default_corpus"] is True


# --- GPT datasets and batches ------------------------------------------------------------

def test_build_gpt_datasets(train_valid, small_dataset):
    train, valid = train_valid
    assert len(train) >= 50 and len(valid) >= 1
    docs = [bytes(d[:-1]) for d in read_back(small_dataset)]  # byte ids -> file bytes
    for ds in (train, valid):
        s = ds[0]
        assert {k: tuple(s[k].shape) for k in ("tokens", "labels", "loss_mask", "position_ids")} \
            == {k: (32,) for k in ("tokens", "labels", "loss_mask", "position_ids")}
        assert (s["tokens"][1:] == s["labels"][:-1]).all()
        assert s["position_ids"].tolist() == list(range(32))
        assert s["loss_mask"].sum() == 32  # pad == eod is not masked (megatron uses pad -1)
    # samples are windows of the (shuffled) document stream: each eod-free run of a sample
    # is a piece of one source file
    for i in range(0, 50, 7):
        runs = bytes(t if t < 256 else 0 for t in train[i]["tokens"].tolist()).split(b"\0")
        assert all(any(r in d for d in docs) for r in runs)


def test_build_gpt_datasets_errors(small_dataset, corpus, tmp_path):
    tiny = str(tmp_path / "tiny")
    prepare_data([corpus], tiny, "byte", progress=False)
    with pytest.raises(ConfigError, match="validation split .*split='949,50,1'"):
        build_gpt_datasets(tiny, "byte", seq_length=512, seed=1, train_samples=4,
                           valid_samples=1, cache_dir=tmp_path / "idx")
    with pytest.raises(ConfigError, match="split '100,0,0'"):
        build_gpt_datasets(small_dataset, "byte", seq_length=32, seed=1, split="100,0,0",
                           train_samples=4, valid_samples=1)
    with pytest.raises(ConfigError, match="vocab_size 257 vs 2"):
        build_gpt_datasets(small_dataset, tmp_path_tok(tmp_path), seq_length=32, seed=1,
                           train_samples=4, valid_samples=1)


def tmp_path_tok(tmp_path: Path) -> HFTokenizer:
    return train_hf_tokenizer([write_docs(tmp_path / "t") / "a.txt"], 270, tmp_path / "tk.json")


def test_get_micro_batches(train_valid):
    train, _ = train_valid
    kw = dict(global_batch_size=8, micro_batch_size=2)
    full = get_micro_batches(train, iteration=5, dp_rank=0, dp_size=1, **kw)
    assert len(full) == 4
    for mb in full:
        assert {k: (tuple(v.shape), str(v.dtype)) for k, v in mb.items()} == {
            "tokens": ((2, 32), "torch.int64"), "labels": ((2, 32), "torch.int64"),
            "position_ids": ((2, 32), "torch.int64"), "loss_mask": ((2, 32), "torch.float32")}
    again = get_micro_batches(train, iteration=5, dp_rank=0, dp_size=1, **kw)
    assert all((a["tokens"] == b["tokens"]).all() for a, b in zip(full, again))

    import torch

    whole = torch.cat([mb["tokens"] for mb in full])
    parts = [torch.cat([mb["tokens"] for mb in get_micro_batches(
        train, iteration=5, dp_rank=r, dp_size=2, **kw)]) for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)  # DP slices: contiguous, disjoint, complete
    assert not any(torch.equal(a, b) for a in parts[0] for b in parts[1])
    other = torch.cat([mb["tokens"] for mb in get_micro_batches(
        train, iteration=6, dp_rank=0, dp_size=1, **kw)])
    assert not torch.equal(other, whole)
    # wrap-around instead of IndexError, and start_sample overrides the iteration
    n = len(train)
    far = get_micro_batches(train, iteration=10**6, dp_rank=0, dp_size=1, **kw)
    start = (10**6 * 8) % n
    assert torch.equal(far[0]["tokens"][0], train[start]["tokens"])
    same = get_micro_batches(train, iteration=0, start_sample=5 * 8, dp_rank=0, dp_size=1, **kw)
    assert torch.equal(torch.cat([mb["tokens"] for mb in same]), whole)
    with pytest.raises(ConfigError, match="global_batch_size=8 is not divisible .* 3 x"):
        get_micro_batches(train, iteration=0, dp_rank=0, dp_size=3, **kw)


# --- CLI ----------------------------------------------------------------------------------

def test_cli_exit_codes(corpus, tmp_path, capsys):
    prefix = tmp_path / "cli_ds"
    assert prepare_main([str(corpus), "--output-prefix", str(prefix), "--no-progress",
                         "--split-documents", "file"]) == 0
    out = capsys.readouterr().out
    assert "3 documents" in out and str(prefix) + ".bin" in out
    assert read_metadata(prefix)["num_documents"] == 3

    assert prepare_main([str(tmp_path / "missing"), "--output-prefix", str(prefix)]) == 2
    err = capsys.readouterr().err
    assert "error: input path" in err and "does not exist" in err and "Traceback" not in err
    assert prepare_main(["--tokenizer", "nope", "--output-prefix", str(prefix)]) == 2
    assert "Accepted forms" in capsys.readouterr().err
    assert prepare_main(["--tokenizer", "byte", "--train-tokenizer", "300"]) == 2
    assert prepare_main(["--bogus-flag"]) == 2  # argparse usage error, returned not raised


def test_cli_train_tokenizer(corpus, tmp_path, capsys):
    tok_out = tmp_path / "bpe.json"
    assert prepare_main([str(corpus), "--train-tokenizer", "280", "--tokenizer-out", str(tok_out),
                         "--output-prefix", str(tmp_path / "bpe_ds"), "--no-progress"]) == 0
    meta = read_metadata(tmp_path / "bpe_ds")
    assert meta["tokenizer"] == str(tok_out.resolve()) and meta["vocab_size"] <= 280
    check_dataset(tmp_path / "bpe_ds", str(tok_out))


@pytest.mark.slow
def test_two_ranks_build_and_slice():
    from tests._launch import run_workers

    r = run_workers("data_worker.py", 2)
    assert r["world"] == 2
    assert r["per_rank"][0] + r["per_rank"][1] == r["full"]
    assert any(f.endswith("train-shuffle_index.npy") for f in r["cache_files"])


def test_no_warnings_leak_from_byte_dataset_build(small_dataset, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the pad == eod collision warning is filtered
        build_gpt_datasets(small_dataset, "byte", seq_length=16, seed=3, train_samples=8,
                           valid_samples=2, cache_dir=tmp_path)


def test_valid_seed_fixes_the_held_out_samples(small_dataset, tmp_path):
    """data.valid_seed: the validation samples stay when the training seed changes (paired
    multi-seed comparisons); without it they follow the seed, as in Megatron-LM."""
    def build(seed, valid_seed):
        return build_gpt_datasets(small_dataset, "byte", seq_length=32, seed=seed,
                                  train_samples=40, valid_samples=6, valid_seed=valid_seed,
                                  cache_dir=tmp_path / "idx")

    def tokens(ds, n):
        return [ds[i]["tokens"].tolist() for i in range(n)]

    (t1, v1), (t2, v2) = build(1, 99), build(2, 99)
    assert tokens(v1, 6) == tokens(v2, 6)
    assert tokens(t1, 8) != tokens(t2, 8)  # training data order still follows the seed
    # the joint build (valid_seed == seed) gives the same datasets as the separate builds
    _, v3 = build(99, 99)
    assert tokens(v3, 6) == tokens(v1, 6)
    (_, w1), (_, w2) = build(1, None), build(2, None)
    assert tokens(w1, 6) != tokens(w2, 6)
    assert tokens(build(1, 1)[1], 6) == tokens(w1, 6)
