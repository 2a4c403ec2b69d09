"""A regular (non-editable) install works from any folder; shipped files = examples/ copies.

Before: the package read the repository's ``examples/`` at run time, so after
``pip install .`` ``mohge-bench --dry-run`` died on ``.../site-packages/examples/configs/
tiny_mohge.yaml: file not found`` and the Slurm scripts pointed at a missing launcher.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from megatron_mohge.resources import resource_path, shipped_files

REPO = Path(__file__).resolve().parents[1]
# examples/ file -> the shipped file it copies
COPIES = {
    **{f"examples/configs/{p.name}": f"configs/{p.name}"
       for p in (REPO / "examples" / "configs").glob("*.yaml")},
    **{f"examples/slurm/{p.name}": f"slurm/{p.name}"
       for p in (REPO / "examples" / "slurm").glob("*.sbatch")},
    "examples/pretrain_mohge.py": "pretrain_mohge.py",
}


def test_examples_copies_agree_with_shipped_files():
    assert sorted(COPIES.values()) == shipped_files(), \
        "examples/ and megatron_mohge/resources/ must hold the same files"
    differ = [ex for ex, shipped in COPIES.items()
              if (REPO / ex).read_bytes() != resource_path(shipped).read_bytes()]
    assert not differ, (f"{differ} differ from their copies in megatron_mohge/resources/; "
                        f"edit both (the package reads the shipped ones)")


def test_nothing_reads_examples_at_run_time():
    offenders = [str(p.relative_to(REPO)) for p in (REPO / "megatron_mohge").rglob("*.py")
                 if "resources" not in p.parts
                 and '"examples"' in p.read_text(encoding="utf-8")]
    assert not offenders


def _run(cmd, cwd, env, timeout=300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


@pytest.mark.slow
def test_wheel_installs_and_runs_from_an_unrelated_folder(tmp_path):
    # 1. Build a wheel from a clean copy of the sources (keeps build/ out of the checkout).
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "megatron_mohge", src / "megatron_mohge",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_REQUIRE_VIRTUALENV")}
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
          "--disable-pip-version-check", "-q", "-w", str(tmp_path / "wheels"), str(src)],
         tmp_path, env)
    wheel = next((tmp_path / "wheels").glob("megatron_mohge-*.whl"))

    # 2. A fresh venv, the wheel installed into it (no editable install, no source tree).
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    py = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
          "--disable-pip-version-check", "-q", str(wheel)], tmp_path, env)
    # Dependencies (torch CPU, megatron-core, ...) from this interpreter's site-packages, added
    # after the install as a plain path: its .pth files (our editable install) stay inactive.
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     tmp_path, env).stdout.strip())
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz_outer_deps.pth").write_text("\n".join(sorted(deps)) + "\n")

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**env, "PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
           "PYTHONWARNINGS": "ignore"}
    where = _run([str(py), "-c", "import megatron_mohge; print(megatron_mohge.__file__)"],
                 work, env).stdout.strip()
    assert Path(where).is_relative_to(site), where

    # 3. mohge-bench --dry-run (reads the shipped presets' configs).
    out = _run([str(venv / "bin" / "mohge-bench"), "--dry-run", "--out", "bench"], work, env)
    assert "megatron_mohge.cli.train" in out.stdout
    assert list((work / "bench" / "configs").glob("mohge.seed*.yaml"))  # one per seed

    # 4. mohge-check-config on a shipped config, found with python -m megatron_mohge.cli.resources.
    cfg = _run([str(py), "-m", "megatron_mohge.cli.resources", "configs/small_mohge_1node.yaml"],
               work, env).stdout.strip()
    assert Path(cfg).is_relative_to(site)
    _run([str(venv / "bin" / "mohge-check-config"), cfg], work, env)

    # 5. The Slurm dry run: the shipped sbatch script renders the shipped launcher.
    sbatch = _run([str(py), "-m", "megatron_mohge.cli.resources", "slurm/launch_torchrun.sbatch"],
                  work, env).stdout.strip()
    slurm_env = {**env, "DRY_RUN": "1", "PYTHON": str(py),
                 "MEGATRON_LM_DIR": str(tmp_path / "Megatron-LM")}
    slurm_env.pop("SLURM_JOB_ID", None)
    rendered = _run(["bash", sbatch, cfg, f"output_dir={work / 'slurm_run'}"], work, slurm_env)
    launcher = str(Path(site) / "megatron_mohge" / "resources" / "pretrain_mohge.py")
    assert any(line.startswith("+ srun ") and launcher in line
               for line in rendered.stdout.splitlines()), rendered.stdout
    assert Path(launcher).is_file()
