"""One writer per folder: an exclusive lock on a run's output folder.

``flock`` on ``<folder>/.mohge.lock``: the kernel drops it when the holder exits or crashes
(kill -9 included), so there is nothing to clean up by hand. A clean exit also deletes the
file, so a lock file found *unlocked* was left by a process that died: it is reported and
taken over. The file records who holds it (tool, pid, host, start time, command) for the
error message of the second writer. flock is per host on most network file systems: start
jobs writing into one shared folder from one host (rank 0 takes the lock).
"""

from __future__ import annotations

import atexit
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from megatron_mohge.config import ConfigError

LOCK_FILE = ".mohge.lock"


class FolderBusy(ConfigError):
    """Another live process holds the folder's lock."""


class FolderLock:
    """Exclusive lock on ``folder`` for ``tool``; ``stale`` describes a dead previous holder."""

    def __init__(self, folder: Path, tool: str):
        self.folder, self.tool = Path(folder), tool
        self.path = self.folder / LOCK_FILE
        self.fd: Optional[int] = None
        self.stale: Optional[str] = None

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read(fd)
                os.close(fd)
                raise FolderBusy(
                    f"{self.folder} is in use by {describe(holder)} (lock file {self.path}); "
                    "two writers would corrupt each other's checkpoints and results. Wait for "
                    "it to finish or stop it, or write to another folder.") from None
            # the holder may have released and deleted the file between our open and flock:
            # then we locked an unlinked inode, so start again on the current file
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read(fd)
        if previous:
            self.stale = (f"{self.path} was left by {describe(previous)}, which is no longer "
                          "running (it crashed or was killed); taking the folder over")
        record = dict(tool=self.tool, pid=os.getpid(), host=socket.gethostname(),
                      started=time.strftime("%Y-%m-%d %H:%M:%S %Z"), argv=sys.argv)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self.fd = fd
        atexit.register(self.release)  # an exception unwinding to exit also deletes the file
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink()  # while still locked: a waiting opener re-checks the inode
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def describe(holder: Optional[dict]) -> str:
    if not holder:
        return "another process"
    cmd = " ".join(holder.get("argv") or [])
    return (f"{holder.get('tool', '?')} (pid {holder.get('pid')} on {holder.get('host')}, "
            f"started {holder.get('started')}{', ' + cmd if cmd else ''})")


def _read(fd: int) -> Optional[dict]:
    try:
        data = os.pread(fd, 1 << 16, 0)
        return json.loads(data) if data.strip() else None
    except (OSError, ValueError):
        return {"tool": "unknown (unreadable lock file)"}
