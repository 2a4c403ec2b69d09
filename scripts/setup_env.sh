#!/usr/bin/env bash
# Create/refresh the virtualenv of one tested megatron-core line, with torch, megatron-core and
# this package (editable, with its test, train, hf and eval extras). Safe to re-run; fast when done.
#
#   scripts/setup_env.sh [--line 0.19|0.16]      (default: 0.19, the current release)
#
#   line  Python        torch                                  megatron-core  venv
#   0.19  3.12          torch==2.13.0 from PyPI (the CUDA       0.19.2         .venv-0.19
#                       build: there is no CPU wheel for 3.12
#                       on PyPI; it runs on CPU, ~4.7 GB)
#   0.16  3.11 / 3.10   torch==2.13.0+cpu (CPU wheel only;      0.16.1         .venv-0.16
#                       a CUDA build is refused)
#
# Environment overrides:
#   MOHGE_VENV=path          the venv (default: <repo>/.venv-<line>)
#   MOHGE_PYTHON=path        the interpreter to create it with (default: found as below)
#   MOHGE_TORCH_SPEC=...     torch requirement (default: per line, above)
#   MOHGE_TORCH_INDEX=URL    extra index for the 0.16 line's CPU wheel when the configured pip
#                            sources lack it (default: https://download.pytorch.org/whl/cpu)
# Prints the venv path on stdout (progress goes to stderr).
set -euo pipefail
exec 3>&1 1>&2
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LINE="${MOHGE_LINE:-0.19}"
while [ $# -gt 0 ]; do
  case "$1" in
    --line) LINE="$2"; shift 2 ;;
    --line=*) LINE="${1#--line=}"; shift ;;
    *) echo "[setup] unknown argument $1 (usage: setup_env.sh [--line 0.19|0.16])" >&2; exit 2 ;;
  esac
done
case "$LINE" in
  0.19) PYS=(3.12); MCORE="megatron-core==0.19.2"; TORCH="${MOHGE_TORCH_SPEC:-torch==2.13.0}" ;;
  0.16) PYS=(3.11 3.10); MCORE="megatron-core==0.16.1"; TORCH="${MOHGE_TORCH_SPEC:-torch==2.13.0+cpu}" ;;
  *) echo "[setup] --line must be 0.19 or 0.16, got '$LINE'" >&2; exit 2 ;;
esac
VENV="${MOHGE_VENV:-$ROOT/.venv-$LINE}"

# An interpreter of one of the line's Python versions: MOHGE_PYTHON, pythonX.Y on PATH, or a
# pyenv install (pyenv's shims fail for versions that are not selected, so each is probed).
find_python() {
  local v cand
  for v in "${PYS[@]}"; do
    for cand in "python$v" "$(pyenv root 2>/dev/null)"/versions/"$v".*/bin/python"$v"; do
      if "$cand" -c "import sys; assert sys.version.startswith('$v.')" 2>/dev/null; then
        command -v "$cand" 2>/dev/null || echo "$cand"; return 0
      fi
    done
  done
  return 1
}

if [ ! -x "$VENV/bin/python" ]; then
  PY="${MOHGE_PYTHON:-$(find_python || true)}"
  if [ -z "$PY" ]; then
    echo "[setup] line $LINE needs Python ${PYS[*]}; none found (set MOHGE_PYTHON)" >&2; exit 1
  fi
  echo "[setup] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

# torch's version and CUDA version without importing torch (that takes seconds): "" if absent.
torch_build() {
  "$VENV/bin/python" - <<'PYEOF'
import importlib.util, pathlib
spec = importlib.util.find_spec("torch")
if spec is not None:
    ns = {}
    exec((pathlib.Path(spec.origin).parent / "version.py").read_text(), ns)
    print(ns["__version__"], ns.get("cuda"))
PYEOF
}

# torch first and on its own: installing megatron-core with no torch present would pull the
# newest CUDA build from PyPI. An installed torch satisfies megatron-core's requirement.
if [ -z "$(torch_build)" ]; then
  echo "[setup] installing $TORCH"
  if [ "$LINE" = 0.16 ]; then
    # "+cpu" never matches a CUDA build; try the configured sources, then PyTorch's CPU index.
    "${PIP[@]}" "$TORCH" 2>/dev/null \
      || "${PIP[@]}" --extra-index-url "${MOHGE_TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" "$TORCH"
  else
    "${PIP[@]}" "$TORCH"
  fi
fi
read -r TORCH_VERSION TORCH_CUDA <<<"$(torch_build)"
if [ "$LINE" = 0.16 ] && [ "$TORCH_CUDA" != None ]; then
  echo "[setup] torch $TORCH_VERSION in $VENV is a CUDA build (CUDA $TORCH_CUDA); the 0.16 line" \
       "uses the CPU wheel: remove the venv and re-run" >&2
  exit 1
fi

# Installed already? (metadata only: importing megatron.core takes seconds)
installed() {
  "$VENV/bin/python" - "${MCORE#*==}" <<'PYEOF'
import sys
from importlib import metadata
need = {"megatron-core": sys.argv[1]}
try:
    assert metadata.version("megatron-core") == need["megatron-core"]
    for dist in ("megatron-mohge", "pytest", "import-linter", "ruff", "pyyaml", "tokenizers",
                 "transformers", "safetensors", "lm-eval"):
        metadata.version(dist)
except (AssertionError, metadata.PackageNotFoundError):
    sys.exit(1)
PYEOF
}
# The editable install's metadata (console scripts, extras) is written once, from
# pyproject.toml: a checkout whose pyproject.toml changed since (e.g. a new mohge-* command)
# is installed again.
STAMP="$VENV/.megatron-mohge-setup.sha256"
SETUP_SHA="$(sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1)"
if ! installed || [ "$(cat "$STAMP" 2>/dev/null)" != "$SETUP_SHA" ]; then
  echo "[setup] installing $MCORE and megatron-mohge (editable) with its test, train, hf and" \
       "eval extras"
  "${PIP[@]}" "$MCORE" -e "$ROOT[test,train,hf,eval]" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" || true
  installed || { echo "[setup] installation failed" >&2; exit 1; }
  echo "$SETUP_SHA" > "$STAMP"
fi
echo "$VENV" >&3
