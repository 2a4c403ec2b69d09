"""Crash-safe training checkpoints on Megatron's ``dist_checkpointing``.

Layout (Megatron-LM's names): ``<root>/iter_XXXXXXX/`` per checkpoint and
``<root>/latest_checkpointed_iteration.txt``. A save writes ``iter_XXXXXXX.tmp`` first, records
the size of every file (and the SHA-256 of every file but the tensor shards) in
``manifest.json``, renames it when every rank is done, and only then replaces the tracker file
(atomically), so an interrupted save (Ctrl-C, crash, pre-emption) leaves the previous
checkpoint as "latest". On resume the manifest finds truncated, missing or overwritten files
before ``dist_checkpointing`` trips over them; a missing tracker never means "start
over" while complete checkpoints exist; a changed model is named field by field from the
checkpoint's ``run.yaml``.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch.distributed as dist
import yaml

from megatron_mohge.compat import distopt
from megatron_mohge.config import ConfigError
from megatron_mohge.config.run import normalize_run_dict

TRACKER_FILE = "latest_checkpointed_iteration.txt"
MANIFEST_FILE = "manifest.json"  # {file name: {"bytes": n[, "sha256": hex]}}, written last
# Tensor shards are checked by size only (hashing them would read the whole checkpoint again);
# the small files dist-ckpt reads first (.metadata, common.pt, ...) by content too: a
# same-size overwrite of .metadata otherwise passes and fails inside dist-ckpt's reader.
SIZE_ONLY_SUFFIX = ".distcp"
RUN_FILE = "run.yaml"  # the RunConfig of the run that saved the checkpoint
# written by every dist_checkpointing save, read first by every load
REQUIRED_FILES = (".metadata", "common.pt")
_ITER_DIR = re.compile(r"^iter_(\d{7})$")

# Config fields (dotted prefixes) that may change between a checkpoint and the run resuming
# from it: they do not change the parameters or what they compute. Everything else under
# ``model`` and ``moe`` must match the checkpoint's run.yaml; the parallel layout
# (TP/EP/PP, dist-ckpt reshards), ``train``, ``data``, ``eval`` and the rest may change.
RESUMABLE_CHANGES = (
    "model.hidden_dropout", "model.attention_dropout", "model.init_method_std",
    "moe.token_dispatcher", "moe.use_te", "moe.aux_loss_coeff", "moe.z_loss_coeff",
    "moe.noisy_gating.importance_coeff", "moe.noisy_gating.load_coeff",
    "moe.mohge.losses", "moe.mohge.allocation", "moe.mohge.router.z_loss_coeff",
    "moe.mohge.router.input_jitter_eps", "moe.mohge.noisy_gating.importance_coeff",
    "moe.mohge.noisy_gating.load_coeff",
)  # not noisy_gating.noise: it adds or removes the noise gate weights (W_noise)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def iteration_dirs(root: Path) -> list[Path]:
    """``root``'s published ``iter_XXXXXXX`` directories, oldest first (no .tmp / .damaged)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := _ITER_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(ckpt: Path) -> None:
    """Record every file of ``ckpt`` (sizes; contents but for tensor shards), written last."""
    entries = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file():
            entry = {"bytes": p.stat().st_size}
            if not p.name.endswith(SIZE_ONLY_SUFFIX):
                entry["sha256"] = _sha256(p)
            entries[str(p.relative_to(ckpt))] = entry
    (ckpt / MANIFEST_FILE).write_text(json.dumps(entries, indent=1))


def problem(ckpt: Path) -> Optional[str]:
    """Why ``ckpt`` cannot be loaded (naming the file), or None when it looks complete: its
    dist-ckpt files exist and match the sizes (and hashes) its save recorded."""
    if not ckpt.is_dir():
        return f"{ckpt} is missing"
    for name in REQUIRED_FILES:
        if not (ckpt / name).is_file():
            return f"{ckpt / name} is missing"
    manifest = ckpt / MANIFEST_FILE
    if not manifest.is_file():  # saved before manifests existed: the required files only
        return None
    try:
        entries = json.loads(manifest.read_text())
    except ValueError:
        return f"{manifest} is not valid JSON"
    for name, entry in entries.items():
        if not isinstance(entry, dict):  # saved before hashes were recorded: {name: size}
            entry = {"bytes": entry}
        f = ckpt / name
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != entry["bytes"]:
            return f"{f} is {f.stat().st_size} bytes, its save wrote {entry['bytes']} (truncated?)"
        if "sha256" in entry and _sha256(f) != entry["sha256"]:
            return f"{f} differs from what its save wrote (its SHA-256 changed: overwritten?)"
    return None


@dataclass
class Resume:
    """Where a run resumes: ``ckpt`` (None: start from scratch) and what to tell the user."""

    ckpt: Optional[Path]
    note: str = ""


def resolve(root: Path, *, fallback: bool = False) -> Resume:
    """The checkpoint to resume from in ``root`` (rank 0 only: it may rename a damaged one).

    The tracker names the latest checkpoint; without one, the newest ``iter_*`` is taken
    (a crash between publishing a checkpoint and the tracker, or a deleted tracker) -- never
    "start over" on top of existing checkpoints. A damaged target stops the run unless
    ``fallback``; then it is renamed ``*.damaged`` and the previous complete one is used.
    """
    tracker = root / TRACKER_FILE
    dirs = iteration_dirs(root)
    note = ""
    if tracker.is_file():
        text = tracker.read_text().strip()
        if not text.isdigit():
            raise ConfigError(f"checkpoint.load: {tracker} is corrupt ({text!r}); it should hold "
                              "the iteration of the latest checkpoint")
        target = root / f"iter_{int(text):07d}"
    elif dirs:
        target = dirs[-1]
        note = (f"{tracker.name} is missing in {root}; resuming from the newest checkpoint "
                f"there, {target.name}")
    else:
        return Resume(None)
    why = problem(target)
    if why is None:
        return Resume(target, note)
    previous = [d for d in iteration_dirs(root) if d.name < target.name and problem(d) is None]
    if fallback and previous:
        if target.is_dir():
            target.rename(target.with_name(target.name + ".damaged"))
        if tracker.is_file():  # the tracker names the latest *usable* checkpoint again
            atomic_write(tracker, str(int(previous[-1].name[len("iter_"):])))
        return Resume(previous[-1], (note + "; " if note else "") +
                      f"{why}; checkpoint.fallback: resuming from the previous complete "
                      f"checkpoint {previous[-1].name} (the damaged one is now "
                      f"{target.name}.damaged)")
    if target.is_dir() or previous:
        prev = (f"The previous complete checkpoint is {previous[-1]}: add checkpoint.fallback=true "
                f"to resume from it (the damaged one is kept as {target.name}.damaged)"
                if previous else "No earlier complete checkpoint exists there")
        raise ConfigError(f"checkpoint.load: cannot resume from {target}: {why}. {prev}, or move "
                          f"{root} away to start from scratch. Nothing was overwritten.")
    raise ConfigError(f"checkpoint.load: {tracker} points at {target}, which is missing; "
                      f"fix the file, or move {root} away to start from scratch")


# Model fields added since checkpoints were first written, with the behaviour the code had
# before each existed: a run file without one was trained that way (issue 21 made another
# value the default), so resuming it under today's default is a model change. (The loss
# fields added with it need no entry: losses may change on resume, RESUMABLE_CHANGES.)
FIELDS_BEFORE_ADDED = {"moe.mohge.router.group_gradient": "none"}


def config_changes(saved: dict, current: dict) -> list[str]:
    """``model`` / ``moe`` fields that differ between a checkpoint's run.yaml (``saved``)
    and this run (``current``), as "field: saved -> current", except RESUMABLE_CHANGES.
    Fields one side does not have (another package version) are not compared; former
    spellings (``kind: moe``, ``shared_expert_hidden_size``) are read as today's on both sides."""
    saved, current = normalize_run_dict(saved), normalize_run_dict(current)
    a, b = _flatten({k: saved.get(k) for k in ("model", "moe")}), _flatten(
        {k: current.get(k) for k in ("model", "moe")})
    if any(key.startswith("moe.mohge.") for key in a):
        for key, before in FIELDS_BEFORE_ADDED.items():  # saved before the field existed
            a.setdefault(key, before)
    # a resumable loss setting, except 0 <-> > 0: that adds or removes the bias buffer
    bias, extra = "moe.mohge.losses.expert_bias_update_rate", []
    if bias in a and bias in b and ((a[bias] or 0) > 0) != ((b[bias] or 0) > 0):
        extra = [f"{bias}: {a[bias]!r} -> {b[bias]!r} (adds or removes the loss-free bias state)"]
    out = []
    for key in sorted(set(a) & set(b)):
        if a[key] != b[key] and not any(key == p or key.startswith(p + ".")
                                        for p in RESUMABLE_CHANGES):
            out.append(f"{key}: {a[key]!r} -> {b[key]!r}")
    # a section present on one side only (e.g. moe.mohge null vs a mapping)
    for key in sorted(set(a) ^ set(b)):
        parent = key.rsplit(".", 1)[0]
        if parent in a or parent in b:
            out.append(f"{parent}: {a.get(parent, '...')!r} -> {b.get(parent, '...')!r}")
    return sorted(set(out + extra))


def check_compatible(ckpt: Path, current: dict) -> None:
    """Refuse to resume ``current`` (a RunConfig dict) from ``ckpt`` if the model differs."""
    path = ckpt / RUN_FILE
    if not path.is_file():
        return
    try:
        saved = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return
    changes = config_changes(saved, current)
    if changes:
        raise ConfigError(
            f"checkpoint.load: {ckpt} holds a different model than this config (compared with "
            f"{path}): {'; '.join(changes)}. Restore these fields to resume, or set "
            "checkpoint.save / output_dir elsewhere to train the new model from scratch. "
            "(The parallel layout, train, data and eval sections may change.)")


def _flatten(tree, prefix: str = "") -> dict:
    out = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = tree
    return out


def rotate(root: Path, keep_last: int, protect: tuple[Path, ...] = ()) -> list[Path]:
    """Delete all but the ``keep_last`` newest checkpoints (rank 0), never one in ``protect``
    (the checkpoint this run resumed from); 0 keeps everything. Returns the deleted ones."""
    if keep_last <= 0:
        return []
    keep = {p.resolve() for p in protect}
    dirs = iteration_dirs(root)
    gone = []
    for d in dirs[:-keep_last]:
        if d.resolve() in keep:
            continue
        # renamed first: a crash half-way never leaves a half-deleted "complete" checkpoint
        trash = d.with_name(d.name + ".deleting")
        os.replace(d, trash)
        shutil.rmtree(trash)
        gone.append(d)
    return gone


def save(state: dict, root: Path, iteration: int, *, fully_parallel: bool = False,
         files: Optional[dict] = None) -> Path:
    """Save the sharded ``state`` as iteration ``iteration`` (collective). ``files``: extra
    ``{name: text}`` written into the checkpoint directory by rank 0 (e.g. the run config)."""
    final = root / f"iter_{iteration:07d}"
    tmp = root / f"iter_{iteration:07d}.tmp"
    if dist.get_rank() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)  # left over from an interrupted save
        tmp.mkdir(parents=True)
    dist.barrier()
    dist_save(state, tmp, fully_parallel=fully_parallel)
    if dist.get_rank() == 0:
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        write_manifest(tmp)
        if final.exists():  # only after checkpoint.fallback re-trains past a damaged one
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write(root / TRACKER_FILE, str(iteration))
    dist.barrier()
    return final


# ------------------------------------------------------------------ dist-ckpt I/O (one place)
def dist_save(state: dict, directory: Path, *, fully_parallel: bool = False) -> None:
    """``dist_checkpointing.save`` of a sharded ``state`` into the (existing, empty)
    ``directory``, plus the legacy common file both megatron-core lines read (collective)."""
    from megatron.core import dist_checkpointing

    from megatron_mohge.compat.mcore import write_legacy_common

    dist_checkpointing.save(state, str(directory), save_strategy(fully_parallel))
    write_legacy_common(directory)  # loadable by megatron-core 0.16 and 0.19 (collective)


def dist_load(template: dict, directory: Path, *, fully_parallel: bool = False) -> dict:
    """``dist_checkpointing.load`` into the structure of sharded ``template`` (any TP / EP /
    PP layout: dist-ckpt reshards)."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load(template, str(directory),
                                   load_strategy(directory, fully_parallel))


def save_strategy(fully_parallel: bool):
    """dist-ckpt save strategy: ``None`` (default) or the writes spread over the DP ranks
    (``FullyParallelSaveStrategyWrapper``, Megatron-LM's default)."""
    if not fully_parallel:
        return None
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

    return FullyParallelSaveStrategyWrapper(
        get_default_save_sharded_strategy(),
        ps.get_data_parallel_group(with_context_parallel=True))


def load_strategy(directory: Path, fully_parallel: bool):
    """dist-ckpt load strategy: ``None`` (default) or each shard read by one DP rank and
    exchanged (``FullyParallelLoadStrategyWrapper``)."""
    if not fully_parallel:
        return None
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper,
    )

    return FullyParallelLoadStrategyWrapper(
        get_default_load_sharded_strategy(str(directory)),
        ps.get_data_parallel_group(with_context_parallel=True))


#: ``optimizer.sharded_state_dict`` metadata of every save and load. No ``chained_<i>.`` key
#: prefix: optimizer states are keyed by their parameter, so a checkpoint saved at EP>1 (dense +
#: expert optimizers) loads at EP=1. The distributed optimizer writes ``fully_reshardable``
#: (Megatron-LM's ``--dist-ckpt-optim-fully-reshardable``): its states in model space, keyed
#: and sharded like the parameters, so they reshard across TP / EP / PP and expert backends as
#: the weights do. (``dp_reshardable``, Megatron-LM's default, stores the flat DP buffers and
#: loads only into the same model-parallel layout and backend; megatron-core's own default,
#: ``fully_sharded_model_space``, is rejected by its ShardedTensor in 0.16 and 0.19.)
OPTIMIZER_METADATA = {"chained_optim_avoid_prefix": True,
                      "distrib_optim_sharding_type": "fully_reshardable"}


def optimizer_sharded_state_dict(optimizer, model_sharded_state_dict: dict, *,
                                 is_loading: bool) -> dict:
    """The optimizer's part of a checkpoint (states keyed by the model's sharded tensors)."""
    if is_loading:
        # torch Adam (no Apex / TE): Megatron's load wrapped with the fixes of compat.distopt,
        # the one mechanism Megatron's own loop uses too (idempotent). The states to load into
        # are created for every inner optimizer, Apex / TE Adam included, as before.
        distopt.install_load_fixes()
        distopt.init_states_for_load(optimizer)
    return optimizer.sharded_state_dict(model_sharded_state_dict, is_loading=is_loading,
                                        metadata=dict(OPTIMIZER_METADATA))


def restore_optimizer(optimizer, loaded: dict) -> None:
    """Load a checkpoint's optimizer part into ``optimizer`` (after the model weights)."""
    distopt.install_load_fixes()  # as in optimizer_sharded_state_dict (idempotent)
    fitted = fit_optimizer_state(loaded, optimizer)
    chained = getattr(optimizer, "chained_optimizers", None) or [optimizer]
    parts = [fitted[i] for i in range(len(chained))] if len(chained) > 1 else [fitted]
    # Distributed-optimizer param states: loaded after the rest (torch Adam's steps hidden
    # meanwhile and one step tensor per parameter: compat.distopt's wrappers)
    deferred = [(sub, part.pop("param_state")) for sub, part in zip(chained, parts)
                if part.pop("param_state_sharding_type", None) == "fully_reshardable"]
    optimizer.load_state_dict(fitted)
    for sub, param_state in deferred:
        sub.load_parameter_state_from_fully_reshardable(param_state)
    # The optimizer's fp32 main params (fp16/bf16 runs) follow the loaded model weights.
    if hasattr(optimizer, "reload_model_params"):
        optimizer.reload_model_params()


def fit_optimizer_state(loaded, optimizer):
    """Make a loaded optimizer state match this run's optimizer structure.

    Megatron builds one Adam for EP=1 and a chained (dense + expert) pair for EP>1. The
    per-parameter tensors reshard by key (saved without the ``chained_<i>.`` prefix) and come
    back in this run's structure, but the non-sharded part is saved under the saving run's
    structure: after an EP change the param groups come back as bare ``{'params': [...]}``
    lists (``LocalNonpersistentObject``) or under the other layout's ``0``/``1`` keys, and
    ``load_state_dict`` fails. Take the groups from the live optimizer instead (the LR and
    weight decay in them are set by the scheduler every step). Adam's step count travels in
    ``state['common_step']`` (Megatron's optimizers) or in the param groups (the distributed
    optimizer, whose groups sit under ``['optimizer']`` next to its ``param_state``).
    """
    chained = getattr(optimizer, "chained_optimizers", None)
    subs = chained if chained is not None and len(chained) > 1 else [optimizer]
    current = [copy.deepcopy(o.state_dict()) for o in subs]
    # the step count is common (non-sharded) state, saved under the old layout's structure
    steps = [d["state"]["common_step"] for d in _dicts(loaded)
             if isinstance(d.get("state"), dict) and "common_step" in d["state"]]
    group_steps = [g["step"] for d in _dicts(loaded) for g in _groups(d) if "step" in g]
    scalers = [d["grad_scaler"] for d in _dicts(loaded) if "grad_scaler" in d]

    def groups_fit(groups: list, cur_groups: list) -> bool:
        return len(groups) == len(cur_groups) and all(
            "wd_mult" in g or "pre_wd_mult" in g for g in groups)

    def fit(sub: dict, cur: dict) -> dict:
        groups = sub.get("param_groups") or []
        if not groups_fit(groups, cur["param_groups"]):
            sub = {"state": dict(sub["state"]), "param_groups": cur["param_groups"]}
            if "common_step" not in sub["state"] and steps:
                sub["state"]["common_step"] = steps[0]
        return sub

    def fit_distributed(sub: dict, cur: dict) -> dict:
        out = {"param_state": sub["param_state"],
               # the sharded param_state was loaded in this run's (the template's) format
               "param_state_sharding_type": OPTIMIZER_METADATA["distrib_optim_sharding_type"],
               "optimizer": sub.get("optimizer") or {}}
        if not groups_fit(out["optimizer"].get("param_groups") or [],
                          cur["optimizer"]["param_groups"]):
            groups = copy.deepcopy(cur["optimizer"]["param_groups"])
            for g in groups:
                if group_steps:
                    g["step"] = group_steps[0]
            out["optimizer"] = {**cur["optimizer"], "param_groups": groups}
        if "grad_scaler" in cur:
            out["grad_scaler"] = sub.get("grad_scaler", scalers[0] if scalers else
                                         cur["grad_scaler"])
        return out

    def fit_any(sub: dict, cur: dict) -> dict:
        return fit_distributed(sub, cur) if "param_groups" in cur.get("optimizer", {}) \
            else fit(sub, cur)

    if len(subs) == 1:
        return fit_any({k: v for k, v in loaded.items() if not isinstance(k, int)}, current[0])
    return {i: fit_any(loaded[i], current[i]) for i in range(len(subs))}


def _groups(d: dict) -> list:
    groups = d.get("param_groups")
    return [g for g in groups if isinstance(g, dict)] if isinstance(groups, list) else []


def _dicts(tree):
    """Every dict inside ``tree`` (depth first), ``tree`` included."""
    if isinstance(tree, dict):
        yield tree
        for v in tree.values():
            yield from _dicts(v)
