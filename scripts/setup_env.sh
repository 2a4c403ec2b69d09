#!/usr/bin/env bash
# Create/refresh the project virtualenv (.venv) with a CPU torch, megatron-core 0.16.x and
# this package (editable). Safe to re-run; fast when everything is installed.
#
#   MOHGE_VENV=path          where to put the venv (default: <repo>/.venv)
#   MOHGE_TORCH_SPEC=...     torch requirement (default: torch==2.13.0, the CPU wheel here)
#   MOHGE_TORCH_INDEX=URL    extra pip --index-url for torch (e.g. the PyTorch CPU index)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MOHGE_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

# torch first and on its own: installing megatron-core with no torch present would pull the
# newest CUDA build from PyPI (several GB). An installed torch satisfies megatron-core's
# requirement, so nothing else replaces it.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing ${MOHGE_TORCH_SPEC:-torch==2.13.0}"
  if [ -n "${MOHGE_TORCH_INDEX:-}" ]; then
    "${PIP[@]}" --index-url "$MOHGE_TORCH_INDEX" "${MOHGE_TORCH_SPEC:-torch==2.13.0}"
  else
    "${PIP[@]}" "${MOHGE_TORCH_SPEC:-torch==2.13.0}"
  fi
fi
"$VENV/bin/python" - <<'PYEOF'
import torch
if torch.version.cuda is not None and not torch.cuda.is_available():
    print(f"[setup] warning: torch {torch.__version__} is a CUDA build on a machine without a GPU")
PYEOF

echo "[setup] installing megatron-mohge (editable) with its test and train extras"
"${PIP[@]}" -e "$ROOT[test,train]" 2>&1 | grep -v "is ignored: it is neither a file nor a directory" || true
"$VENV/bin/python" -c "import megatron_mohge, megatron.core, pytest, yaml" \
  || { echo "[setup] installation failed" >&2; exit 1; }
