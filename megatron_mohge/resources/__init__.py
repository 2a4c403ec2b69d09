"""Files shipped inside the package: reference configs, the Megatron-LM launcher, Slurm scripts.

They are package data (pyproject.toml's ``[tool.setuptools.package-data]``), read with
:mod:`importlib.resources`, so a regular ``pip install`` has them; nothing at run time reads the repository's
``examples/`` folder, which keeps user-facing copies of the same files (a test checks that
the copies agree). ``python -m megatron_mohge.cli.resources`` lists them with their paths;
``python -m megatron_mohge.cli.resources NAME`` prints the path of one, e.g.::

    mohge-check-config "$(python -m megatron_mohge.cli.resources configs/paper_3b_mohge.yaml)"
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from megatron_mohge.config.errors import ConfigError

LAUNCHER = "pretrain_mohge.py"  # Megatron-LM's pretrain_gpt.py with MoHGE layers
CONFIGS = "configs"
SLURM = "slurm"


def resource_path(name: str) -> Path:
    """File system path of shipped file ``name`` (``configs/tiny_mohge.yaml``,
    ``pretrain_mohge.py``, ``slurm/launch_torchrun.sbatch``).

    A real path, not a temporary copy: run YAMLs reference their layer YAML relative to
    themselves and Slurm runs the launcher by path, so the package must be installed as
    files (pip always does; a zipped egg would not work).
    """
    res = files(__name__).joinpath(*name.split("/"))
    if not res.is_file():
        raise ConfigError(f"megatron_mohge ships no file {name!r}; shipped: "
                          f"{', '.join(shipped_files())}")
    path = Path(str(res))
    if not path.is_file():  # pragma: no cover - only for zip imports
        raise ConfigError(f"shipped file {name!r} is not on the file system ({res}); install "
                          f"megatron-mohge with pip (unzipped)")
    return path


def config_path(name: str) -> Path:
    """Path of the shipped reference config ``name`` (e.g. ``tiny_mohge.yaml``)."""
    return resource_path(f"{CONFIGS}/{name}")


def launcher_path() -> Path:
    """Path of the patch-free Megatron-LM launcher script (``pretrain_mohge.py``)."""
    return resource_path(LAUNCHER)


def shipped_files() -> list[str]:
    """Names of all shipped files, sorted."""
    root = files(__name__)
    out = [LAUNCHER]
    for folder in (CONFIGS, SLURM):
        out += [f"{folder}/{f.name}" for f in root.joinpath(folder).iterdir() if f.is_file()]
    return sorted(out)


__all__ = ["resource_path", "config_path", "launcher_path", "shipped_files", "LAUNCHER"]
