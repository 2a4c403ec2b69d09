"""Golden ``TransformerConfig`` of the benchmark runs, written by the code before the
MoE-mapping refactor: the refactor (and later changes) must reproduce it.

``snapshot(run)`` is every field of ``training.model_builder.transformer_config(run)`` on one rank
(TP=EP=PP=1), as JSON values; ``tests/data/transformer_config_golden.json`` holds it for the
runs below, per megatron-core line (the field set differs), written by the code before the
MoE-argument mapping was made one source. Rewrite a line's entry (``python -m
tests._tc_golden`` in that line's venv) only for an intended change, and say which field moved.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "transformer_config_golden.json"
CONFIGS = ROOT / "examples" / "configs"


def golden_runs() -> dict:
    """name -> RunConfig: every run of the default and ablation presets, the CPU configs."""
    from megatron_mohge.bench.presets import get_preset
    from megatron_mohge.config.run import RunConfig

    runs = {}
    for preset in ("default", "load-balance-ablation"):
        p = get_preset(preset)
        for name, d in p.run_dicts([*p.runs, *p.optional_runs]).items():
            runs[f"{preset}/{name}"] = RunConfig.from_dict(d)
    for name in ("cpu_tiny_moe.yaml", "cpu_tiny_mohge.yaml"):
        runs[name] = RunConfig.from_yaml(CONFIGS / name)
    return runs


def _jsonable(v):
    if isinstance(v, functools.partial):
        return {"partial": _jsonable(v.func), "args": [_jsonable(a) for a in v.args],
                "kwargs": {k: _jsonable(x) for k, x in sorted(v.keywords.items())}}
    if isinstance(v, (bool, int, float, str)) or v is None:
        return v
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
    if callable(v) and hasattr(v, "__qualname__"):
        return f"{getattr(v, '__module__', '')}.{v.__qualname__}"
    return repr(v)


def line() -> str:
    """The installed megatron-core line, ``MAJOR.MINOR`` (the golden file's key)."""
    from megatron_mohge.compat.versions import mcore_version

    v = mcore_version()
    return f"{v.major}.{v.minor}"


def snapshot(run) -> dict:
    from megatron_mohge.training.model_builder import transformer_config

    tc = transformer_config(run)
    return {f.name: _jsonable(getattr(tc, f.name)) for f in dataclasses.fields(tc)}


def pack(snapshots: dict) -> dict:
    """``{"common": fields equal in every run, "runs": {name: the run's other fields}}``."""
    first = next(iter(snapshots.values()))
    common = {k: v for k, v in first.items() if all(s.get(k, v) == v and k in s
                                                   for s in snapshots.values())}
    return {"common": common,
            "runs": {n: {k: v for k, v in s.items() if k not in common}
                     for n, s in snapshots.items()}}


def expected(line_entry: dict, name: str) -> dict:
    """The golden snapshot of run ``name`` (inverse of :func:`pack`)."""
    return {**line_entry["common"], **line_entry["runs"][name]}


def main() -> None:  # needs the 1-rank layout: run under the mcore_world1 set-up
    import os
    import socket

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_mohge.compat import enable_cpu_mode

    enable_cpu_mode()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    ps.initialize_model_parallel()
    data = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    data[line()] = pack({name: snapshot(run) for name, run in golden_runs().items()})
    GOLDEN.parent.mkdir(parents=True, exist_ok=True)
    GOLDEN.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN} ({len(data[line()]['runs'])} runs for megatron-core {line()})")


if __name__ == "__main__":
    main()
