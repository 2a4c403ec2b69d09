"""What the mohge command lines share: the run-file arguments and the one-line error exit.

Every tool that reads a run YAML takes it the same way (``--config PATH`` or a positional)
followed by ``key.sub=value`` overrides, and every tool ends a ``ConfigError`` (bad config,
data, checkpoint, launch layout...) as ``PROG: message`` on stderr with exit status 2 (argparse's
own status for usage errors), never with a traceback. Every ``main`` runs through
:func:`entry`: library notices quieted (``-v`` shows them, :mod:`.notices`), and output piped
into a reader that stops early (``| head``) ends quietly.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from typing import Any, Callable, Optional

from megatron_mohge.cli import notices
from megatron_mohge.config import ConfigError
from megatron_mohge.util.usage_errors import print_error

# 128 + SIGPIPE: the status a shell shows for a tool whose reader went away (``| head``)
BROKEN_PIPE_EXIT = 141
RUN_YAML_HELP = "run YAML (see examples/configs/)"


def entry(main: Callable[..., int]) -> Callable[..., int]:
    """Decorate a command's ``main(argv=None)``: the library notices are quieted before
    anything imports megatron-core (:func:`notices.quiet_library_notices`), and a reader that
    closes the pipe early (``mohge-bench --help | head -1``) ends the command with
    :data:`BROKEN_PIPE_EXIT` instead of a ``BrokenPipeError`` traceback."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        notices.quiet_library_notices()
        try:
            status = main(*args, **kwargs)
            sys.stdout.flush()  # a closed pipe shows up here, not at interpreter exit
            return status
        except BrokenPipeError:
            # Python flushes stdout once more at exit: point it at devnull so that flush
            # cannot raise again (the pattern of the Python docs' signal module page)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return BROKEN_PIPE_EXIT

    return wrapped


def parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` whose ``--help`` prints the module docstring as written, with
    ``-v`` / ``--verbose`` (:class:`notices.VerboseAction`)."""
    p = argparse.ArgumentParser(prog=prog, description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action=notices.VerboseAction)
    return p


def add_run_file(p: argparse.ArgumentParser, overrides_help: str, *, name: str = "--config",
                 help: str = RUN_YAML_HELP) -> argparse.ArgumentParser:
    """The run YAML (``--config PATH``, or a positional shown as ``name``) and its
    ``key.sub=value`` overrides; both land in ``args.config`` / ``args.overrides``."""
    if name.startswith("--"):
        p.add_argument(name, dest="config", required=True, help=help)
    else:
        p.add_argument("config", metavar=name, help=help)
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help=overrides_help)
    return p


def load_run(args: argparse.Namespace):
    """The validated ``RunConfig`` of :func:`add_run_file`'s arguments."""
    from megatron_mohge.config.run import RunConfig

    return RunConfig.from_yaml(args.config, args.overrides)


def run_cli(prog: str, body: Callable[[Any], int], args: Any, *,
            report: Callable[[str, BaseException], int] = print_error) -> int:
    """``body(args)``'s exit status; a ``ConfigError`` is handed to ``report`` (one line,
    :data:`USAGE_EXIT`). ``mohge-train`` / ``mohge-pretrain`` pass
    ``usage_errors.report_usage_error``, which reports it once per multi-rank job."""
    try:
        return body(args)
    except ConfigError as exc:
        return report(prog, exc)


def main_status(prog: str, main: Callable[[list], Any], argv: Optional[list] = None) -> int:
    """Exit status of a library ``main(argv)`` that returns its results: 0 once it returned;
    a ``ConfigError`` is one line and :data:`USAGE_EXIT` (:func:`run_cli`)."""
    def run(args) -> int:
        main(args)
        return 0

    return entry(run_cli)(prog, run, sys.argv[1:] if argv is None else argv)


def run_file_cli(prog: str, doc: str, overrides_help: str, body: Callable[[Any, Any], int], *,
                 flags: Optional[dict] = None,
                 add_args: Optional[Callable[[argparse.ArgumentParser], Any]] = None,
                 name: str = "--config", help: str = RUN_YAML_HELP,
                 report: Callable[[str, BaseException], int] = print_error,
                 error_prog: Optional[str] = None):
    """``(parse_args, main)`` of a CLI ``prog RUN.yaml [key.sub=value ...]`` (the file as
    ``name``, see :func:`add_run_file`) with its own options: ``flags`` (``{"--flag": help}``,
    store-true) and whatever ``add_args(parser)`` adds. ``main(argv=None)`` parses, loads the
    ``RunConfig`` and returns ``body(run, args)``; a ``ConfigError`` there is ``report``-ed as
    ``error_prog`` (default ``prog``), see :func:`run_cli`."""
    def parse_args(argv=None):
        p = add_run_file(parser(prog, doc), overrides_help, name=name, help=help)
        for flag, flag_help in (flags or {}).items():
            p.add_argument(flag, action="store_true", help=flag_help)
        if add_args is not None:
            add_args(p)
        return p.parse_args(argv)

    @entry
    def main(argv=None) -> int:
        return run_cli(error_prog or prog, lambda args: body(load_run(args), args),
                       parse_args(argv), report=report)

    return parse_args, main


__all__ = ["BROKEN_PIPE_EXIT", "RUN_YAML_HELP", "entry", "parser", "add_run_file", "load_run",
           "run_cli", "main_status", "run_file_cli"]
