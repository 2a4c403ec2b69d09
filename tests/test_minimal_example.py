"""The README's minimal example runs as written: it is the core of examples/minimal_gpt.py,
which builds a GPTModel with MoHGE layers on CPU and runs one forward + backward."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "minimal_gpt.py"


def readme_block() -> str:
    section = (ROOT / "README.md").read_text().split("## Minimal example", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_example_is_the_core_of_the_example_file():
    block = readme_block()
    assert len(block.splitlines()) > 15
    assert block in EXAMPLE.read_text(), \
        "README's minimal example and examples/minimal_gpt.py differ: edit both"


def test_the_example_runs_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, str(EXAMPLE)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    loss = float(re.search(r"^lm loss (\S+)$", out, re.M).group(1))
    assert math.isfinite(loss) and 4.0 < loss < 7.0  # ~ln(257) = 5.55 at initialisation
    for name in ("mohge_group_loss", "mohge_group_balance_loss"):
        value = float(re.search(rf"^{name} (\S+) ", out, re.M).group(1))
        assert math.isfinite(value) and value > 0, name
    have, total = map(int, re.search(r"^(\d+) of (\d+) parameters have gradients", out, re.M).groups())
    assert have == total
