"""A rank's usage error reads as one line, once: mohge-train, the torchrun wrapper, mohge-bench."""

import json

import pytest

from megatron_mohge.util.usage_errors import ERROR_FILE_ENV, read_usage_error, report_usage_error
from megatron_mohge.config import ConfigError


def test_collected_error_is_written_once_not_printed(tmp_path, monkeypatch, capsys):
    path = tmp_path / "err.txt"
    monkeypatch.setenv(ERROR_FILE_ENV, str(path))
    assert report_usage_error("mohge-train", ConfigError("first rank")) == 2
    assert report_usage_error("mohge-train", ConfigError("second rank")) == 2
    assert read_usage_error(path) == ("mohge-train", "first rank")
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("rank, printed", [("0", True), ("1", False)])
def test_under_plain_torchrun_rank0_prints_and_torchrun_gets_the_message(
        tmp_path, monkeypatch, capsys, rank, printed):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    monkeypatch.delenv(ERROR_FILE_ENV, raising=False)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "error.json"))
    report_usage_error("mohge-train", ConfigError("bad data"))
    assert capsys.readouterr().err == ("mohge-train: bad data\n" if printed else "")
    # torchrun's own report (ChildFailedError) reads the file: the message is shown there.
    failure = ProcessFailure(local_rank=0, pid=1, exitcode=2,
                             error_file=str(tmp_path / "error.json"))
    assert failure.message["message"] == "mohge-train: bad data"
    assert json.loads((tmp_path / "error.json").read_text())["message"]["extraInfo"][
        "py_callstack"] == "mohge-train: bad data"


def test_the_launcher_names_the_tool_it_launched(tmp_path):
    """Issue 25.6: ``python -m megatron_mohge.cli.launch ... -m megatron_mohge.cli.pretrain``
    labelled the rank's usage error ``mohge-train:``."""
    import os
    import subprocess
    import sys

    from tests.test_trainer import REPO

    run = tmp_path / "run.yaml"
    run.write_text("train:\n  iters: 2\n")
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_mohge.cli.launch", "--standalone", "--nproc-per-node=1",
         "-m", "megatron_mohge.cli.pretrain", "--config", str(run), "train.nope=1"],
        capture_output=True, text=True, cwd=str(REPO), timeout=300,
        env={k: v for k, v in os.environ.items() if k != ERROR_FILE_ENV})
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = _stderr_lines(proc.stderr)
    assert len(lines) == 1 and lines[0].startswith(
        "mohge-pretrain: train.nope: unknown key in TrainConfig."), proc.stderr[-3000:]


def _stderr_lines(text: str) -> list[str]:
    # Library warnings (megatron-core: "Apex / TE not installed") are not our messages.
    return [l for l in text.splitlines()
            if l.strip() and "warn" not in l.lower()]


@pytest.mark.slow
def test_two_rank_usage_error_is_one_line(tmp_path, capfd):
    """mohge-bench's run step on 2 ranks (torchrun through megatron_mohge.cli.launch) with a
    missing dataset. Before: 66 lines (torchrun's ChildFailedError wall, then mohge-bench's
    RuntimeError traceback). Now: the ranks and the launcher print nothing, mohge-bench gets
    the message as a ConfigError, which cli/bench.py prints as its one line."""
    from megatron_mohge.bench import e2e
    from megatron_mohge.bench.presets import get_preset
    from megatron_mohge.bench.runner import train_run

    missing = tmp_path / "missing"
    runs = e2e.run_configs(get_preset("default"), tmp_path, names=["moe"], data=[str(missing)],
                           iters=2)
    with pytest.raises(ConfigError) as info:
        train_run("moe", runs["moe"], 2, tmp_path, log=lambda *a: None)
    assert str(info.value) == (
        f"run moe: dataset {str(missing)!r} not found: missing {missing}.bin and {missing}.idx. "
        f"Prepare it with `mohge-prepare-data [INPUT ...] --output-prefix {missing}` (no INPUT: "
        f"the stdlib corpus), or pass the prefix of an existing .bin/.idx pair")
    assert "\n" not in str(info.value)
    err = _stderr_lines(capfd.readouterr().err)
    assert not [l for l in err if "Traceback" in l or "ChildFailedError" in l or
                "mohge-train:" in l or "exitcode" in l], err
