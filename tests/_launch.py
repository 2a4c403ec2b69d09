"""Run a test worker script under torchrun with gloo on CPU and collect its JSON result.

Workers are real multi-process jobs (one OS process per rank) so that EP/TP/PP groups are
real torch.distributed process groups, exactly as on a cluster.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORKERS = Path(__file__).resolve().parent / "workers"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_workers(script: str, nproc: int, *args: str, timeout: float = 900,
                python: str = sys.executable) -> dict:
    """Launch ``tests/workers/<script>`` on ``nproc`` ranks; return rank 0's JSON result.

    ``python``: the interpreter (another venv's, e.g. the other megatron-core line's).

    The worker receives ``--out PATH`` and must write its result there from rank 0.
    On failure the combined output of all ranks is raised with the exit code.
    """
    with tempfile.TemporaryDirectory(prefix="mohge-dist-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [
            python, "-m", "torch.distributed.run",
            f"--nproc-per-node={nproc}", "--nnodes=1",
            "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
            str(WORKERS / script), "--out", str(out), "--tmp", tmp, *args,
        ]
        env = dict(os.environ)
        # 2 cores shared by up to 4 ranks: one intra-op thread each avoids oversubscription.
        env.update(OMP_NUM_THREADS="1", PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}",
                   PYTHONWARNINGS="ignore", TORCH_CPP_LOG_LEVEL="ERROR")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                              cwd=str(REPO))
        if proc.returncode != 0 or not out.exists():
            tail = (proc.stdout + proc.stderr)[-12000:]
            raise RuntimeError(f"{script} on {nproc} ranks failed (exit {proc.returncode}):\n{tail}")
        return json.loads(out.read_text())
