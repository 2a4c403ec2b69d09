#!/usr/bin/env python
"""Issue 22's decision tables from several ``mohge-bench --preset study`` results, one per
shape and corpus: MoHGE's parameter-efficiency ratio against stock with its bootstrap
interval and the answer (yes / no / undecided, with the seeds that would decide), every
arm's ratio, and the per-size loss ratios (MoHGE / ``moe_equal_total`` included).
The logic is ``megatron_mohge.bench.decision``.

    python scripts/decision_table.py "tiny / stdlib=results/decision-tiny-stdlib" \\
        "paper / stdlib=results/decision-paper-stdlib" ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megatron_mohge.bench.decision import decide, markdown


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    decisions = {}
    for item in argv:
        label, _, path = item.rpartition("=") if "=" in item else (item, "", item)
        p = Path(path)
        p = p / "results.json" if p.is_dir() else p
        if not p.is_file():
            print(f"decision_table: {p} not found (give LABEL=DIR of a study bench)",
                  file=sys.stderr)
            return 2
        results = json.loads(p.read_text())
        if not results.get("study"):
            print(f"decision_table: {p} has no study block (a --preset study bench?)",
                  file=sys.stderr)
            return 2
        decisions[label or p.parent.name] = decide(results)
    print(markdown(decisions))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
