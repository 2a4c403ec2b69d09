"""Hugging Face export of a trained MoHGE (or stock MoE / dense) model: ``mohge-export-hf``.

Reading the checkpoint (:mod:`.source`, :mod:`.reader`: torch only, no Megatron), mapping
names and options (:mod:`.mapping`), the tokenizer (:mod:`.tokenizer`) and writing the folder
(:mod:`.writer`) are separate steps; :func:`export_hf` runs them. The exported model's code is
:mod:`megatron_mohge.export.hf` (copied into the folder).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from megatron_mohge.config import ConfigError


def export_hf(checkpoint, out, *, iteration: Optional[int] = None, run_file=None,
              tokenizer: Optional[str] = None, max_shard_size="5GB", force: bool = False,
              log: Callable = lambda msg: None) -> Path:
    """Export ``checkpoint`` (a run folder, checkpoint root or ``iter_*`` folder; see
    :mod:`.source`) to the Hugging Face folder ``out``; returns ``out``. Bad input raises a
    one-line ``ConfigError`` before anything is written to ``out``."""
    from megatron_mohge.export import mapping, reader, source, writer
    from megatron_mohge.export.tokenizer import tokenizer_files

    out = Path(out)
    writer.check_out(out, force)
    max_bytes = writer.parse_size(max_shard_size)
    src = source.open_source(checkpoint, iteration=iteration, run_file=run_file)
    run = src.run
    mapping.check_supported(run)
    files, ids, tok = tokenizer_files(run.data.tokenizer, run.model.seq_length, tokenizer)
    log(f"reading {src.ckpt}")
    glob, layers = reader.read_layers(src.ckpt, run.model.num_layers)
    emb = glob.get("embedding.word_embeddings.weight")
    if emb is None:
        raise ConfigError(f"{src.ckpt}: no embedding.word_embeddings.weight (a pipeline stage "
                          "of another model?)")
    if emb.shape[0] < tok.vocab_size:
        raise ConfigError(f"{src.ckpt}: the embedding has {emb.shape[0]} rows but the "
                          f"tokenizer {run.data.tokenizer!r} has {tok.vocab_size} tokens")
    cfg = mapping.hf_config(run, int(emb.shape[0]), ids)
    state = mapping.hf_state_dict(cfg, glob, layers, str(src.ckpt))
    from megatron_mohge.version import __version__

    cfg["mohge_export"] = {"checkpoint": str(Path(src.ckpt).resolve()),
                           "megatron_mohge_version": __version__, "moe_kind": run.moe.kind}
    writer.write_folder(out, cfg, state, files, max_shard_bytes=max_bytes, force=force)
    log(f"wrote {out} ({sum(t.numel() for t in state.values()):,} parameters)")
    return out


__all__ = ["export_hf"]
