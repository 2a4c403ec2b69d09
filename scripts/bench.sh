#!/usr/bin/env bash
# The main job: installs what it needs, then runs `mohge-bench --preset default`: a tiny
# MoHGE GPT and its stock Megatron MoE baseline trained on CPU (same data and token budget;
# 2 gloo ranks, EP=2), once per seed for 3 seeds, plus the layer microbenchmark. About 10
# minutes on 2 cores. `--preset study` is the scaling study (~40 minutes).
# Writes runs/bench-default/{results.json,results.md,*.png}. Arguments go to mohge-bench
# (see --help), e.g. --preset load-balance-ablation, --data my_texts/, --with-dense.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup_env.sh"
cd "$ROOT"
exec "${MOHGE_VENV:-$ROOT/.venv}/bin/mohge-bench" "$@"
