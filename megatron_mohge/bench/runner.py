"""Running the trainings of a benchmark: one ``mohge-train`` process tree per (seed, run)
(``torchrun`` when the preset uses several ranks), several at a time, each with its own log;
and the layer microbenchmark in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Optional

import yaml

from megatron_mohge.bench.presets import Preset
from megatron_mohge.bench.progress import Progress, duration, layer_bench_line
from megatron_mohge.util.usage_errors import ERROR_FILE_ENV, read_usage_error
from megatron_mohge.config import ConfigError
from megatron_mohge.config.run import RunConfig


class RunFailedError(RuntimeError):
    """A run of the benchmark crashed (its traceback is in the log above)."""


def launch_command(config_path: Path, nproc: int) -> list[str]:
    """``mohge-train`` for one run: plain Python for one rank, else torchrun (gloo on CPU)
    through ``megatron_mohge.cli.launch``, which reports a rank's usage error as one line."""
    train = ["-m", "megatron_mohge.cli.train", "--config", str(config_path)]
    if nproc == 1:
        return [sys.executable, *train]
    return [sys.executable, "-m", "megatron_mohge.cli.launch", "--standalone",
            f"--nproc-per-node={nproc}", *train]


def config_path(out_dir: Path, name: str, run: RunConfig) -> Path:
    return out_dir / "configs" / f"{name}.seed{run.train.seed}.yaml"


@dataclass
class _Active:
    """One training process in flight."""

    key: object
    name: str
    run: RunConfig
    proc: subprocess.Popen
    cfg_path: Path
    log_file: Optional[Path]
    out: Optional[IO]
    t0: float


def _start_run(key, name: str, run: RunConfig, nproc: int, out_dir: Path, threads: int,
               log_file: Optional[Path], log=print, label: str = "") -> _Active:
    cfg_path = config_path(out_dir, name, run)
    cfg_path.parent.mkdir(parents=True, exist_ok=True)
    run.to_yaml(cfg_path)
    summary_path = run.out_dir / "summary.json"
    if summary_path.exists():
        summary_path.unlink()
    env = dict(os.environ)
    # One BLAS thread per rank when several ranks (or runs) share the cores.
    if threads > 0:
        env.setdefault("OMP_NUM_THREADS", str(threads))
    if log_file is not None:  # line by line into the log, not in blocks at exit
        env.setdefault("PYTHONUNBUFFERED", "1")
    # A rank's usage error (bad data, config) comes back here, reported once (usage_errors.py).
    error_file = _usage_error_file(cfg_path)
    error_file.unlink(missing_ok=True)
    env[ERROR_FILE_ENV] = str(error_file)
    cmd = launch_command(cfg_path, nproc)
    where = f" (log: {log_file})" if log_file else ""
    log(f"[bench] {label}{': ' if label else ''}{name} seed {run.train.seed}: "
        f"{' '.join(cmd[1:])}{where}")
    out = None
    if log_file is not None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        out = open(log_file, "w")
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None)
    return _Active(key, name, run, proc, cfg_path, log_file, out, time.perf_counter())


def _usage_error_file(cfg_path: Path) -> Path:
    return cfg_path.with_suffix(".usage_error.txt")


def _finish_run(a: _Active, cpu_s: Optional[float]) -> dict:
    if a.out is not None:
        a.out.close()
    summary_path = a.run.out_dir / "summary.json"
    error = read_usage_error(_usage_error_file(a.cfg_path))
    if error is not None:
        raise ConfigError(f"run {a.name}: {error.message}")
    if a.proc.returncode != 0 or not summary_path.is_file():
        where = f"its log is {a.log_file}" if a.log_file else "its log is above"
        raise RunFailedError(f"run {a.name} (seed {a.run.train.seed}) failed (exit "
                             f"{a.proc.returncode}); {where} and its config {a.cfg_path}")
    summary = json.loads(summary_path.read_text())
    summary["wall_s"] = time.perf_counter() - a.t0
    # CPU seconds of the run (all ranks): a cost figure a busy machine does not inflate
    summary["cpu_s"] = cpu_s
    return summary


def _reap(active: list[_Active]) -> tuple[Optional[_Active], Optional[float]]:
    """A finished run and its CPU seconds, or (None, None). Reaped with wait4, so the
    resource usage covers the run's whole process tree (torchrun and its ranks)."""
    for a in active:
        pid, status, usage = os.wait4(a.proc.pid, os.WNOHANG)
        if pid:
            a.proc.returncode = os.waitstatus_to_exitcode(status)
            return a, usage.ru_utime + usage.ru_stime
    return None, None


def train_runs(queue: list[tuple], nproc_of, out_dir: Path, jobs: int = 1, log=print,
               progress: Optional[Progress] = None):
    """Train ``queue`` (``(key, name, RunConfig)`` tuples) with up to ``jobs`` runs at once;
    yields ``(key, name, run, summary)`` in completion order. With one job the run's output
    goes to this terminal, else to ``out_dir/logs/<name>.seed<seed>.log``. ``progress``
    numbers the start lines ("run 3/6")."""
    cpus = os.cpu_count() or 1
    pending, active = list(queue), []
    try:
        while pending or active:
            while pending and len(active) < jobs:
                key, name, run = pending.pop(0)
                nproc = nproc_of(run)
                threads = max(1, cpus // (nproc * jobs)) if nproc * jobs > 1 else 0
                log_file = (out_dir / "logs" / f"{name}.seed{run.train.seed}.log"
                            if jobs > 1 else None)
                active.append(_start_run(key, name, run, nproc, out_dir, threads, log_file,
                                         log, progress.start() if progress else ""))
            done, cpu_s = _reap(active)
            if done is None:
                time.sleep(0.5)
                continue
            active.remove(done)
            yield done.key, done.name, done.run, _finish_run(done, cpu_s)
    finally:
        # a failed or interrupted run stops the others (only the processes started here);
        # SIGTERM first, so torchrun stops its ranks
        for a in active:
            a.proc.terminate()
        for a in active:
            try:
                a.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                a.proc.kill()
                a.proc.wait()
            if a.out is not None:
                a.out.close()


def train_run(name: str, run: RunConfig, nproc: int, out_dir: Path, log=print) -> dict:
    """One run in the foreground (its output on this terminal)."""
    for *_, summary in train_runs([(None, name, run)], lambda _: nproc, out_dir, 1, log):
        return summary
    raise AssertionError("unreachable")


def run_layer_bench_subprocess(preset: Preset, mohge_cfg: dict, out_dir: Path, log=print,
                               lb: Optional[dict] = None, backend: str = "local",
                               tag: str = "") -> dict:
    """The layer microbenchmark in its own (single-rank) process, for a clean timing.

    ``lb``: the shape (default ``preset.layer_bench``); ``tag`` suffixes the output name."""
    cfg_path = out_dir / "configs" / "layer_bench_mohge.yaml"
    cfg_path.write_text(yaml.safe_dump(mohge_cfg, sort_keys=False))
    out = out_dir / f"layer_bench{tag}.json"
    lb = lb or preset.layer_bench
    cmd = [sys.executable, "-m", "megatron_mohge.cli.layer_bench", "--config", str(cfg_path),
           "--hidden", str(lb["hidden_size"]), "--tokens", str(lb["tokens"]),
           "--stock-experts", str(lb["stock_num_experts"]), "--stock-width", str(lb["stock_width"]),
           "--stock-topk", str(lb["stock_topk"]), "--repeats", str(lb["repeats"]),
           "--warmup", str(lb["warmup"]), "--width-scale", str(lb.get("width_scale", 1)),
           "--backend", backend, "--out", str(out)]
    import torch

    log(f"[bench] {layer_bench_line(lb, backend, torch.cuda.is_available())}")
    log(f"[bench]   {' '.join(cmd[1:])}")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd)
    if proc.returncode != 0:
        raise RunFailedError(f"layer microbenchmark failed (exit {proc.returncode}); its log "
                             f"is above")
    log(f"[bench] layer microbenchmark done ({duration(time.perf_counter() - t0)})")
    return json.loads(out.read_text())
