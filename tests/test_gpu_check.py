"""The offline GPU check (scripts/gpu_check.sh) in its tiny CPU mode, as CI runs it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_check(out: Path, *extra: str) -> dict:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="2")
    proc = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--device", "cpu", "--out",
                           str(out), *extra], env=env, capture_output=True, text=True,
                          timeout=1200, cwd=str(out.parent))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads((out / "results.json").read_text())


def check_common(res: dict, out: Path) -> None:
    assert res["device"] == "cpu"
    n = res["numerics"]
    assert n["passed"] and n["dtype"] == "bf16"
    assert max(n["out_rel"], n["dx_rel"], n["dw_rel"]) <= n["tolerance"]
    assert res["matmul"]["tflops"] > 0
    assert set(res["layer_bench"]) >= {"local", "torch"}
    for backend in ("local", "torch"):
        bench = res["layer_bench"][backend]
        assert bench["config"]["backend"] == backend
        assert all(k["expert_gflops"] > 0 for k in bench["kinds"].values())
    md = (out / "results.md").read_text()
    assert "torch vs local experts" in md and "`torch` experts" in md


@pytest.mark.pipeline
def test_gpu_check_cpu_mode_without_training(tmp_path):
    out = tmp_path / "check"
    res = run_check(out, "--skip-train")
    check_common(res, out)
    assert "train" not in res


@pytest.mark.slow
def test_gpu_check_cpu_mode_full(tmp_path):
    out = tmp_path / "check"
    res = run_check(out)
    check_common(res, out)
    assert set(res["train"]) == {"moe", "mohge", "mohge_hybrid"}
    assert all(r["train_tokens_per_s"] > 0 for r in res["train"].values())


def test_gpu_check_rejects_a_missing_wheels_folder(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run([str(ROOT / "scripts" / "gpu_check.sh"), "--wheels",
                           str(tmp_path / "nope"), "--out", str(tmp_path / "o")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "no such directory" in proc.stderr
