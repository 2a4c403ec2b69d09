#!/usr/bin/env bash
# Offline GPU check of megatron-mohge (one GPU, no network, no Megatron-LM needed):
#
#   scripts/gpu_check.sh --out DIR [--wheels DIR] [--device cuda|cpu] [--skip-train]
#
# Needs a Python (>= 3.10; 3.12 for megatron-core 0.19) with a CUDA torch >= 2.8 installed
# (PYTHON=..., default python3). --wheels DIR installs megatron-core and this package from
# that folder only (pip --no-index), leaving the installed torch alone. Fill the folder on a
# machine with network access, for the target Python:
#
#   pip download --dest wheels --only-binary=:all: --python-version 3.12 \
#       megatron-core==0.19.2 pyyaml numpy packaging     # + their dependencies
#   (Python 3.10 / 3.11: --python-version 3.11 and megatron-core==0.16.1)
#   pip wheel --no-deps --wheel-dir wheels /path/to/megatron-mohge
#
# Then: results.json and results.md in --out (see python -m megatron_mohge.cli.gpu_check
# --help). --device cpu runs the same steps at a tiny shape on the CPU (CI does).
set -euo pipefail
PY="${PYTHON:-python3}"
WHEELS=""
ARGS=()
DEVICE=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) WHEELS="$2"; shift 2 ;;
    --device) DEVICE="$2"; ARGS+=("$1" "$2"); shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
if ! "$PY" -c "import torch, sys; sys.exit(0 if hasattr(torch, '_grouped_mm') else 1)" 2>/dev/null; then
  echo "[gpu_check] $PY has no torch with torch._grouped_mm (torch >= 2.8 needed)" >&2
  exit 2
fi
if [ -n "$WHEELS" ]; then
  [ -d "$WHEELS" ] || { echo "[gpu_check] --wheels $WHEELS: no such directory" >&2; exit 2; }
  echo "[gpu_check] installing megatron-core and megatron-mohge from $WHEELS (offline)"
  "$PY" -m pip install --no-index --find-links "$WHEELS" --disable-pip-version-check \
    megatron-core megatron-mohge
fi
"$PY" -c "import megatron.core, megatron_mohge" 2>/dev/null || {
  echo "[gpu_check] megatron-core / megatron-mohge not importable by $PY; pass --wheels DIR" >&2
  exit 2
}
if [ "$DEVICE" = cpu ]; then
  export CUDA_VISIBLE_DEVICES=""   # the tiny CPU run must not pick up a GPU
fi
export PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
exec "$PY" -m megatron_mohge.cli.gpu_check "${ARGS[@]}"
