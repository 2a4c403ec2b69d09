#!/usr/bin/env bash
# The main job: installs what it needs, then trains a tiny MoHGE model and a stock Megatron
# MoE baseline on CPU (same data, seed and budget) and prints the comparison.
# Arguments go to examples/train_tiny_cpu.py (see --help), e.g. --steps 200.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "${MOHGE_VENV:-$ROOT/.venv}/bin/python" examples/train_tiny_cpu.py "$@"
