"""``python -m megatron_mohge.cli.resources [NAME]``: list the shipped files, or print one's path."""

import sys

from megatron_mohge.cli.common import run_cli
from megatron_mohge.resources import resource_path, shipped_files


def main(argv=None) -> int:
    return run_cli("python -m megatron_mohge.cli.resources", _print_paths,
                   sys.argv[1:] if argv is None else argv)


def _print_paths(names) -> int:
    for name in names:
        print(resource_path(name))
    if not names:
        for name in shipped_files():
            print(f"{name}\t{resource_path(name)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
