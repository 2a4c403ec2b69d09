"""Write the shipped lm-eval-harness task (``resources/lm_eval/mohge_heldout.yaml``) for one
local JSON-lines file: ``python -m megatron_mohge.cli.lm_eval_task DATA.jsonl DIR``,
then ``lm_eval ... --include_path DIR --tasks mohge_heldout``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import yaml

from megatron_mohge.config import ConfigError

TASK = "mohge_heldout"


def template() -> dict:
    text = (resources.files("megatron_mohge.resources") / "lm_eval" / f"{TASK}.yaml").read_text()
    return yaml.safe_load(text)


def write_task(data_file, out_dir, task: str = TASK) -> Path:
    """``out_dir/<task>.yaml`` reading ``data_file`` (absolute path); returns the file."""
    data = Path(data_file).resolve()
    if not data.is_file():
        raise ConfigError(f"{data_file}: no such JSON-lines file")
    cfg = template()
    cfg["task"] = task
    cfg["dataset_kwargs"]["data_files"]["test"] = str(data)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{task}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path
