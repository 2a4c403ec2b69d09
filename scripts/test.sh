#!/usr/bin/env bash
# The test command: installs what it needs, then runs the CPU test suite.
#   scripts/test.sh            default suite (fast unit tests + a few multi-rank cases)
#   scripts/test.sh --slow     the slower multi-rank cases (all EP/TP/PP layouts)
#   scripts/test.sh --all      both
# Extra arguments go to pytest (e.g. -k router -x).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup_env.sh"
MARK=(-m "not slow")
case "${1:-}" in
  --slow) MARK=(-m slow); shift ;;
  --all) MARK=(); shift ;;
esac
cd "$ROOT"
exec "${MOHGE_VENV:-$ROOT/.venv}/bin/python" -m pytest "${MARK[@]}" "$@"
