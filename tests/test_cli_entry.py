"""What every mohge command does around its work (cli/common.entry, cli/notices.py): library
notices hidden unless ``-v``, no traceback when the reader of a pipe stops early, and the
preset list of ``mohge-bench --help`` taken from the preset table."""

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from megatron_mohge.cli import common, notices

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "configs" / "cpu_tiny_mohge.yaml")
ENV = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
ENV.pop(notices.VERBOSE_ENV, None)


def _emit_notices():
    """One of each hidden notice, and one warning that must stay."""
    warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch "
                  "optimizers.", UserWarning)
    warnings.warn("Apex is not installed. Falling back to Torch Norm", UserWarning)
    warnings.warn("full scope is deprecated. Use empty cuda_graph_modules", UserWarning)
    warnings.warn("Transformer Engine and Apex are not installed", RuntimeWarning)  # other kind
    warnings.warn("megatron-mohge: something the user should see", UserWarning)


def test_notices_are_hidden_by_message_and_category_and_others_still_show(monkeypatch):
    monkeypatch.delenv(notices.VERBOSE_ENV, raising=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        notices.quiet_library_notices()
        _emit_notices()
    assert [str(w.message) for w in seen] == [
        "Transformer Engine and Apex are not installed",
        "megatron-mohge: something the user should see"]
    assert [w.category for w in seen] == [RuntimeWarning, UserWarning]


def test_verbose_shows_the_notices_again_and_tells_child_processes(monkeypatch):
    monkeypatch.setenv(notices.VERBOSE_ENV, "0")  # restored after the test
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        notices.quiet_library_notices()
        args = common.parser("prog", "doc").parse_args(["-v"])
        _emit_notices()
    assert args.verbose and os.environ[notices.VERBOSE_ENV] == "1"
    assert len(seen) == 5


def test_log_notices_are_filtered_by_logger_and_message(monkeypatch):
    monkeypatch.delenv(notices.VERBOSE_ENV, raising=False)
    notices.quiet_library_notices()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    log = logging.getLogger("torch.utils.cpp_extension")
    log.addHandler(handler)
    try:
        log.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        log.warning("another line of that logger")
        monkeypatch.setenv(notices.VERBOSE_ENV, "1")
        log.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
    finally:
        log.removeHandler(handler)
    assert [r.getMessage() for r in records] == [
        "another line of that logger", "No CUDA runtime is found, using CUDA_HOME='/usr/local'"]


@pytest.mark.slow  # two fresh imports of megatron-core: a minute on a busy 2-core machine
def test_a_command_importing_megatron_prints_none_of_the_notices():
    """The real thing, in a fresh process: megatron-core's import-time warnings (none on a
    machine that has Transformer Engine or Apex) and torch's CUDA_HOME line are gone; with
    MOHGE_VERBOSE=1 they are back."""
    code = ("import sys; from megatron_mohge.cli import common\n"
            "@common.entry\n"
            "def main():\n"
            "    import megatron.core.optimizer, torch.utils.cpp_extension\n"
            "    return 0\n"
            "sys.exit(main())")
    quiet = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True,
                           text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert "Transformer Engine and Apex" not in quiet.stderr
    assert "CUDA_HOME" not in quiet.stderr
    loud = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(ENV, **{notices.VERBOSE_ENV: "1"}), timeout=300)
    assert loud.returncode == 0, loud.stderr
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        try:
            import apex  # noqa: F401
        except ImportError:
            assert "Transformer Engine and Apex are not installed" in loud.stderr


@pytest.mark.parametrize("argv", [["-m", "megatron_mohge.cli.check_config", TINY, "--json"],
                                  ["-m", "megatron_mohge.cli.bench", "--help"]])
def test_a_closed_pipe_ends_quietly_with_141(argv):
    """``mohge-check-config ... | head -1`` with a reader gone before the output is written:
    no BrokenPipeError traceback, exit status 128 + SIGPIPE."""
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the command writes
    try:
        proc = subprocess.run([sys.executable, *argv], stdout=write, stderr=subprocess.PIPE,
                              text=True, env=ENV, timeout=120)
    finally:
        os.close(write)
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr
    # argparse's --help swallows the write error itself (and exits 0)
    assert proc.returncode == (0 if "--help" in argv else common.BROKEN_PIPE_EXIT)


def test_every_command_runs_through_entry():
    """A new command without ``@common.entry`` (or run_file_cli / main_status, which apply
    it) would print the notices and a BrokenPipe traceback again."""
    import importlib

    for name in ("bench", "check_config", "eval", "export_hf", "launch", "prepare_data",
                 "pretrain", "train"):
        main = importlib.import_module(f"megatron_mohge.cli.{name}").main
        assert getattr(main, "__wrapped__", None) is not None, name


def test_bench_help_lists_every_preset_with_its_description(capsys):
    from megatron_mohge.bench.presets import PRESETS, get_preset
    from megatron_mohge.cli import bench

    with pytest.raises(SystemExit):
        bench.parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())  # unwrapped
    listed = out[out.index("presets:"):]
    for name in PRESETS:
        assert f"{name} {' '.join(get_preset(name).description.split())}" in listed
