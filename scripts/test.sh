#!/usr/bin/env bash
# The test command: sets up the venv of a megatron-core line (scripts/setup_env.sh), then runs
# the CPU test suite with it.
#   scripts/test.sh                  default suite on the 0.19 line (the current release)
#   scripts/test.sh --line 0.16      ... on the 0.16 line (Python 3.11, megatron-core 0.16.1)
#   scripts/test.sh --slow           the slower multi-rank cases (all EP/TP/PP layouts)
#   scripts/test.sh --all            both
# Extra arguments go to pytest (e.g. -k router -x). MOHGE_OTHER_PYTHON=<python of the other
# line's venv> enables the cross-line checkpoint test (.ci/run sets it).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LINE="${MOHGE_LINE:-0.19}"
MARK=(-m "not slow")
while [ $# -gt 0 ]; do
  case "$1" in
    --line) LINE="$2"; shift 2 ;;
    --line=*) LINE="${1#--line=}"; shift ;;
    --slow) MARK=(-m slow); shift ;;
    --all) MARK=(); shift ;;
    *) break ;;
  esac
done
VENV="$("$ROOT/scripts/setup_env.sh" --line "$LINE" | tail -n 1)"
cd "$ROOT"
echo "[test] line $LINE: $("$VENV/bin/python" -c 'import sys; from importlib.metadata import version as v; print("Python %s, torch %s, megatron-core %s" % (sys.version.split()[0], v("torch"), v("megatron-core")))')"
exec "$VENV/bin/python" -m pytest "${MARK[@]}" "$@"
