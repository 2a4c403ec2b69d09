"""``mohge-train`` and ``mohge-bench`` with ``model.kind: hybrid``: the run file trains a
HybridModel end to end and resumes bit-exactly; the bench's hybrid preset pairs stock MoE and
MoHGE on it."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from megatron_mohge.config.run import RunConfig
from tests.test_trainer import REPO, TINY

HYBRID = {**TINY, "model": {**TINY["model"], "kind": "hybrid", "hybrid_layer_pattern": "*E-E",
                            "num_layers": 4},
          "parallel": {"expert_parallel": 1}, "train": {**TINY["train"], "iters": 4}}


def train(tmp_path, name, *overrides):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({**HYBRID, "name": name}))
    cmd = [sys.executable, "-m", "megatron_mohge.cli.train", "--config", str(cfg),
           f"output_dir={tmp_path / name}", f"data.cache_dir={tmp_path / 'data'}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(REPO), timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads((tmp_path / name / "summary.json").read_text())


@pytest.mark.slow  # three mohge-train processes
def test_mohge_train_hybrid_run_resumes_bit_exactly(tmp_path):
    full = train(tmp_path, "full")
    assert full["iterations"] == 4 and len(full["layers"]) == 2  # the two E layers' routing
    assert full["history"][-1]["loss"] < full["history"][0]["loss"]
    train(tmp_path, "part", "train.iters=2", "train.lr_decay_iters=4")
    resumed = train(tmp_path, "part", "train.lr_decay_iters=4")
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    assert resumed["heldout_loss"] == full["heldout_loss"]
    assert [l["balance_bias"] for l in resumed["layers"]] == \
        [l["balance_bias"] for l in full["layers"]]


def test_bench_hybrid_preset_is_the_default_pair_on_a_hybrid_model():
    from megatron_mohge.bench.presets import get_preset

    default, hybrid = get_preset("default"), get_preset("hybrid")
    runs = hybrid.run_dicts()
    assert set(runs) == {"moe", "mohge"} and hybrid.baseline == "moe"
    for name, d in runs.items():
        run = RunConfig.from_dict(d)
        assert run.is_hybrid and run.model.hybrid_layer_pattern == "*E*E*E*E"
        assert d["moe"] == default.run_dicts()[name]["moe"]  # same stock and MoHGE layers
        assert sum(run.moe_layer_pattern) == 4  # as many MoE layers as the default GPT
