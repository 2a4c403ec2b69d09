"""Run-safety steps of ``mohge-train`` before it trains: folder locks, picking the checkpoint
to resume from (the same answer or error on every rank), refusing to write over another
run's checkpoints, and a one-paragraph error when a checkpoint cannot be read.

Every function is collective (all ranks call it); rank 0 decides and broadcasts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from megatron_mohge.config import ConfigError
from megatron_mohge.training import checkpoint as ckpt_lib
from megatron_mohge.training import mcore_plumbing as M


def take_locks(run, rank: int, log: Callable) -> list:
    """Rank 0 locks the output folder (and the checkpoint folder when it lies outside): a
    second run into them stops here, on every rank, before writing anything. Returns the
    locks held (rank 0) for :func:`release_locks`."""
    from megatron_mohge.training.lock import FolderLock

    locks, error = [], None
    if rank == 0:
        folders = [run.out_dir]
        save = run.save_dir
        if run.checkpoint.enabled and not inside(save, run.out_dir):
            folders.append(save)
        try:
            for folder in folders:
                lock = FolderLock(folder, "mohge-train").acquire()
                locks.append(lock)
                if lock.stale:
                    log(f"note: {lock.stale}")
        except ConfigError as exc:
            error = str(exc)
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        release_locks(locks)
        raise ConfigError(box[0])
    return locks


def release_locks(locks: list) -> None:
    for lock in locks:
        lock.release()
    locks.clear()


def resolve_checkpoint(run, rank: int, root: Path, log: Callable) -> Optional[Path]:
    """Rank 0 picks the checkpoint (it may rename a damaged one) and every rank gets the
    same answer, or the same error; a changed model is refused before loading."""
    result = [None, None]
    if rank == 0:
        try:
            resume = ckpt_lib.resolve(root, fallback=run.checkpoint.fallback)
            if resume.ckpt is not None:
                ckpt_lib.check_compatible(resume.ckpt, run.to_dict())
            if resume.note:
                log(f"note: {resume.note}")
            result = [str(resume.ckpt) if resume.ckpt else None, None]
        except ConfigError as exc:
            result = [None, str(exc)]
    dist.broadcast_object_list(result, src=0)
    if result[1] is not None:
        raise ConfigError(result[1])
    return Path(result[0]) if result[0] else None


def check_save_dir_free(run, load_dir: Path) -> None:
    """Resuming from ``checkpoint.load`` must not write over another run's checkpoints
    in ``checkpoint.save`` (a re-run of the same command should resume from there)."""
    save = run.save_dir
    if not run.checkpoint.enabled or load_dir.resolve() == save.resolve():
        return
    existing = ckpt_lib.iteration_dirs(save)
    if existing:
        raise ConfigError(
            f"checkpoint.save: {save} already holds checkpoints ({existing[-1].name}); "
            f"starting from checkpoint.load={load_dir} would write over them. To continue "
            "the run saved there, drop checkpoint.load (it resumes from checkpoint.save); "
            "to start another run, set checkpoint.save or output_dir elsewhere.")


def load_checked(template: Callable[[], dict], ckpt: Path, rank: int, *,
                 fully_parallel: bool) -> dict:
    """``ckpt_lib.dist_load`` into ``template()`` with a one-paragraph error instead of
    dist-ckpt's traceback (building the template included; the failure is shared so that no
    rank trains on while another one stopped)."""
    state, error = None, None
    try:
        state = ckpt_lib.dist_load(template(), ckpt, fully_parallel=fully_parallel)
    # CheckpointException (torch.distributed.checkpoint: e.g. unreadable .metadata) derives
    # from BaseException, not Exception
    except (Exception, CheckpointException) as exc:  # noqa: BLE001 - named, not a traceback
        if isinstance(exc, CheckpointException) and exc.failures:  # the reader's own error
            exc = next(iter(exc.failures.values()))[0]
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]
        error = (f"checkpoint.load: reading {ckpt} failed on rank {rank}: "
                 f"{type(exc).__name__}: {first}. The checkpoint is damaged or was saved by "
                 f"an incompatible model; to resume from the previous complete checkpoint, "
                 f"rename it {ckpt.name}.damaged and add checkpoint.fallback=true.")
    errors = [e for e in M.all_gather_object(error) if e]
    if errors:
        raise ConfigError(errors[0])
    return state


def inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False
