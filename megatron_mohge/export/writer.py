"""Write an export folder atomically: everything goes to a hidden sibling folder that is
renamed to ``--out`` only when complete, so an interrupted or failed export leaves nothing
half-written there (and a replaced export is swapped in one rename)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


from megatron_mohge.config import ConfigError

HF_FILES = ("configuration_mohge.py", "modeling_mohge.py")
AUTO_MAP = {"AutoConfig": "configuration_mohge.MohgeConfig",
            "AutoModelForCausalLM": "modeling_mohge.MohgeForCausalLM"}
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"


def parse_size(text) -> int:
    """``"5GB"`` / ``"200MB"`` / bytes -> bytes."""
    s = str(text).strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3), ("B", 1)):
        if s.endswith(unit):
            s, m = s[: -len(unit)], mult
            break
    else:
        m = 1
    try:
        return int(float(s) * m)
    except ValueError:
        raise ConfigError(f"--max-shard-size {text!r}: expected e.g. 5GB, 500MB or a byte "
                          "count") from None


def shards(state: dict, max_bytes: int) -> list:
    """Consecutive ``{name: tensor}`` shards of at most ``max_bytes`` (a larger tensor alone)."""
    out, cur, size = [], {}, 0
    for name in state:
        n = state[name].numel() * state[name].element_size()
        if cur and size + n > max_bytes:
            out.append(cur)
            cur, size = {}, 0
        cur[name] = state[name]
        size += n
    if cur:
        out.append(cur)
    return out


def check_out(out: Path, force: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ConfigError(f"--out {out}: exists and is not empty; pass --force to replace it")


def write_folder(out: Path, config: dict, state: dict, files: dict, *, max_shard_bytes: int,
                 force: bool = False) -> Path:
    """``out`` with ``config.json`` (+ auto_map), the modeling code, ``files`` (tokenizer)
    and the weights as safetensors (sharded above ``max_shard_bytes``)."""
    from safetensors.torch import save_file

    out = Path(out)
    check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        cfg = {**config, "architectures": ["MohgeForCausalLM"], "model_type": "mohge",
               "auto_map": AUTO_MAP}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
        here = Path(__file__).parent / "hf"
        for name in HF_FILES:
            shutil.copyfile(here / name, tmp / name)
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        parts = shards(state, max_shard_bytes)
        if len(parts) == 1:
            save_file(parts[0], str(tmp / WEIGHTS), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, part in enumerate(parts, 1):
                name = f"model-{i:05d}-of-{len(parts):05d}.safetensors"
                save_file(part, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in part})
            total = sum(t.numel() * t.element_size() for t in state.values())
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                 "weight_map": weight_map}, indent=1))
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


__all__ = ["write_folder", "parse_size", "shards", "check_out"]
