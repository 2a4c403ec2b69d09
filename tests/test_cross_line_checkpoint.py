"""A checkpoint saved on one megatron-core line loads on the other with the same logits.

Runs when ``MOHGE_OTHER_PYTHON`` names the Python of the other line's venv (``.ci/run`` sets
it: the 0.19 suite gets ``.venv-0.16/bin/python`` and vice versa); skipped otherwise. Each
direction saves a trained MoHGE GPT with one line (EP2, alltoall) and loads it with the
other (EP1, allgather), so it also crosses EP sizes and dispatchers.
"""

import os
import subprocess

import pytest

from tests._launch import run_workers

OTHER = os.environ.get("MOHGE_OTHER_PYTHON")
pytestmark = pytest.mark.skipif(not OTHER, reason="MOHGE_OTHER_PYTHON (the other line's "
                                                   "venv python) is not set")


def _mcore(python: str) -> str:
    return subprocess.run([python, "-c", "from importlib.metadata import version; "
                           "print(version('megatron-core'))"], capture_output=True, text=True,
                          check=True).stdout.strip()


@pytest.mark.parametrize("direction", ["other_to_this", "this_to_other"])
def test_checkpoint_crosses_megatron_core_lines(tmp_path, direction):
    import sys

    this = sys.executable
    saver, loader = (OTHER, this) if direction == "other_to_this" else (this, OTHER)
    assert _mcore(saver) != _mcore(loader), "MOHGE_OTHER_PYTHON must be the other line's venv"
    saved = run_workers("checkpoint_worker.py", 2, "--mode", "save", "--ckpt", str(tmp_path),
                        "--ep", "2", python=saver)
    assert saved["losses"][-1] < saved["losses"][0]  # it really trained
    loaded = run_workers("checkpoint_worker.py", 1, "--mode", "load", "--ckpt", str(tmp_path),
                         "--ep", "1", python=loader)
    assert loaded["logits_max_abs_diff"] <= 1e-5 * loaded["logits_scale"]
    assert loaded["heldout_loss"] == pytest.approx(saved["heldout_loss"], rel=1e-6)
