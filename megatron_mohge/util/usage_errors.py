"""A usage error (bad config, data or checkpoint) reported as one line, also from a
multi-rank run (a leaf module: the CLIs and the benchmark runner both use it).

Every rank of ``mohge-train`` usually meets the same bad input, and ``torchrun`` answers a
rank's non-zero exit with a ``ChildFailedError`` wall that does not contain the message.
Here a rank's ``ConfigError`` is

* written to ``$MOHGE_USAGE_ERROR_FILE`` (with the tool's name, so the launcher's line says
  ``mohge-pretrain:`` or ``mohge-train:`` as the rank would) when a launcher that reports it
  set one (``mohge-bench``, ``python -m megatron_mohge.cli.launch``); the first rank to fail
  wins;
* else printed once (by rank 0, or by any rank when no launcher collects it), and written to
  torchrun's per-rank ``$TORCHELASTIC_ERROR_FILE`` so torchrun's own report shows it too.
"""

from __future__ import annotations

import json
import os
import time
import sys
from typing import Any, NamedTuple, Optional

USAGE_EXIT = 2  # argparse's exit status for usage errors; every mohge CLI uses it
ERROR_FILE_ENV = "MOHGE_USAGE_ERROR_FILE"


def print_error(prog: str, exc: Any) -> int:
    """``prog: message`` on stderr; returns :data:`USAGE_EXIT`."""
    print(f"{prog}: {exc}", file=sys.stderr, flush=True)
    return USAGE_EXIT


def report_usage_error(prog: str, exc: BaseException) -> int:
    """Report ``exc`` of this rank as described above; returns :data:`USAGE_EXIT`."""
    message = str(exc)
    collected = os.environ.get(ERROR_FILE_ENV)
    if collected:
        try:  # O_EXCL: the first failing rank's message is kept
            fd = os.open(collected, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return USAGE_EXIT
        except OSError:
            collected = None  # cannot record it: print it below instead
        else:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"prog": prog, "message": message}, fh)
            return USAGE_EXIT
    elastic = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if elastic:
        line = f"{prog}: {message}"
        try:  # the format of torch.distributed.elastic's ErrorHandler.record_exception
            with open(elastic, "w", encoding="utf-8") as fh:
                json.dump({"message": {"message": line, "extraInfo": {
                    "py_callstack": line, "timestamp": str(int(time.time()))}}}, fh)
        except OSError:
            elastic = None
    if os.environ.get("RANK", "0") == "0" or not elastic:
        print_error(prog, message)
    return USAGE_EXIT


class UsageError(NamedTuple):
    prog: str  # the tool whose rank failed (mohge-train, mohge-pretrain)
    message: str


def read_usage_error(path) -> Optional[UsageError]:
    """What a rank recorded in ``path``, or None when no rank recorded anything (yet: a
    file being written reads as None too)."""
    try:
        with open(path, encoding="utf-8") as fh:
            return UsageError(**json.load(fh))
    except (FileNotFoundError, ValueError):
        return None


__all__ = ["print_error", "report_usage_error", "read_usage_error", "UsageError", "USAGE_EXIT",
           "ERROR_FILE_ENV"]
