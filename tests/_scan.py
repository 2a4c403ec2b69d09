"""Text scans of the package's modules, for tests that pin a fact to its one home."""

from __future__ import annotations

import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "megatron_mohge"


def package_hits(patterns, skip=()) -> list[str]:
    """``"module: pattern"`` for every package module (paths relative to the package, those
    in ``skip`` left out) whose text matches one of the regular expressions ``patterns``."""
    hits = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel not in skip:
            text = path.read_text()
            hits += [f"{rel}: {p}" for p in patterns if re.search(p, text)]
    return hits
