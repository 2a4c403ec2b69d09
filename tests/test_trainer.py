"""mohge-train end to end on 2 gloo ranks: logs, TensorBoard, checkpoints, bit-exact resume,
resume at another EP size, and clear errors for bad checkpoints."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "name": "tiny",
    "model": {"num_layers": 2, "hidden_size": 32, "num_attention_heads": 4, "seq_length": 32},
    # Kg=2 of 2 groups, K=2 of 4 experts, and a loss-free bias moving fast enough to change
    # the routing within a few steps: bit-exact resume needs the bias from the checkpoint.
    "moe": {"kind": "mohge", "mohge": {"widths": [16, 32], "experts_per_group": 2,
                                       "group_topk": 2, "topk": 2,
                                       "losses": {"group_start_fraction": 0.0,
                                                  "expert_bias_update_rate": 0.5}}},
    "parallel": {"expert_parallel": 2},
    "data": {"default_corpus_bytes": 300_000},
    "train": {"iters": 6, "micro_batch_size": 2, "global_batch_size": 8, "lr": 3e-3,
              "min_lr": 3e-4, "lr_warmup_iters": 1},
    "eval": {"interval": 0, "iters": 2},
    "logging": {"interval": 1, "progress_bar": False},
}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def train(tmp_path, cache, name, nproc=2, overrides=(), expect_fail=False):
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "name": name}))
    cmd = [sys.executable, "-m", "megatron_mohge.cli.train", "--config", str(cfg),
           f"output_dir={tmp_path / name}", f"data.cache_dir={cache}", *overrides]
    if nproc > 1:
        cmd[1:1] = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(REPO),
                          timeout=600)
    if expect_fail:
        assert proc.returncode != 0
        return proc.stdout + proc.stderr
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return json.loads((tmp_path / name / "summary.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache):
    """The two trainings both resume tests start from, run once for the module: ``full`` (6
    steps) and ``part`` (the same run stopped after 3 steps), whose checkpoints are also
    copied to ``part3`` as they stand after step 3 (the resume test then adds step 6)."""
    d = tmp_path_factory.mktemp("trained")
    full = train(d, cache, "full")
    first3 = train(d, cache, "part", overrides=["train.iters=3", "train.lr_decay_iters=6"])
    shutil.copytree(d / "part" / "checkpoints", d / "part3")
    return SimpleNamespace(dir=d, full=full, first3=first3)


def test_train_save_and_resume_bit_exactly_on_two_ranks(trained, cache):
    tmp_path, full = trained.dir, trained.full
    assert full["iterations"] == 6 and full["layout"]["ep"] == 2
    assert len(full["history"]) == 6 and full["history"][-1]["loss"] < full["history"][0]["loss"]
    assert any(n.startswith("mohge_") for n in full["history"][-1]["aux"])
    assert abs(sum(full["group_token_share"]) - 1) < 1e-6
    # held-out loss by the top-1 expert's width (width_loss.py), summed over both ranks:
    # every held-out token counted once per MoE layer, so the share-weighted mean of the
    # per-width losses is the held-out loss
    by_width = full["heldout_loss_by_width"]
    assert by_width["widths"] == [16, 32] and len(by_width["layers"]) == 2
    assert sum(m * s for m, s in zip(by_width["mean_loss"], by_width["token_share"])
               if m is not None) == pytest.approx(full["heldout_loss"], rel=1e-6)
    ckpt = tmp_path / "full" / "checkpoints"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "6"
    assert (ckpt / "iter_0000006").is_dir() and not list(ckpt.glob("*.tmp"))
    assert list((tmp_path / "full" / "tensorboard").glob("events.out.tfevents.*"))

    # interrupted after 3 steps, then the same command with the full budget resumes
    part, first3 = tmp_path / "part", trained.first3
    assert (part / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "3"
    # the loss-free bias has moved by the checkpoint (3 steps of +-0.5: an even number of
    # steps may oscillate back to 0, so it is checked here)
    assert any(any(b != 0 for b in l["balance_bias"]) for l in first3["layers"])
    # a save killed half-way (Ctrl-C) leaves only a .tmp directory: ignored, then replaced
    junk = part / "checkpoints" / "iter_0000006.tmp"
    junk.mkdir()
    (junk / "half_written.distcp").write_bytes(b"\0" * 10)
    resumed = train(tmp_path, cache, "part", overrides=["train.lr_decay_iters=6"])
    assert not junk.exists() and (part / "checkpoints" / "iter_0000006" / "run.yaml").exists()
    assert resumed["iterations"] == 6
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in full["history"]]
    assert resumed["heldout_loss"] == full["heldout_loss"]  # bit-exact
    assert (part / "checkpoints" / "iter_0000003").is_dir()
    # the resumed run continued from the saved bias
    assert [l["balance_bias"] for l in resumed["layers"]] == \
        [l["balance_bias"] for l in full["layers"]]


@pytest.mark.slow
def test_resume_at_another_expert_parallel_size(tmp_path, cache, trained):
    full = trained.full
    assert (trained.dir / "part3" / "latest_checkpointed_iteration.txt").read_text() == "3"
    # EP=2 checkpoint -> EP=1 (2 DP ranks) and -> one rank: dist-ckpt reshards the experts.
    for name, nproc, ep in (("ep1", 2, 1), ("world1", 1, 1)):
        out = train(tmp_path, cache, name, nproc=nproc, overrides=[
            f"parallel.expert_parallel={ep}", "train.lr_decay_iters=6",
            f"checkpoint.load={trained.dir / 'part3'}"])
        assert out["iterations"] == 6 and out["layout"]["ep"] == ep
        for a, b in zip(out["history"][3:], full["history"][3:]):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert out["heldout_loss"] == pytest.approx(full["heldout_loss"], rel=1e-5)
        # the bias (canonical order, replicated) is the same at every EP size
        assert [l["balance_bias"] for l in out["layers"]] == \
            [l["balance_bias"] for l in full["layers"]]


def test_bad_checkpoint_and_config_errors(tmp_path, cache):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "latest_checkpointed_iteration.txt").write_text("7")
    msg = train(tmp_path, cache, "x", nproc=1, expect_fail=True,
                overrides=[f"checkpoint.load={bad}", "parallel.expert_parallel=1"])
    assert "checkpoint.load" in msg and "iter_0000007" in msg and "Traceback" not in msg
    msg = train(tmp_path, cache, "y", nproc=1, expect_fail=True, overrides=["train.lr=-1"])
    assert "train.lr" in msg and "Traceback" not in msg
