"""Process hygiene of a training rank: no orphans, no silent hangs.

* **Children die with their rank.** ``dist_checkpointing``'s file writer keeps a
  ``multiprocessing`` Manager (a spawned server process, 0.3-0.6 GB) for its write results
  for the life of the rank; spawning it also starts multiprocessing's resource tracker. On
  megatron-core 0.16 the writer also forks worker processes per save (0.19 writes from
  threads of the rank). Killed with SIGKILL, the rank leaves them sleeping forever. Every
  child forked from the main thread and the Manager get ``PR_SET_PDEATHSIG``: the kernel
  kills them when the rank dies, however it dies; the resource tracker then exits on its
  own (it lives until the last holder of its pipe, the rank or the Manager, is gone).
* **A dead peer is named.** A rank whose collective fails because another rank's process
  went away (gloo: "Connection reset by peer") says which rank stopped beating, in one line.
* **A stalled rank fails the job.** The process groups get ``parallel.collective_timeout_s``;
  each rank also beats a heartbeat counter in the job's rendezvous store from a thread, so
  a rank whose collective timed out can name the ranks that stopped beating (SIGSTOP, a
  hung device, a frozen node) instead of only "timed out".
* **SIGTERM stops the run** (torchrun stopping the job, Slurm pre-emption) as Ctrl-C does,
  even when the interrupt lands in a finaliser, where Python only prints it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
from typing import Optional

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
# Set by the SIGTERM handler. Its KeyboardInterrupt can be raised inside a finaliser
# (``__del__``, a weakref callback: frequent around checkpoint saves), where Python prints
# "Exception ignored" and drops it; the training loop checks this at every step.
_stop_requested = threading.Event()
_installed = False
_fork_from_main = False  # set in the parent just before each fork, read by the child


def sigterm_as_interrupt() -> None:
    """SIGTERM ends the run as Ctrl-C does: Python unwinds, the folder lock is released and
    the checkpoint writers exit with the rank; a save in progress is left as an ignored
    ``.tmp`` directory. If the interrupt is lost, :func:`raise_if_stop_requested` raises it
    again at the next step."""
    import sys

    def handler(signum, frame):
        _stop_requested.set()
        raise KeyboardInterrupt

    stock_hook = sys.unraisablehook

    def unraisable(info):  # the dropped interrupt: no "Exception ignored" traceback
        if not (isinstance(info.exc_value, KeyboardInterrupt) and _stop_requested.is_set()):
            stock_hook(info)

    _stop_requested.clear()
    if not getattr(sys.unraisablehook, "__mohge__", False):
        unraisable.__mohge__ = True
        sys.unraisablehook = unraisable
    signal.signal(signal.SIGTERM, handler)


def raise_if_stop_requested() -> None:
    """Raise the KeyboardInterrupt of a SIGTERM whose first one was swallowed."""
    if _stop_requested.is_set():
        raise KeyboardInterrupt


def die_with_parent(parent_pid: Optional[int] = None) -> None:
    """Have the kernel SIGKILL this process when its parent dies (Linux; no-op elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return
    except (OSError, AttributeError):  # not Linux
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)  # the parent died before prctl took effect


def _before_fork() -> None:
    global _fork_from_main
    _fork_from_main = threading.current_thread() is threading.main_thread()


def _after_fork_in_child(parent_pid: int) -> None:
    # PDEATHSIG fires when the *thread* that forked exits: only for forks from the main
    # thread, which lives as long as the rank (a worker thread's fork would die with it)
    if _fork_from_main and os.getppid() == parent_pid:
        die_with_parent(parent_pid)


def install_child_reaper() -> None:
    """Make the rank's future children (forked writers, the writers' results Manager) die
    with it. Idempotent; call once per rank before the first checkpoint save."""
    global _installed
    if _installed:
        return
    _installed = True
    pid = os.getpid()
    os.register_at_fork(before=_before_fork,
                        after_in_child=lambda: _after_fork_in_child(pid))
    _own_writer_results_queue(pid)


#: The function filling ``filesystem_async._results_queue`` on first use: private in
#: megatron-core 0.16, public (with an ``mp_mode`` argument) in 0.19; both read the global.
_RESULTS_QUEUE_FACTORIES = ("_get_write_results_queue", "get_write_results_queue")


def _own_writer_results_queue(pid: int) -> None:
    """Start the dist-ckpt writers' results Manager ourselves, with PDEATHSIG. It is spawned
    (fork + exec, which skips the at-fork hooks), so it needs the Manager's initializer;
    megatron-core keeps it in the module global ``_results_queue`` (checked by shape)."""
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async as fsa
    except ImportError:
        return
    if getattr(fsa, "_results_queue", "absent") is not None or not any(
            hasattr(fsa, name) for name in _RESULTS_QUEUE_FACTORIES):
        return  # another megatron-core layout, or already created
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=die_with_parent, initargs=(pid,))
    fsa._results_queue = manager.Queue()
    fsa._mohge_manager = manager  # keep it referenced for the life of the rank


class Heartbeat:
    """A daemon thread incrementing ``mohge/heartbeat/<rank>`` in the rendezvous store every
    ``interval`` seconds, with the phase the rank is in (``step 12``, ``checkpoint save ...``).
    A rank stopped as a whole (SIGSTOP, a frozen node) stops beating; one stuck inside a
    CUDA call usually keeps beating (the GIL is released) and is reported as alive."""

    PREFIX = "mohge/heartbeat/"

    def __init__(self, store, rank: int, world: int, interval: float = 2.0):
        self.store, self.rank, self.world, self.interval = store, rank, world, interval
        self._phase = "start"
        self._beats = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mohge-heartbeat", daemon=True)
        self._thread.start()

    @property
    def phase(self) -> str:
        return self._phase

    @phase.setter
    def phase(self, value: str) -> None:
        """Written through at once (one small store write per step), so that a rank that
        stops is reported in the phase it stopped in, not the one of its last beat."""
        self._phase = value
        self._beat(count=False)

    def _beat(self, count: bool = True) -> bool:
        if count:
            self._beats += 1
        try:  # the store client is thread safe (c10d serialises its requests)
            self.store.set(f"{self.PREFIX}{self.rank}", f"{self._beats} {self._phase}")
            return True
        except Exception:  # the store is gone: the job is ending
            return False

    @classmethod
    def start(cls, interval: float = 2.0) -> Optional["Heartbeat"]:
        """On the default process group's store (None when there is no store to use)."""
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_world_size() == 1:
            return None
        try:  # private accessor of the default group's store; degrade to no heartbeat
            store = dist.distributed_c10d._get_default_store()
        except (AttributeError, RuntimeError):
            return None
        return cls(store, dist.get_rank(), dist.get_world_size(), interval)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if not self._beat():
                return

    def stop(self) -> None:
        self._stop.set()

    def _read(self) -> dict:
        out = {}
        for r in range(self.world):
            key = f"{self.PREFIX}{r}"
            if self.store.check([key]):
                beats, _, phase = self.store.get(key).decode().partition(" ")
                out[r] = (int(beats), phase)
        return out

    def stalled(self, wait: Optional[float] = None) -> Optional[dict]:
        """{rank: phase} of the ranks whose counter did not move over ``wait`` seconds (3
        beats); None when the store does not answer within that time either."""
        wait = 3 * self.interval if wait is None else wait
        result: dict = {}

        def probe():
            first = self._read()
            time.sleep(wait)
            second = self._read()
            result["v"] = {r: second.get(r, first.get(r, (0, "not started")))[1]
                           for r in range(self.world)
                           if r != self.rank and second.get(r, (0,))[0] == first.get(r, (0,))[0]}

        t = threading.Thread(target=probe, daemon=True)
        t.start()
        t.join(wait + 10.0)
        return result.get("v")


def is_timeout(exc: BaseException) -> bool:
    """A collective that gave up waiting (gloo: "Timed out waiting", NCCL watchdog: "timeout")."""
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


#: How a collective reports that a peer process is gone (killed, crashed, its node lost):
#: gloo's socket errors, NCCL's remote error.
_PEER_LOST = ("connection reset by peer", "connection closed by peer", "broken pipe",
              "remote process exited", "ncclremoteerror")


def is_peer_lost(exc: BaseException) -> bool:
    """A collective that failed because another rank's process went away."""
    text = str(exc).lower()
    return any(s in text for s in _PEER_LOST)


def peer_lost_message(exc: BaseException, heartbeat: Optional[Heartbeat], rank: int,
                      phase: str) -> str:
    """One line for a rank whose collective lost a peer: the heartbeat names the rank that
    stopped beating (a dead process never beats again)."""
    stalled = heartbeat.stalled() if heartbeat is not None else None
    if stalled:
        who = ", ".join(f"rank {r} (last seen in {p})" for r, p in sorted(stalled.items()))
        who = f"{who} died or lost its connection"
    else:
        who = "another rank died or lost its connection (which one is unknown)"
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    return (f"rank {rank}: a collective in {phase} failed: {who}. The job stops; resume from "
            f"the latest checkpoint. ({first})")


def timeout_message(exc: BaseException, heartbeat: Optional[Heartbeat], rank: int,
                    phase: str, timeout_s: float) -> str:
    stalled = heartbeat.stalled() if heartbeat is not None else None
    if stalled:
        who = "; ".join(f"rank {r} stopped responding (last seen in {p})"
                        for r, p in sorted(stalled.items()))
    elif stalled is None and heartbeat is not None:
        who = "the rendezvous store did not answer, so the stalled rank is unknown"
    else:
        who = "every other rank is alive (a mismatched collective, or one rank far slower)"
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
    return (f"rank {rank}: a collective in {phase} waited longer than "
            f"parallel.collective_timeout_s={timeout_s:g} s: {who}. The job stops; resume "
            f"from the latest checkpoint. ({first})")
