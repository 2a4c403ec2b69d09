#!/usr/bin/env bash
# The main job: installs what it needs, then runs `mohge-bench --preset default`: a tiny
# MoHGE GPT and its stock Megatron MoE baseline trained on CPU (same data and token budget;
# 2 gloo ranks, EP=2), once per seed for 3 seeds, plus the layer microbenchmark. About 10
# minutes on 2 cores. `--preset study` is the scaling study (~40 minutes).
# Writes runs/bench-default/{results.json,results.md,*.png}.
#   scripts/bench.sh [--line 0.19|0.16] [mohge-bench arguments]
# The line defaults to 0.19 (megatron-core 0.19.2 on Python 3.12; scripts/setup_env.sh);
# --line 0.16 uses megatron-core 0.16.1 on Python 3.11. Other arguments go to mohge-bench
# (see --help), e.g. --preset load-balance-ablation, --data my_texts/, --with-dense.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LINE="${MOHGE_LINE:-0.19}"
case "${1:-}" in
  --line) LINE="$2"; shift 2 ;;
  --line=*) LINE="${1#--line=}"; shift ;;
esac
VENV="$("$ROOT/scripts/setup_env.sh" --line "$LINE" | tail -n 1)"
cd "$ROOT"
exec "$VENV/bin/mohge-bench" "$@"
