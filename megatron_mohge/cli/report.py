"""``python -m megatron_mohge.cli.report results.json [--out DIR]``: ``results.md`` and the
PNG plots of a benchmark's ``results.json`` (:mod:`megatron_mohge.bench.report`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional

from megatron_mohge.bench.report import write_report
from megatron_mohge.cli.common import main_status
from megatron_mohge.config import ConfigError


def main(argv: Optional[list] = None) -> dict[str, Path]:
    p = argparse.ArgumentParser(prog="python -m megatron_mohge.cli.report",
                                description="Markdown report and plots from results.json")
    p.add_argument("results", type=Path, help="results.json of the end-to-end benchmark")
    p.add_argument("--out", type=Path, help="output folder (default: the JSON's folder)")
    args = p.parse_args(argv)
    try:
        results = json.loads(args.results.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{args.results}: cannot read the benchmark results ({exc}); give "
                          "the results.json a mohge-bench run wrote") from exc
    paths = write_report(results, args.out or args.results.parent)
    for p_ in paths.values():
        print(p_)
    return paths


def cli(argv: Optional[list] = None) -> int:
    """``main`` as a command: an unreadable results file is one line and exit status 2."""
    return main_status("python -m megatron_mohge.cli.report", main, argv)


if __name__ == "__main__":
    sys.exit(cli())
