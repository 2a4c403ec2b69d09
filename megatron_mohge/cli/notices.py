"""Library notices the mohge commands hide unless asked (``-v`` / ``MOHGE_VERBOSE=1``).

Importing megatron-core on a machine without Transformer Engine and Apex (every CPU machine,
and GPU installs without them) prints four ``UserWarning``s about falling back to torch
implementations (and two more about the norm once a model is built), torch logs a
``CUDA_HOME`` line when it finds CUDA tools but no CUDA runtime, and megatron-core 0.19 adds
notices about its own defaults and APIs (``GPTModel`` deprecated, the default CUDA-graph
scope, an experimental model config, a torch collective it calls). They come on every
command and in every rank of every bench run, say nothing a user of these tools can act on
(the fallbacks are the CPU path; the GPU expert backends name a missing Transformer Engine
themselves), and bury the lines that matter. They are filtered here, each by its category
or logger and the start of its message -- every other warning still shows -- and ``-v`` on
any command (or ``MOHGE_VERBOSE=1`` in the environment, which child processes inherit)
shows them again.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import warnings

VERBOSE_ENV = "MOHGE_VERBOSE"

#: (category, start of the message) of the hidden ``warnings.warn`` notices
QUIET_WARNINGS = (
    # megatron/core/optimizer/__init__.py, optimizer.py, clip_grads.py and
    # megatron_fsdp/mixed_precision.py, each at import
    (UserWarning, "Transformer Engine and Apex are not installed"),
    # megatron/core/models/backends.py and gpt_layer_specs.py, building a model
    (UserWarning, "Apex is not installed. Falling back to Torch Norm"),
    # megatron-core 0.19: its own default cuda_graph_modules="full", on every TransformerConfig
    (UserWarning, "full scope is deprecated"),
    # megatron-core 0.19, at import of megatron.core.models (a model we do not use)
    (UserWarning, "MimoModelConfig is experimental"),
    # torch (2.13 here) deprecates it; megatron-core's MoE router and the CPU-mode gather call it
    (FutureWarning, "`torch.distributed.all_gather_into_tensor` is deprecated"),
)
#: logger name -> start of the hidden records' message
QUIET_LOGS = {
    "torch.utils.cpp_extension": "No CUDA runtime is found",
    # our trainer builds GPTModel on purpose (HybridModel has its own presets)
    "megatron.core.models.gpt.gpt_model": "GPTModel IS DEPRECATED",
}


def verbose() -> bool:
    """Whether the notices are shown (``MOHGE_VERBOSE`` set to anything but 0 / empty)."""
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


class _StartsWith(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return verbose() or not record.getMessage().startswith(self.prefix)


_FILTERS = {name: _StartsWith(prefix) for name, prefix in QUIET_LOGS.items()}


def quiet_library_notices() -> None:
    """Hide the notices above in this process (idempotent); nothing while :func:`verbose`.
    Call before megatron-core / torch.utils.cpp_extension are imported (the warnings come
    at import)."""
    if verbose():
        return
    for category, start in QUIET_WARNINGS:
        # filterwarnings matches the message from its start, as a regular expression
        warnings.filterwarnings("ignore", message=re.escape(start), category=category)
    for name, flt in _FILTERS.items():
        logger = logging.getLogger(name)
        if flt not in logger.filters:
            logger.addFilter(flt)


def show_library_notices() -> None:
    """Undo :func:`quiet_library_notices` here and in child processes (``-v``)."""
    os.environ[VERBOSE_ENV] = "1"  # the log filters read it; children inherit it
    quiet = {(re.escape(start), category) for category, start in QUIET_WARNINGS}
    warnings.filters[:] = [f for f in warnings.filters
                           if not (f[0] == "ignore" and f[1] is not None
                                   and (f[1].pattern, f[2]) in quiet)]


class VerboseAction(argparse.Action):
    """``-v`` / ``--verbose``: :func:`show_library_notices` as soon as it is parsed (before
    the command imports megatron-core)."""

    def __init__(self, option_strings, dest, **kwargs):
        kwargs.setdefault("help", "also show the library notices hidden by default (Transformer "
                                  "Engine / Apex fallbacks, CUDA_HOME, GPTModel deprecation); "
                                  f"or set {VERBOSE_ENV}=1")
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, True)
        show_library_notices()


__all__ = ["VERBOSE_ENV", "QUIET_WARNINGS", "QUIET_LOGS", "verbose", "quiet_library_notices",
           "show_library_notices", "VerboseAction"]
