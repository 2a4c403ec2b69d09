"""``python -m megatron_mohge.cli.lm_eval_task DATA.jsonl TASK_DIR``: write the
lm-eval-harness task of :mod:`megatron_mohge.evaluation.lm_eval_task` for a held-out file."""

from __future__ import annotations

import sys

from megatron_mohge.config import ConfigError
from megatron_mohge.evaluation.lm_eval_task import write_task
from megatron_mohge.util.usage_errors import print_error


def main(argv=None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 2:
        return print_error("lm_eval_task", "usage: python -m "
                                  "megatron_mohge.evaluation.lm_eval_task DATA.jsonl TASK_DIR")
    try:
        print(write_task(args[0], args[1]))
    except ConfigError as exc:
        return print_error("lm_eval_task", exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
