"""Tokenizers for MoHGE data: a dependency-free byte tokenizer and a HuggingFace wrapper.

Both satisfy what megatron-core's ``GPTDatasetConfig`` / ``GPTDataset`` read from their
``tokenizer`` (megatron-core 0.16.1): ``vocab_size`` (``gpt_dataset.py`` ``__post_init__``),
``eod`` (loss / position masks), ``pad`` (``megatron_dataset.py``) and
``unique_identifiers`` (serialised into the hash that names the cached sample indices).
``GPTDatasetConfig`` annotates the field as ``megatron.core.tokenizers.MegatronTokenizerBase``
but never ``isinstance``-checks it, so we duck-type instead of subclassing: that keeps this
module importable without megatron-core (importing it costs seconds), which matters for the
CLI and for tokenizer worker processes. (``megatron/core/datasets/megatron_tokenizer.py``
only holds the deprecated ``MegatronLegacyTokenizer``, which logs a deprecation warning.)

``load_tokenizer(spec)`` turns the ``spec`` string of a tokenizer back into the tokenizer;
dataset sidecar files record it so training can check it uses the tokenizer the data was
prepared with.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

from megatron_mohge.config import ConfigError

# End-of-document tokens tried, in order, when a tokenizer.json is loaded without an explicit
# ``eod_token``: GPT-2/NeoX/Qwen style, Llama-3, Llama-2/T5/Mistral, Gemma, BERT.
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>", "[SEP]")
# A *distinct* pad token is used when the vocab has one; otherwise pad = eod (see ``pad``).
PAD_CANDIDATES = ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")

BYTE_SPEC = "byte"
TRAINED_EOD = "<|endoftext|>"


class ByteTokenizer:
    """UTF-8 bytes as token ids: ids 0..255 are raw bytes, ``eod = 256``, ``vocab_size = 257``.

    Same id layout as Megatron-LM's ``--tokenizer-type NullTokenizer --vocab-size 256``
    (megatron-core ``tokenizers/text/libraries/null_tokenizer.py``: ``eod`` is the given
    vocab size, ``vocab_size`` is one more), so datasets prepared here train unchanged under
    Megatron-LM with those flags. Differences: NullTokenizer's ``tokenize`` parses
    space-separated integers (it is meant for synthetic benchmarks), so it cannot *prepare*
    text data, and it has no ``pad`` attribute. Ours has ``pad = eod``; ``MegatronDataset``
    detects the pad/eod collision and falls back to pad id -1, exactly what it does for
    NullTokenizer's missing ``pad``, so GPTDataset samples are identical under both.
    """

    spec = BYTE_SPEC
    name = BYTE_SPEC
    fingerprint = BYTE_SPEC  # nothing on disk: the id layout is the whole identity
    vocab_size = 257
    eod = 256
    pad = 256  # no separate pad id: it would be a 258th id Megatron-LM's layout lacks

    @property
    def unique_identifiers(self) -> "OrderedDict[str, object]":
        """Identity that megatron-core hashes into the names of its cached sample indices."""
        return OrderedDict([("class", type(self).__qualname__), ("spec", self.spec),
                            ("vocab_size", self.vocab_size), ("eod", self.eod)])

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Iterable[int]) -> str:
        """Decode bytes back to text; ``eod`` is rendered as ``<|endoftext|>``.

        Bytes are decoded per run between eods, so a multi-byte character cut by a sample
        boundary becomes U+FFFD instead of raising.
        """
        parts: list[str] = []
        run = bytearray()
        for i in ids:
            i = int(i)
            if i == self.eod:
                parts.append(run.decode("utf-8", errors="replace"))
                parts.append(TRAINED_EOD)
                run.clear()
            elif 0 <= i < 256:
                run.append(i)
            else:
                raise ValueError(f"token id {i} is outside the byte tokenizer's range 0..256; "
                                 f"were these ids produced by another tokenizer?")
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=257, eod=256)"


def _import_tokenizers():
    """The ``tokenizers`` package, imported on first use (it is an optional dependency)."""
    try:
        import tokenizers
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ConfigError(
            "HuggingFace tokenizers need the 'tokenizers' package, which is not installed; "
            "run: pip install megatron-mohge[train]  (or use --tokenizer byte)") from err
    return tokenizers


def _resolve_tokenizer_json(path: Union[str, Path]) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise ConfigError(f"tokenizer file {str(p)!r} does not exist; pass the path of a "
                          f"HuggingFace tokenizer.json (or a folder containing one), or 'byte'")
    return p.resolve()


class HFTokenizer:
    """A local HuggingFace ``tokenizer.json`` loaded with the ``tokenizers`` library.

    ``eod`` is the id of ``eod_token`` when given, else of the first of
    :data:`EOD_CANDIDATES` present in the vocab. ``pad`` is a distinct pad token when the
    vocab has one (GPTDataset then masks padded positions out of the loss), else ``eod``.
    ``tokenize`` never adds BOS/EOS (post-processor templates are skipped): documents get
    exactly one ``eod`` appended by ``prepare_data``.
    """

    def __init__(self, path: Union[str, Path], eod_token: Optional[str] = None) -> None:
        self.path = _resolve_tokenizer_json(path)
        self.eod_token = eod_token
        self._load()

    def _load(self) -> None:
        tokenizers = _import_tokenizers()
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as err:  # the Rust side raises a plain Exception on bad JSON
            raise ConfigError(f"cannot load tokenizer {str(self.path)!r}: {err}; it must be a "
                              f"HuggingFace tokenizer.json (tokenizers library format)") from err
        vocab = self._tok.get_vocab(with_added_tokens=True)
        # Some tokenizer.json files have id holes; size the embedding by the largest id.
        self.vocab_size = max(self._tok.get_vocab_size(with_added_tokens=True),
                              max(vocab.values(), default=-1) + 1)
        tried = (self.eod_token,) if self.eod_token is not None else EOD_CANDIDATES
        found = next((t for t in tried if t in vocab), None)
        if found is None:
            raise ConfigError(
                f"tokenizer {str(self.path)!r} has no end-of-document token: tried "
                f"{', '.join(repr(t) for t in tried)}; pass the right one with "
                f"eod_token=... (CLI: train a tokenizer with --train-tokenizer, which adds "
                f"{TRAINED_EOD!r})")
        self.eod_token_used = found
        self.eod = int(vocab[found])
        pad = next((t for t in PAD_CANDIDATES if t in vocab and vocab[t] != self.eod), None)
        self.pad = int(vocab[pad]) if pad is not None else self.eod
        self.fingerprint = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]

    # Pickle by path so tokenizers cross process boundaries (prepare_data workers) cheaply.
    def __getstate__(self) -> dict:
        return {"path": str(self.path), "eod_token": self.eod_token}

    def __setstate__(self, state: dict) -> None:
        self.path = Path(state["path"])
        self.eod_token = state["eod_token"]
        self._load()

    @property
    def spec(self) -> str:
        """Absolute path of the tokenizer.json: ``load_tokenizer(spec)`` reloads it."""
        return str(self.path)

    @property
    def name(self) -> str:
        """Short identity for file names: vocab size + content hash, not the path."""
        return f"hf{self.vocab_size}-{self.fingerprint[:8]}"

    @property
    def unique_identifiers(self) -> "OrderedDict[str, object]":
        # Content fingerprint rather than path only: editing tokenizer.json in place must not
        # reuse sample indices cached for the old one.
        return OrderedDict([("class", type(self).__qualname__), ("spec", self.spec),
                            ("fingerprint", self.fingerprint),
                            ("vocab_size", self.vocab_size), ("eod", self.eod)])

    def tokenize(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.spec!r}, vocab_size={self.vocab_size}, eod={self.eod})"


Tokenizer = Union[ByteTokenizer, HFTokenizer]


def load_tokenizer(spec: Union[str, Path, Tokenizer], eod_token: Optional[str] = None) -> Tokenizer:
    """``"byte"`` -> :class:`ByteTokenizer`; a tokenizer.json (or a folder holding one) ->
    :class:`HFTokenizer`. A tokenizer object is returned as is."""
    if isinstance(spec, (ByteTokenizer, HFTokenizer)):
        return spec
    if not isinstance(spec, (str, Path)) or not str(spec).strip():
        raise ConfigError(f"tokenizer spec {spec!r} is not valid; use 'byte' or the path of a "
                          f"HuggingFace tokenizer.json (or a folder containing one)")
    text = str(spec).strip()
    if text.lower() == BYTE_SPEC:
        return ByteTokenizer()
    p = Path(text).expanduser()
    if p.is_file() or (p.is_dir() and (p / "tokenizer.json").is_file()):
        return HFTokenizer(p, eod_token=eod_token)
    hint = (f"the folder {text!r} has no tokenizer.json" if p.is_dir()
            else f"{text!r} is neither 'byte' nor an existing file")
    raise ConfigError(f"tokenizer spec {text!r} is not valid: {hint}. Accepted forms: 'byte' "
                      f"(UTF-8 bytes, vocab 257), PATH/tokenizer.json, or a folder containing "
                      f"tokenizer.json (train one with mohge-prepare-data --train-tokenizer)")


def train_hf_tokenizer(files: Sequence[Union[str, Path]], vocab_size: int,
                       out_path: Union[str, Path], *,
                       texts: Optional[Iterable[str]] = None) -> HFTokenizer:
    """Train a byte-level BPE on ``files`` (or on the documents ``texts``, e.g. the text
    fields of JSON lines, instead) and save it as a tokenizer.json at ``out_path``.

    Byte-level (GPT-2 style) so any text round-trips exactly; ``<|endoftext|>`` is the only
    special token and becomes ``eod``. ``out_path`` may be a folder (``tokenizer.json`` is
    written inside it).
    """
    # 256 byte symbols + <|endoftext|>: a smaller vocab could not encode every byte.
    if int(vocab_size) < 257:
        raise ConfigError(f"tokenizer vocab_size {vocab_size} is too small: a byte-level BPE "
                          f"needs at least 257 ids (256 bytes + {TRAINED_EOD}); use e.g. 4096")
    paths = [str(Path(f)) for f in files]
    if not paths and texts is None:
        raise ConfigError("train_hf_tokenizer got no text files; pass at least one input file")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing and texts is None:
        raise ConfigError(f"tokenizer training file {missing[0]!r} does not exist; "
                          f"check the input paths")
    tk = _import_tokenizers()
    tok = tk.Tokenizer(tk.models.BPE())
    # use_regex=True: GPT-2's pre-split (words, numbers, punctuation, whitespace runs).
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=int(vocab_size), special_tokens=[TRAINED_EOD], show_progress=False,
        # every byte gets an id even if absent from the training text -> no unknown bytes
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    if texts is not None:
        tok.train_from_iterator(texts, trainer)
    else:
        tok.train(paths, trainer)
    out = Path(out_path).expanduser()
    if out.is_dir() or str(out_path).endswith(("/", "\\")):
        out = out / "tokenizer.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tok.save(str(tmp))
    tmp.replace(out)  # never leave a half-written tokenizer.json behind
    return HFTokenizer(out, eod_token=TRAINED_EOD)


def tokenizer_metadata(tokenizer: Tokenizer) -> dict:
    """The fields a dataset sidecar records about its tokenizer (see ``prepare.py``)."""
    return {"tokenizer": tokenizer.spec, "tokenizer_name": tokenizer.name,
            "tokenizer_fingerprint": tokenizer.fingerprint,
            "vocab_size": int(tokenizer.vocab_size), "eod": int(tokenizer.eod)}


def describe(tokenizer: Tokenizer) -> str:
    """One-line description for messages."""
    return f"{tokenizer.spec} (vocab {tokenizer.vocab_size}, eod {tokenizer.eod})"


def bytes_to_unicode() -> dict:
    """GPT-2's byte -> printable character table (what a ByteLevel pre-tokenizer emits)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
          + list(range(ord("\xae"), ord("\xff") + 1)))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


__all__ = ["ByteTokenizer", "HFTokenizer", "Tokenizer", "load_tokenizer", "train_hf_tokenizer",
           "EOD_CANDIDATES", "tokenizer_metadata", "describe", "bytes_to_unicode"]

