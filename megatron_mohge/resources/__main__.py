"""``python -m megatron_mohge.resources [NAME]``: list the shipped files, or print one's path."""

import sys

from megatron_mohge.config import ConfigError
from megatron_mohge.resources import resource_path, shipped_files


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv:
            for name in argv:
                print(resource_path(name))
        else:
            for name in shipped_files():
                print(f"{name}\t{resource_path(name)}")
    except ConfigError as exc:
        print(f"python -m megatron_mohge.resources: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
