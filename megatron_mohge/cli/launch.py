"""``python -m megatron_mohge.cli.launch [torchrun options] -m megatron_mohge.cli.train ...``

``torchrun`` for ``mohge-train`` / ``mohge-pretrain``, except that a rank's usage error (bad
config, data or checkpoint) ends the job with that one line, ``mohge-train: <message>`` (the
launched tool's name), exit status 2,
instead of the ``ChildFailedError`` report and its traceback. Crashes keep torchrun's full
report. ``mohge-bench`` launches multi-rank runs with it.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile

from megatron_mohge.cli import common
from megatron_mohge.util.usage_errors import (
    ERROR_FILE_ENV,
    USAGE_EXIT,
    print_error,
    read_usage_error,
)

# torchrun's agent logs the failure and the SIGTERM to the other ranks before raising; once a
# rank recorded a usage error these lines only repeat it.
_AGENT_LOGGER = "torch.distributed.elastic.multiprocessing.api"


@common.entry
def main(argv=None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    # A caller that sets the file (mohge-bench) reports the message itself.
    owner = ERROR_FILE_ENV not in os.environ
    tmpdir = tempfile.TemporaryDirectory(prefix="mohge-launch-") if owner else None
    path = os.path.join(tmpdir.name, "usage_error.txt") if owner else os.environ[ERROR_FILE_ENV]
    os.environ[ERROR_FILE_ENV] = path  # the ranks inherit it
    agent_log = logging.getLogger(_AGENT_LOGGER)
    quiet = lambda record: read_usage_error(path) is None  # noqa: E731
    agent_log.addFilter(quiet)
    try:
        run(args)
    except ChildFailedError:
        error = read_usage_error(path)
        if error is None:
            raise  # a crash: torchrun's report with the ranks' exit codes and tracebacks
        if owner:
            print_error(error.prog, error.message)
        return USAGE_EXIT
    finally:
        agent_log.removeFilter(quiet)
        if tmpdir is not None:
            tmpdir.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
