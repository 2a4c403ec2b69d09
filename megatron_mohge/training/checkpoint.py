"""Crash-safe training checkpoints on Megatron's ``dist_checkpointing``.

Layout (Megatron-LM's names): ``<root>/iter_XXXXXXX/`` per checkpoint and
``<root>/latest_checkpointed_iteration.txt``. A save writes ``iter_XXXXXXX.tmp`` first, renames
it when every rank is done, and only then replaces the tracker file (atomically), so an
interrupted save (Ctrl-C, crash, pre-emption) leaves the previous checkpoint as "latest".
"""

from __future__ import annotations

import copy
import os
import shutil
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from megatron_mohge.config import ConfigError
from megatron_mohge.training import mcore as M

TRACKER_FILE = "latest_checkpointed_iteration.txt"


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def latest(root: Path) -> Optional[Path]:
    """The latest complete checkpoint under ``root``, or None when there is none."""
    tracker = root / TRACKER_FILE
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ConfigError(f"checkpoint.load: {tracker} is corrupt ({text!r}); it should hold "
                          "the iteration of the latest checkpoint")
    ckpt = root / f"iter_{int(text):07d}"
    if not ckpt.is_dir():
        raise ConfigError(f"checkpoint.load: {tracker} points at {ckpt}, which is missing; "
                          "fix the file or remove it to start from scratch")
    return ckpt


def save(state: dict, root: Path, iteration: int, *, fully_parallel: bool = False,
         files: Optional[dict] = None) -> Path:
    """Save the sharded ``state`` as iteration ``iteration`` (collective). ``files``: extra
    ``{name: text}`` written into the checkpoint directory by rank 0 (e.g. the run config)."""
    from megatron.core import dist_checkpointing

    from megatron_mohge.compat.mcore import write_legacy_common

    final = root / f"iter_{iteration:07d}"
    tmp = root / f"iter_{iteration:07d}.tmp"
    if dist.get_rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # left over from an interrupted save
        tmp.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(state, str(tmp), M.save_strategy(fully_parallel))
    write_legacy_common(tmp)  # loadable by megatron-core 0.16 and 0.19 (collective)
    if dist.get_rank() == 0:
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write(root / TRACKER_FILE, str(iteration))
    dist.barrier()
    return final


def load(template: dict, ckpt: Path, *, fully_parallel: bool = False) -> dict:
    """Load checkpoint directory ``ckpt`` into the structure of sharded ``template``."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load(template, str(ckpt), M.load_strategy(ckpt, fully_parallel))


def fit_optimizer_state(loaded, optimizer):
    """Make a loaded optimizer state match this run's optimizer structure.

    Megatron builds one Adam for EP=1 and a chained (dense + expert) pair for EP>1. The
    per-parameter tensors reshard by key (saved without the ``chained_<i>.`` prefix), but the
    param-group metadata is not persisted (``LocalNonpersistentObject``): after an EP change
    it comes back as bare ``{'params': [...]}`` lists, or under the other layout's ``0``/``1``
    keys, and ``load_state_dict`` fails. Take the groups from the live optimizer instead (the
    LR and weight decay in them are set by the scheduler every step); Adam's step count
    travels in ``state['common_step']``.
    """
    chained = getattr(optimizer, "chained_optimizers", None)
    subs = chained if chained is not None and len(chained) > 1 else [optimizer]
    current = [copy.deepcopy(o.state_dict()) for o in subs]
    # the step count is common (non-sharded) state, saved under the old layout's structure
    steps = [d["state"]["common_step"] for d in _dicts(loaded)
             if isinstance(d.get("state"), dict) and "common_step" in d["state"]]

    def fit(sub: dict, cur: dict) -> dict:
        groups = sub.get("param_groups") or []
        if len(groups) != len(cur["param_groups"]) or any(
                "wd_mult" not in g and "pre_wd_mult" not in g for g in groups):
            sub = {"state": dict(sub["state"]), "param_groups": cur["param_groups"]}
            if "common_step" not in sub["state"] and steps:
                sub["state"]["common_step"] = steps[0]
        return sub

    if len(subs) == 1:
        return fit({k: v for k, v in loaded.items() if not isinstance(k, int)}, current[0])
    return {i: fit(loaded[i], current[i]) for i in range(len(subs))}


def _dicts(tree):
    """Every dict inside ``tree`` (depth first), ``tree`` included."""
    if isinstance(tree, dict):
        yield tree
        for v in tree.values():
            yield from _dicts(v)
