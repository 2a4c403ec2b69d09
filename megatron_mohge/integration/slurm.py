"""Exact Slurm command lines for a run YAML: ``srun ... torchrun ...`` or ``srun ... python ...``.

Two launch shapes (``launch.shape`` or ``--shape``):

* ``torchrun``: one Slurm task per node; ``torchrun`` starts ``gpus_per_node`` ranks on each
  node and rendezvouses at ``MASTER_ADDR:MASTER_PORT`` (c10d).
* ``srun``: one Slurm task per GPU (pyxis/enroot ``--container-image``/``--container-mounts``
  when ``launch.container_image`` is set); each task maps ``SLURM_PROCID``/``SLURM_LOCALID``/
  ``SLURM_NTASKS`` to the ``RANK``/``LOCAL_RANK``/``WORLD_SIZE`` torch.distributed reads.

``python -m megatron_mohge.cli.slurm RUN.yaml [key.sub=value ...] --shape torchrun``
prints the command lines (``--print-env``: the ``export`` lines of the run's environment;
``--sbatch-args``: the ``sbatch`` options from the ``launch`` section). The sbatch scripts in
``examples/slurm/`` evaluate these lines, or just print them with ``DRY_RUN=1``.
"""

from __future__ import annotations

import os
import shlex
from typing import Mapping, Optional

from megatron_mohge.config import ConfigError
from megatron_mohge.integration.flags import (
    OPTIM_FULLY_RESHARDABLE,
    defines_arg,
    megatron_lm_flags,
)

PROG = "python -m megatron_mohge.cli.slurm"
SHAPES = ("torchrun", "srun")
DEFAULT_MASTER_PORT = 29500


def _shape(run, shape: Optional[str]) -> str:
    shape = shape or run.launch.shape
    if shape not in SHAPES:
        raise ConfigError(f"launch.shape: {shape!r} is not one of {', '.join(SHAPES)}")
    return shape


def world_size(run) -> int:
    return run.launch.nodes * run.launch.gpus_per_node


def check_layout(run, env: Optional[Mapping[str, str]] = None) -> int:
    """Check the run against its launch size (and the Slurm job, when ``env`` has one);
    returns the data-parallel size."""
    env = env or {}
    nodes = env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")
    if nodes and int(nodes) != run.launch.nodes:
        raise ConfigError(f"launch.nodes={run.launch.nodes} but this Slurm job has {nodes} nodes "
                          "(SLURM_NNODES); submit with the run file's sbatch options "
                          "(--sbatch-args) or fix launch.nodes.")
    return run.check_world_size(world_size(run))


def sbatch_args(run, shape: Optional[str] = None) -> list[str]:
    """``sbatch`` options from the ``launch`` section (nodes, tasks, GPUs, queue, time, log)."""
    shape = _shape(run, shape)
    la = run.launch
    tasks = 1 if shape == "torchrun" else la.gpus_per_node
    args = [f"--job-name={run.name}", f"--nodes={la.nodes}", f"--ntasks-per-node={tasks}",
            f"--gpus-per-node={la.gpus_per_node}", f"--time={la.time}",
            f"--output={run.out_dir / 'slurm-%j.out'}"]
    if la.partition:
        args.append(f"--partition={la.partition}")
    if la.account:
        args.append(f"--account={la.account}")
    for a in args:
        if any(c.isspace() for c in a):
            raise ConfigError(f"sbatch option {a!r} contains whitespace; use names without spaces")
    return args


def render_env(run, env: Optional[Mapping[str, str]] = None) -> list[str]:
    """``export`` lines: Megatron-LM checkout, output folder and ``launch.env``.

    A ``MEGATRON_LM_DIR`` already in ``env`` wins over ``launch.megatron_lm_dir``.
    """
    env = env if env is not None else os.environ
    lines = []
    mlm = env.get("MEGATRON_LM_DIR") or run.launch.megatron_lm_dir
    if mlm:
        lines.append(f"export MEGATRON_LM_DIR={shlex.quote(str(mlm))}")
    lines.append(f"export MOHGE_OUT_DIR={shlex.quote(str(run.out_dir))}")
    for key, value in run.launch.env.items():
        if not key.isidentifier():
            raise ConfigError(f"launch.env: {key!r} is not a valid environment variable name")
        lines.append(f"export {key}={shlex.quote(value)}")
    return lines


def _container_flags(run) -> list[str]:
    la = run.launch
    f = []
    if la.container_image:
        f.append(f"--container-image={la.container_image}")
        if la.container_mounts:
            f.append(f"--container-mounts={','.join(la.container_mounts)}")
    elif la.container_mounts:
        raise ConfigError("launch.container_mounts: set launch.container_image too (pyxis mounts "
                          "are flags of a container step).")
    return f


def render_commands(run, script_path, env: Optional[Mapping[str, str]] = None, *,
                    shape: Optional[str] = None, python: str = "python",
                    mohge_config_path=None, script_args: Optional[list] = None) -> list[str]:
    """The exact command lines (shell syntax) that launch ``script_path`` for ``run``.

    ``env`` supplies ``MASTER_ADDR`` (default ``localhost``), ``MASTER_PORT`` (default 29500),
    ``SLURM_JOB_ID`` (rendezvous id) and, when present, ``SLURM_NNODES`` (checked against
    ``launch.nodes``). ``script_path``: the shipped ``pretrain_mohge.py`` (no patch;
    ``resources.launcher_path()``) or a patched checkout's ``pretrain_gpt.py``.
    """
    env = env if env is not None else os.environ
    shape = _shape(run, shape)
    check_layout(run, env)
    la = run.launch
    from megatron_mohge.compat.versions import megatron_lm_version

    mlm = env.get("MEGATRON_LM_DIR") or run.launch.megatron_lm_dir  # as render_env
    flags = script_args if script_args is not None else \
        megatron_lm_flags(run, mohge_config_path, megatron_lm_version(mlm),
                          optim_fully_reshardable=defines_arg(OPTIM_FULLY_RESHARDABLE, mlm))
    addr = env.get("MASTER_ADDR") or "localhost"
    port = env.get("MASTER_PORT") or str(DEFAULT_MASTER_PORT)
    job = env.get("SLURM_JOB_ID") or run.name
    srun = ["srun", f"--nodes={la.nodes}"]
    if shape == "torchrun":
        srun += [f"--ntasks={la.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                 *_container_flags(run)]
        cmd = srun + ["torchrun", f"--nnodes={la.nodes}", f"--nproc-per-node={la.gpus_per_node}",
                      f"--rdzv-id={job}", "--rdzv-backend=c10d",
                      f"--rdzv-endpoint={addr}:{port}", str(script_path), *flags]
        return [shlex.join(cmd)]
    srun += [f"--ntasks={world_size(run)}", f"--ntasks-per-node={la.gpus_per_node}",
             "--kill-on-bad-exit=1", *_container_flags(run)]
    inner = ("export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=$SLURM_NTASKS "
             f"MASTER_ADDR={shlex.quote(addr)} MASTER_PORT={shlex.quote(port)}; exec "
             + shlex.join([python, "-u", str(script_path), *flags]))
    return [shlex.join(srun + ["bash", "-c", inner])]
