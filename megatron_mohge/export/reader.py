"""Model weights of a Megatron dist-checkpoint (``torch_dist``) with torch alone.

A dist-checkpoint stores every tensor as its *global* tensor, whatever TP / EP / PP layout
saved it (TP shards, SwiGLU halves and experts are chunks at offsets; dist-ckpt reshards by
them), so reading whole tensors with ``torch.distributed.checkpoint`` (no process group, no
Megatron import) gives the TP=EP=PP=1 layout. Two layer layouts occur: per-layer keys
``decoder.layers.<i>.<suffix>`` and stacked keys ``decoder.layers.<suffix>`` with a leading
layer axis, where layers of another kind (dense vs MoE) are simply absent chunks.

:func:`read_layers` returns ``(globals, layers)``: ``{key: tensor}`` outside the decoder
layers and ``{layer: {suffix: tensor}}``, with the layer-norm spellings of the local and TE
specs made one (:data:`NORM_ALIASES`).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from megatron_mohge.config import ConfigError

#: Prefixes of model tensors (optimizer states, RNG and scheduler state are skipped)
MODEL_PREFIXES = ("embedding.", "decoder.", "output_layer.", "mtp.")
#: spec-dependent spellings of the two pre-norms -> the fused (local / TE linear) one
NORM_ALIASES = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
_PER_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_STACKED = "decoder.layers."


def _check_files(ckpt: Path, metadata) -> None:
    """Every shard file the metadata points into exists and is long enough."""
    need: dict = {}
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        rel = getattr(info, "relative_path", None)
        if rel is None:
            continue
        need[rel] = max(need.get(rel, 0), int(info.offset) + int(info.length))
    for rel, size in sorted(need.items()):
        f = ckpt / rel
        if not f.is_file():
            raise ConfigError(f"{f}: shard file missing (the checkpoint is incomplete)")
        if f.stat().st_size < size:
            raise ConfigError(f"{f}: shard file truncated ({f.stat().st_size} bytes, needs "
                              f"{size})")


def read_model_tensors(ckpt: Path) -> tuple[dict, dict]:
    """``({key: global tensor}, {key: axis-0 offsets present})`` of the model tensors."""
    from torch.distributed import checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    ckpt = Path(ckpt)
    reader = dcp.FileSystemReader(str(ckpt))
    try:
        metadata = reader.read_metadata()
    except Exception as exc:  # noqa: BLE001 - missing / corrupt .metadata: named
        raise ConfigError(f"{ckpt / '.metadata'}: cannot read the checkpoint index "
                          f"({type(exc).__name__}); the checkpoint is damaged") from exc
    _check_files(ckpt, metadata)
    tensors, present = {}, {}
    for key, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata) or not key.startswith(MODEL_PREFIXES):
            continue
        dtype = md.properties.dtype
        fill = float("nan") if dtype.is_floating_point else 0
        tensors[key] = torch.full(tuple(md.size), fill, dtype=dtype)
        present[key] = sorted({int(c.offsets[0]) for c in md.chunks} if len(md.size) else set())
    if not tensors:
        raise ConfigError(f"{ckpt}: no model weights in this checkpoint")
    try:
        dcp.load(tensors, storage_reader=reader, no_dist=True)
    except Exception as exc:  # noqa: BLE001 - a damaged shard: named, not a traceback
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ConfigError(f"{ckpt}: reading the model weights failed ({type(exc).__name__}: "
                          f"{first}); the checkpoint is damaged") from exc
    return tensors, present


def _alias(suffix: str) -> str:
    for old, new in NORM_ALIASES.items():
        if suffix.startswith(old):
            return new + suffix[len(old):]
    return suffix


def read_layers(ckpt: Path, num_layers: int) -> tuple[dict, dict]:
    """``(globals, {layer: {suffix: tensor}})`` of ``ckpt`` (see the module docstring)."""
    tensors, present = read_model_tensors(ckpt)
    glob, layers = {}, {i: {} for i in range(num_layers)}
    for key, t in tensors.items():
        m = _PER_LAYER.match(key)
        if m:
            i = int(m.group(1))
            if i >= num_layers:
                raise ConfigError(f"{ckpt}: {key} is beyond model.num_layers={num_layers}")
            layers[i][_alias(m.group(2))] = t
        elif key.startswith(_STACKED):
            if t.shape[0] != num_layers:
                raise ConfigError(f"{ckpt}: {key} stacks {t.shape[0]} layers, the run file "
                                  f"says model.num_layers={num_layers}")
            for i in present[key]:
                layers[i][_alias(key[len(_STACKED):])] = t[i]
        else:
            glob[key] = t
    return glob, layers
