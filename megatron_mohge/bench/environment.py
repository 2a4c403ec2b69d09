"""Where a benchmark ran: library versions, Python, CPU count, device and the code's git
commit (``results.json``'s ``env``; ``mohge-bench`` and the GPU check both record it)."""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def environment() -> dict:
    """The software and machine a benchmark ran on (recorded in its ``results.json``)."""
    import torch  # here, not at the top: mohge-bench --help stays fast

    try:
        from importlib.metadata import version

        mcore = version("megatron-core")
    except Exception:  # pragma: no cover - metadata missing
        mcore = None
    # The code's git commit (null outside a git checkout of this package, e.g. a wheel install;
    # "dirty": tracked files differ from it), so every figure traces to the code that made it.
    repo, commit, dirty = Path(__file__).resolve().parents[2], None, None
    try:
        git = ["git", "-C", str(repo)]
        top = subprocess.run([*git, "rev-parse", "--show-toplevel"], capture_output=True,
                             text=True, timeout=30)
        if top.returncode == 0 and Path(top.stdout.strip()).resolve() == repo:
            commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=30, check=True).stdout.strip()
            dirty = bool(subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                                        capture_output=True, text=True, timeout=30,
                                        check=True).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"torch": torch.__version__, "megatron_core": mcore, "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "commit": commit, "dirty": dirty}
