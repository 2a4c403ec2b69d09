"""The command lines' shared parts (cli/common.py): run file + overrides, one-line errors."""

import signal
from pathlib import Path

import pytest

from megatron_mohge.cli import common
from megatron_mohge.config import ConfigError
from megatron_mohge.util.usage_errors import USAGE_EXIT

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "configs" / "cpu_tiny_mohge.yaml")
MISSING = "/nonexistent/run.yaml"


def _cli(name):
    import importlib

    return importlib.import_module(name)


#: (module, argv naming a missing run file, the one-line prefix): every run-file CLI.
RUN_FILE_CLIS = [
    ("megatron_mohge.cli.train", ["--config", MISSING], "mohge-train: "),
    ("megatron_mohge.cli.pretrain", ["--config", MISSING], "mohge-pretrain: "),
    ("megatron_mohge.cli.check_config", [MISSING], "mohge-check-config: "),
    ("megatron_mohge.cli.slurm", [MISSING], "megatron_mohge.cli.slurm: "),
]


def _one_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize("module, argv, prefix", RUN_FILE_CLIS)
def test_missing_run_file_is_one_line_and_exit_2(module, argv, prefix, capsys):
    assert _cli(module).main(argv) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(prefix) and f"file not found: {MISSING}" in line


@pytest.mark.parametrize("module, argv, prefix", RUN_FILE_CLIS)
def test_run_file_and_overrides_parse_alike(module, argv, prefix, capsys):
    """Every run-file CLI takes the file and ``key.sub=value`` overrides the same way, and a
    bad override is refused with its field named, on one line."""
    mod = _cli(module)
    args = mod.parse_args([argv[0], TINY, "train.iters=3", "eval.iters=1"] if argv[0] ==
                          "--config" else [TINY, "train.iters=3", "eval.iters=1"])
    assert args.config == TINY and args.overrides == ["train.iters=3", "eval.iters=1"]
    assert common.load_run(args).train.iters == 3
    bad = [argv[0], TINY, "train.nope=1"] if argv[0] == "--config" else [TINY, "train.nope=1"]
    assert mod.main(bad) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(prefix + "train.nope: unknown key")
    with pytest.raises(SystemExit) as info:
        mod.parse_args(["--help"])
    assert info.value.code == 0
    assert "key.sub=value" in capsys.readouterr().out


def test_other_clis_report_config_errors_on_one_line(tmp_path, capsys):
    from megatron_mohge.cli import bench, prepare_data
    from megatron_mohge.cli import resources

    assert bench.main(["--runs", "nope", "--dry-run", "--out", str(tmp_path)]) == 2
    assert _one_line(capsys.readouterr().err).startswith(
        "mohge-bench: --runs: preset default has no run 'nope'")
    assert resources.main(["no-such-file"]) == 2
    assert _one_line(capsys.readouterr().err).startswith(
        "python -m megatron_mohge.cli.resources: megatron_mohge ships no file 'no-such-file'")
    assert prepare_data.main([str(tmp_path / "absent")]) == 2  # argparse's "error:" form
    assert _one_line(capsys.readouterr().err).startswith("mohge-prepare-data: error: input path")


def test_run_cli_turns_only_config_errors_into_the_usage_exit(capsys):
    def bad(args):
        raise ConfigError(f"model.hidden_size: {args} is not a number")

    assert common.run_cli("tool", lambda args: 7, None) == 7
    assert common.run_cli("tool", bad, "x") == USAGE_EXIT == 2
    assert capsys.readouterr().err == "tool: model.hidden_size: x is not a number\n"
    seen = []
    assert common.run_cli("tool", bad, "y", report=lambda p, e: seen.append((p, str(e))) or 5) == 5
    assert seen == [("tool", "model.hidden_size: y is not a number")]
    with pytest.raises(KeyError):  # anything else is a bug: its traceback is kept
        common.run_cli("tool", lambda args: {}[args], "z")


def test_mohge_train_reports_a_run_time_config_error_once(tmp_path, monkeypatch, capsys):
    """A ConfigError found after the config loaded (bad data, busy folder) takes the same
    one-line exit, through the multi-rank reporter (usage_errors: here a launcher collects
    it in $MOHGE_USAGE_ERROR_FILE, so nothing is printed)."""
    from megatron_mohge.cli import train
    from megatron_mohge.util.usage_errors import ERROR_FILE_ENV, read_usage_error
    from megatron_mohge.training import trainer

    class BusyTrainer:
        def __init__(self, run):
            raise ConfigError(f"output_dir: {run.out_dir} is in use by another run")

    monkeypatch.setattr(trainer, "Trainer", BusyTrainer)
    monkeypatch.setenv(ERROR_FILE_ENV, str(tmp_path / "usage_error.txt"))
    before = signal.getsignal(signal.SIGTERM)
    try:
        assert train.main(["--config", TINY, "output_dir=/tmp/busy"]) == 2
    finally:
        signal.signal(signal.SIGTERM, before)
    assert read_usage_error(tmp_path / "usage_error.txt") == \
        ("mohge-train", "output_dir: /tmp/busy is in use by another run")
    assert "Traceback" not in capsys.readouterr().err
    monkeypatch.delenv(ERROR_FILE_ENV)
    assert train.main(["--config", TINY, "train.nope=1"]) == 2  # load errors alike, printed
    assert _one_line(capsys.readouterr().err).startswith("mohge-train: train.nope: unknown key")


def test_mohge_pretrain_without_megatron_training_is_one_line(monkeypatch, capsys):
    from megatron_mohge.cli import pretrain
    from megatron_mohge.compat import versions

    def missing(prog):
        raise versions.MegatronTrainingMissing(f"{prog} needs megatron.training")

    monkeypatch.setattr(versions, "require_megatron_training", missing)
    assert pretrain.main(["--config", TINY]) == 2
    assert _one_line(capsys.readouterr().err) == \
        "mohge-pretrain: mohge-pretrain needs megatron.training"


def test_bench_tools_report_bad_input_on_one_line(tmp_path, capsys):
    """Regression: a missing --config of the layer bench, or a missing / malformed
    results.json of the report, ended in a traceback (exit 1)."""
    from megatron_mohge.cli import layer_bench, report

    assert layer_bench.cli(["--config", str(tmp_path / "no.yaml")]) == 2
    assert _one_line(capsys.readouterr().err).startswith(
        "python -m megatron_mohge.cli.layer_bench: MoHGEConfig.from_yaml: file not found")
    (tmp_path / "bad.json").write_text("{not json")
    for name in ("missing.json", "bad.json"):
        assert report.cli([str(tmp_path / name)]) == 2
        line = _one_line(capsys.readouterr().err)
        assert line.startswith(f"python -m megatron_mohge.cli.report: {tmp_path / name}: "
                               "cannot read the benchmark results")
    assert not list(tmp_path.glob("*.md"))  # nothing written
