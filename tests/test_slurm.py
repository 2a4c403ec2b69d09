"""Slurm launchers: rendered command lines and DRY_RUN output of examples/slurm/*.sbatch."""

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_mohge.cli import slurm as slurm_cli
from megatron_mohge.config import ConfigError
from megatron_mohge.integration import slurm as S
from megatron_mohge.resources import launcher_path
from megatron_mohge.config.run import RunConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
SCRIPTS = ROOT / "examples" / "slurm"
IMAGE = "nvcr.io/nvidia/pytorch:25.01-py3"


def run_cfg(tmp_path, name="small_mohge_1node.yaml", *overrides):
    return RunConfig.from_yaml(CONFIGS / name, [f"output_dir={tmp_path / 'out'}", *overrides])


ENV2 = {"MASTER_ADDR": "gpu001", "MASTER_PORT": "24242", "SLURM_JOB_ID": "4242",
        "SLURM_NNODES": "2"}


def test_render_torchrun(tmp_path):
    run = run_cfg(tmp_path, "small_mohge_1node.yaml", "launch.nodes=2")
    [line] = S.render_commands(run, "/repo/examples/pretrain_mohge.py", ENV2, shape="torchrun")
    argv = shlex.split(line)
    assert argv[:5] == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1",
                        "--kill-on-bad-exit=1"]
    t = argv.index("torchrun")
    assert argv[t:t + 7] == ["torchrun", "--nnodes=2", "--nproc-per-node=8", "--rdzv-id=4242",
                             "--rdzv-backend=c10d", "--rdzv-endpoint=gpu001:24242",
                             "/repo/examples/pretrain_mohge.py"]
    assert argv[argv.index("--mohge-config") + 1] == str(tmp_path / "out" / "mohge_layer.yaml")


def test_render_srun_with_container(tmp_path):
    run = run_cfg(tmp_path, "small_moe_1node.yaml", f"launch.container_image={IMAGE}",
                  "launch.container_mounts=[/lustre:/lustre, /data:/data]", "launch.shape=srun")
    [line] = S.render_commands(run, "/mlm/pretrain_gpt.py", {"MASTER_ADDR": "n1"},
                               python="python3")
    argv = shlex.split(line)
    assert argv[:8] == ["srun", "--nodes=1", "--ntasks=8", "--ntasks-per-node=8",
                        "--kill-on-bad-exit=1", f"--container-image={IMAGE}",
                        "--container-mounts=/lustre:/lustre,/data:/data", "bash"]
    inner = argv[-1]
    assert argv[-2] == "-c" and inner.startswith(
        "export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS "
        "MASTER_ADDR=n1 MASTER_PORT=29500; exec python3 -u /mlm/pretrain_gpt.py --num-layers 12")
    assert "--num-experts 32" in inner and "--mohge-config" not in inner


def test_layout_errors(tmp_path):
    run = run_cfg(tmp_path, "small_mohge_1node.yaml", "launch.nodes=2")
    with pytest.raises(ConfigError, match="launch.nodes=2 but this Slurm job has 1 nodes"):
        S.render_commands(run, "x.py", {"SLURM_NNODES": "1"})
    odd = run_cfg(tmp_path, "small_mohge_1node.yaml", "launch.gpus_per_node=3")
    with pytest.raises(ConfigError, match="expert_parallel=4"):
        S.render_commands(odd, "x.py", {})
    mounts = run_cfg(tmp_path, "small_mohge_1node.yaml", "launch.container_mounts=[/a:/a]")
    with pytest.raises(ConfigError, match="container_image"):
        S.render_commands(mounts, "x.py", {})


def test_sbatch_args_and_env(tmp_path):
    run = run_cfg(tmp_path, "paper_3b_mohge.yaml", "launch.partition=gpu", "launch.account=abc",
                  "launch.env={NCCL_DEBUG: INFO, X: 'a b'}")
    assert S.sbatch_args(run, "srun") == [
        "--job-name=paper_3b_mohge", "--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8",
        "--time=48:00:00", f"--output={tmp_path / 'out' / 'slurm-%j.out'}",
        "--partition=gpu", "--account=abc"]
    assert S.render_env(run, {}) == [
        "export MEGATRON_LM_DIR=/path/to/Megatron-LM", f"export MOHGE_OUT_DIR={tmp_path / 'out'}",
        "export NCCL_DEBUG=INFO", "export X='a b'"]
    assert S.render_env(run, {"MEGATRON_LM_DIR": "/mine"})[0] == "export MEGATRON_LM_DIR=/mine"


# ---------------------------------------------------------------------- sbatch scripts
@pytest.fixture
def fake_slurm(tmp_path):
    """A PATH with a stub `scontrol` (and a stub `sbatch` recording its arguments)."""
    stub = tmp_path / "bin"
    stub.mkdir()
    (stub / "scontrol").write_text(
        "#!/bin/sh\n"
        'if [ "$1 $2" = "show hostnames" ]; then\n'
        '  echo "$3" >> "$(dirname "$0")/scontrol.log"\n'
        "  printf 'gpu001\\ngpu002\\n'\n"
        "fi\n")
    (stub / "sbatch").write_text('#!/bin/sh\necho "SBATCH $*"\n')
    for f in stub.iterdir():
        f.chmod(0o755)
    return stub


def run_script(script, args, stub, extra_env=None, dry=True):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{stub}:{env['PATH']}", PYTHON=sys.executable,
               MEGATRON_LM_DIR="/opt/Megatron-LM", MOHGE_REPO=str(ROOT))
    env.pop("MASTER_PORT", None)
    env.pop("DRY_RUN", None)
    if dry:
        env["DRY_RUN"] = "1"
    env.update(extra_env or {})
    return subprocess.run(["bash", str(SCRIPTS / script), *args], env=env, capture_output=True,
                          text=True, timeout=60)


def commands(out: str) -> list[list[str]]:
    return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ srun")]


SLURM2 = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[001-002]", "SLURM_NNODES": "2"}
SLURM1 = {"SLURM_JOB_ID": "77", "SLURM_JOB_NODELIST": "gpu001", "SLURM_NNODES": "1"}


@pytest.mark.parametrize("nodes, slurm_env", [(1, SLURM1), (2, SLURM2)])
def test_torchrun_sbatch_dry_run(tmp_path, fake_slurm, nodes, slurm_env):
    out_dir = tmp_path / "out"
    r = run_script("launch_torchrun.sbatch",
                   [str(CONFIGS / "small_mohge_1node.yaml"), f"launch.nodes={nodes}",
                    f"output_dir={out_dir}", "launch.env={NCCL_DEBUG: INFO}"],
                   fake_slurm, slurm_env)
    assert r.returncode == 0, r.stderr
    job = slurm_env["SLURM_JOB_ID"]
    port = str(20000 + int(job) % 20000)
    [argv] = commands(r.stdout)
    assert argv[:4] == ["srun", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1"]
    t = argv.index("torchrun")
    assert argv[t + 1:t + 6] == [f"--nnodes={nodes}", "--nproc-per-node=8", f"--rdzv-id={job}",
                                 "--rdzv-backend=c10d", f"--rdzv-endpoint=gpu001:{port}"]
    # the launcher shipped in the package (not examples/, absent from a pip install)
    assert argv[t + 6] == str(launcher_path())
    flags = argv[t + 7:]
    assert flags[flags.index("--mohge-config") + 1] == str(out_dir / "mohge_layer.yaml")
    assert (out_dir / "mohge_layer.yaml").is_file()
    for pair in (["--num-experts", "32"], ["--moe-router-topk", "4"],
                 ["--expert-model-parallel-size", "4"], ["--tokenizer-type", "NullTokenizer"]):
        i = flags.index(pair[0])
        assert flags[i:i + 2] == pair
    assert f"MASTER_ADDR=gpu001 MASTER_PORT={port} SLURM_JOB_ID={job}" in r.stdout
    assert "CUDA_DEVICE_MAX_CONNECTIONS=1" in r.stdout and "NCCL_DEBUG=INFO" in r.stdout
    assert "megatron-mohge: " in r.stdout and "Megatron-LM:    not a git checkout" in r.stdout
    assert (fake_slurm / "scontrol.log").read_text().split() == [slurm_env["SLURM_JOB_NODELIST"]]


@pytest.mark.parametrize("nodes, slurm_env", [(1, SLURM1), (2, SLURM2)])
def test_srun_sbatch_dry_run(tmp_path, fake_slurm, nodes, slurm_env):
    r = run_script("launch_srun.sbatch",
                   [str(CONFIGS / "small_moe_1node.yaml"), f"launch.nodes={nodes}",
                    f"output_dir={tmp_path / 'out'}", f"launch.container_image={IMAGE}",
                    "launch.container_mounts=[/lustre:/lustre]"],
                   fake_slurm, {**slurm_env, "TASK_PYTHON": "python3", "SCRIPT": "/opt/x.py"})
    assert r.returncode == 0, r.stderr
    [argv] = commands(r.stdout)
    assert argv[:8] == ["srun", f"--nodes={nodes}", f"--ntasks={8 * nodes}",
                        "--ntasks-per-node=8", "--kill-on-bad-exit=1",
                        f"--container-image={IMAGE}", "--container-mounts=/lustre:/lustre", "bash"]
    inner = argv[-1]
    assert "RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS" in inner
    assert "MASTER_ADDR=gpu001" in inner
    assert "exec python3 -u /opt/x.py --num-layers 12" in inner
    assert "--num-experts 32 --moe-ffn-hidden-size 1024 --moe-router-topk 4" in inner


def test_dry_run_outside_slurm_and_self_submit(tmp_path, fake_slurm):
    args = [str(CONFIGS / "small_moe_1node.yaml"), f"output_dir={tmp_path / 'out'}"]
    r = run_script("launch_torchrun.sbatch", args, fake_slurm)  # no SLURM_* at all
    assert r.returncode == 0, r.stderr
    [argv] = commands(r.stdout)
    assert any(a.startswith("--rdzv-endpoint=") for a in argv)
    sub = run_script("launch_torchrun.sbatch", args, fake_slurm, dry=False)
    assert sub.returncode == 0, sub.stderr
    line = [ln for ln in sub.stdout.splitlines() if ln.startswith("SBATCH ")][0]
    assert "--nodes=1 --ntasks-per-node=1 --gpus-per-node=8" in line
    assert line.endswith(f"launch_torchrun.sbatch {args[0]} {args[1]}")


def test_bad_config_fails(tmp_path, fake_slurm):
    r = run_script("launch_torchrun.sbatch",
                   [str(CONFIGS / "small_moe_1node.yaml"), f"output_dir={tmp_path}",
                    "launch.nodes=2"], fake_slurm, SLURM1)
    assert r.returncode != 0 and "launch.nodes=2 but this Slurm job has 1 nodes" in r.stderr
    r = run_script("launch_srun.sbatch", [str(CONFIGS / "small_moe_1node.yaml"),
                                          "train.lr=-1"], fake_slurm, SLURM1)
    assert r.returncode != 0 and "train.lr" in r.stderr


def test_module_cli(tmp_path, capsys):
    cfg = str(CONFIGS / "small_mohge_1node.yaml")
    assert slurm_cli.main([cfg, f"output_dir={tmp_path}", "--sbatch-args", "--shape", "srun"]) == 0
    assert "--ntasks-per-node=8" in capsys.readouterr().out
    assert slurm_cli.main([cfg, f"output_dir={tmp_path}", "--flags"]) == 0
    assert "--mohge-config" in capsys.readouterr().out
    assert slurm_cli.main([cfg, f"output_dir={tmp_path}", "--shape", "torchrun"]) == 0
    assert capsys.readouterr().out.startswith("srun --nodes=1")
    assert slurm_cli.main([cfg, "moe.mohge.topk=99"]) == 2
    assert "topk" in capsys.readouterr().err
