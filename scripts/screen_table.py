#!/usr/bin/env python
"""The router screen's arms x corpora table from several ``mohge-bench --preset screen``
results: held-out loss of every arm / stock (``moe``), / the pre-screen MoHGE
(``mohge_today``), / the equal-routed-params stock control and / the shipped defaults
(``mohge``: the coefficient sweeps' reference), paired by seed, mean and Student-t 95% interval, with the routing
diagnostics that say why. Only seeds an arm shares with its reference are paired.

    python scripts/screen_table.py stdlib=results/screen-stdlib docs=results/screen-pydocs ...
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megatron_mohge.bench.decision import loss_ratio


def ratio_text(results: dict, arm: str, ref: str) -> str:
    r = loss_ratio(results["runs"], arm, ref)
    if r is None:
        return "—"
    ci = f" [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]" if r["ci"] else ""
    return f"{r['mean']:.3f}{ci} ({len(r['seeds'])})"


def diagnostics_text(results: dict, arm: str) -> str:
    run = results["runs"].get(arm, {})
    d = (run.get("routing_diagnostics") or {}).get("mean") or {}
    stock = ((results["runs"].get("moe", {}).get("routing_diagnostics") or {}).get("mean")
             or {})
    if not d:
        return "—"
    cv, cv_stock = d.get("expert_load_cv_first_half"), stock.get("expert_load_cv_first_half")
    cv_ratio = f"{cv / cv_stock:.1f}x" if cv and cv_stock else "—"
    def fmt(key: str, spec: str) -> str:
        return "—" if d.get(key) is None else format(d[key], spec)

    return " / ".join([fmt("same_group_fraction", ".2f"), fmt("gate_grad_ratio", ".2g"),
                       fmt("max_group_share", ".2f"), fmt("ingroup_max_prob", ".2f"), cv_ratio])


# each arm's loss is paired with these (mohge: the shipped defaults, for the sweep arms)
REFERENCES = ("moe", "mohge_today", "moe_equal_total", "mohge")


def table(corpora: dict[str, dict]) -> str:
    """One table per corpus: arms x (loss / each reference, diagnostics)."""
    out = []
    for corpus, results in corpora.items():
        head = (["arm"] + [f"loss / `{r}`" for r in REFERENCES]
                + ["same-group / gate grad g:e / max group / in-group max p / load CV 1st half "
                   "vs stock"])
        lines = [f"**{corpus}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for arm in results["runs"]:
            cells = [f"`{arm}`"] + [ratio_text(results, arm, r) for r in REFERENCES]
            lines.append("| " + " | ".join(cells + [diagnostics_text(results, arm)]) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    corpora = {}
    for item in argv:
        name, _, path = item.partition("=")
        p = Path(path or name)
        p = p / "results.json" if p.is_dir() else p
        corpora[name if path else p.parent.name] = json.loads(p.read_text())
    print(table(corpora))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
