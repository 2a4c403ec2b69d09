"""Where a benchmark ran: library versions, Python, CPU count and device (``results.json``'s
``env``; ``mohge-bench`` and the GPU check both record it)."""

from __future__ import annotations

import os
import platform


def environment() -> dict:
    """The software and machine a benchmark ran on (recorded in its ``results.json``)."""
    import torch  # here, not at the top: mohge-bench --help stays fast

    try:
        from importlib.metadata import version

        mcore = version("megatron-core")
    except Exception:  # pragma: no cover - metadata missing
        mcore = None
    return {"torch": torch.__version__, "megatron_core": mcore, "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
