"""Which checkpoint a ``CHECKPOINT`` argument means, and its run file (``mohge-export-hf``,
``mohge-eval``).

``CHECKPOINT`` may be one iteration's folder (``.../iter_0000300``), a checkpoint root
(``checkpoint.save``: the tracker / ``iter_*`` folders; its newest complete checkpoint, as
``mohge-train`` resumes) or a run's output folder (its ``checkpoints/``). Read-only: a damaged
checkpoint is named, never renamed. Every problem is a one-line ``ConfigError`` naming the
file and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

from megatron_mohge.config import ConfigError
from megatron_mohge.training import checkpoint as ckpt_lib


@dataclass
class Source:
    ckpt: Path  # the iteration folder
    run: object  # its RunConfig
    run_file: Path


def _root_of(path: Path) -> Optional[Path]:
    """The checkpoint root ``path`` is or holds (None: neither)."""
    for cand in (path, path / "checkpoints"):
        if (cand / ckpt_lib.TRACKER_FILE).is_file() or ckpt_lib.iteration_dirs(cand):
            return cand
    return None


def resolve_checkpoint(path, iteration: Optional[int] = None) -> Path:
    """The iteration folder ``path`` names (see the module docstring), checked complete."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"CHECKPOINT: {path} does not exist")
    if (path / ".metadata").is_file() or path.name.startswith("iter_"):
        ckpt = path
        if iteration is not None and ckpt.name != f"iter_{iteration:07d}":
            raise ConfigError(f"--iteration {iteration}: {path} is the folder of another "
                              "iteration; give the checkpoint root instead")
    else:
        root = _root_of(path)
        if root is None:
            raise ConfigError(f"CHECKPOINT: {path} holds no Megatron checkpoint (no "
                              f"{ckpt_lib.TRACKER_FILE}, iter_* folders or checkpoints/); give "
                              "a run's output folder, its checkpoint folder or one iter_* folder")
        if iteration is not None:
            ckpt = root / f"iter_{iteration:07d}"
            if not ckpt.is_dir():
                have = ", ".join(d.name for d in ckpt_lib.iteration_dirs(root)) or "none"
                raise ConfigError(f"--iteration {iteration}: {ckpt} does not exist (saved "
                                  f"iterations: {have})")
        else:
            ckpt = ckpt_lib.resolve(root, fallback=False).ckpt
            if ckpt is None:
                raise ConfigError(f"CHECKPOINT: {root} holds no checkpoint yet")
    return ckpt


def check_complete(ckpt: Path, run_file_given: bool) -> None:
    """The files the checkpoint's save recorded are all there, at their sizes (its run file
    may be absent when another one is given)."""
    why = ckpt_lib.problem(ckpt)
    if why is not None and not (run_file_given and why == f"{ckpt / ckpt_lib.RUN_FILE} is missing"):
        raise ConfigError(f"CHECKPOINT: cannot read {ckpt}: {why}")


def load_run_file(ckpt: Path, run_file=None):
    """(RunConfig, path) of the run that saved ``ckpt``: ``run_file`` when given (e.g. for a
    ``mohge-pretrain`` checkpoint), else ``ckpt/run.yaml`` as ``mohge-train`` writes it."""
    from megatron_mohge.config.run import RunConfig

    path = Path(run_file) if run_file else ckpt / ckpt_lib.RUN_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: run file missing; pass the run's YAML with --config "
                          "(mohge-train saves it beside each checkpoint as run.yaml)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: not valid YAML ({first})") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a run mapping, got {type(data).__name__}")
    try:
        return RunConfig.from_dict(data, base_dir=path.parent), path
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def open_source(path, *, iteration: Optional[int] = None, run_file=None) -> Source:
    ckpt = resolve_checkpoint(path, iteration)
    run, rf = load_run_file(ckpt, run_file)  # first: a missing run file says --config
    check_complete(ckpt, run_file is not None)
    return Source(ckpt, run, rf)
