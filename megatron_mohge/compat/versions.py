"""Megatron-Core version facts: every version-specific decision of the plugin lives here.

The plugin supports megatron-core ``>=0.16.1,<0.20`` (``MCORE_RANGE``, pyproject.toml's range)
and is tested on two lines (``TESTED_MCORE``): 0.16.1, the newest release for Python
3.10/3.11, and 0.19.x (tested: 0.19.2; 0.17+ ship for Python >= 3.12 only). Differences in
API *shape* between them are detected, not version-compared
(:mod:`megatron_mohge.compat.mcore`); what remains here are facts a shape cannot reveal:

* 0.17 fixed ``router_gating_linear``'s ``te_general_gemm`` NameError without TE (CPU mode
  patches it on older lines only), and moved MoE specs towards builder partials;
* 0.18 moved the aux-loss tracker to ``moe_logging`` and changed Megatron-LM's
  ``pretrain()`` signature (launchers, below);
* 0.19 scales aux / z-losses under ``calculate_per_token_loss`` by local tokens x TP*CP
  (a fix; our routers apply that rule on every line, see ``GroupedExpertRouter.attach_loss``)
  and builds a C++ extension with ``load_inline`` for selective recompute (CPU mode);
* 0.17.x / 0.18.x are inside the range but untested: layers warn once, CPU mode refuses;
* the hybrid model (layer pattern) is ``HybridModel`` on 0.19 and ``MambaModel`` on 0.16.1
  (:func:`hybrid_model_api`, found by import).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

from packaging.specifiers import SpecifierSet
from packaging.version import Version

#: What pyproject.toml accepts.
MCORE_RANGE = SpecifierSet(">=0.16.1,<0.20")
#: The tested lines (CI runs the suite on each; docs/compatibility.md, 'Megatron versions').
TESTED_MCORE_LINES = {"0.16": SpecifierSet(">=0.16.1,<0.17"),
                      "0.19": SpecifierSet(">=0.19.0,<0.20")}
#: The exact releases CI installs per line (scripts/setup_env.sh; tests/test_versions.py checks).
TESTED_MCORE_RELEASES = {"0.16": "0.16.1", "0.19": "0.19.2"}


class _Lines:
    """``version in TESTED_MCORE``: the version is in one of the tested lines."""

    def __contains__(self, version) -> bool:
        return any(Version(str(version)) in spec for spec in TESTED_MCORE_LINES.values())

    def __str__(self) -> str:
        return " or ".join(str(spec) for spec in TESTED_MCORE_LINES.values())


#: Releases the layers, specs and CPU mode were tested against.
TESTED_MCORE = _Lines()


class UnsupportedMegatronVersion(RuntimeError):
    """The installed megatron-core is outside the range this feature was validated on."""


@functools.lru_cache(maxsize=None)
def mcore_version() -> Version:
    """Installed megatron-core version (imports megatron.core lazily)."""
    from megatron.core import package_info

    return Version(package_info.__version__)


def mcore_line() -> str | None:
    """The tested line (``"0.16"``, ``"0.19"``) the installed release belongs to, else None."""
    version = mcore_version()
    return next((line for line, spec in TESTED_MCORE_LINES.items() if version in spec), None)


def is_tested_mcore() -> bool:
    return mcore_version() in TESTED_MCORE


def _install_hint() -> str:
    return ("Install megatron-core==0.19.2 (Python >= 3.12) or megatron-core==0.16.1 (Python "
            "3.10/3.11), or port the gates in megatron_mohge/compat/versions.py to the new "
            "release.")


def require_tested_mcore(feature: str) -> None:
    """Raise a clear error when ``feature`` is used outside the tested lines."""
    if not is_tested_mcore():
        raise UnsupportedMegatronVersion(
            f"{feature} was validated on megatron-core {TESTED_MCORE} but {mcore_version()} is "
            f"installed. {_install_hint()}")


_warned_untested = False


def require_supported_mcore(feature: str) -> None:
    """Raise outside ``MCORE_RANGE``; warn once for an untested release inside it."""
    global _warned_untested
    version = mcore_version()
    if version not in MCORE_RANGE:
        raise UnsupportedMegatronVersion(
            f"{feature} supports megatron-core {MCORE_RANGE} but {version} is installed. "
            f"{_install_hint()}")
    if not is_tested_mcore() and not _warned_untested:
        _warned_untested = True
        warnings.warn(f"megatron-mohge: megatron-core {version} is inside the supported range "
                      f"but untested (tested: {TESTED_MCORE}).", stacklevel=3)


def make_moe_submodules(experts, shared_experts, router):
    """Build ``MoESubmodules`` (same fields on every supported line; builders may be
    ``ModuleSpec`` or partials, see :mod:`megatron_mohge.compat.mcore`)."""
    require_supported_mcore("MoHGE layer specs")
    from megatron.core.transformer.moe.moe_layer import MoESubmodules

    return MoESubmodules(experts=experts, shared_experts=shared_experts, router=router)


# ==================================================================================
# The hybrid language model (layer pattern: ``*`` attention, ``E`` MoE, ``-`` MLP, ``M`` Mamba)
# ==================================================================================


class HybridModelMissing(RuntimeError):
    """Neither of Megatron's hybrid model classes (with MoE layers) is importable here."""


@dataclasses.dataclass(frozen=True)
class HybridModelAPI:
    """How the installed megatron-core spells its hybrid model: the same design under two
    names. 0.19 has ``HybridModel`` / ``HybridStack`` (``megatron.core.models.hybrid``; the
    ``Mamba*`` names are aliases, ``GPTModel`` prints a deprecation pointing here); 0.16.1 has
    ``MambaModel`` / ``MambaStack`` with the same four layer kinds ``M * - E`` and a
    ``moe_layer`` slot. Found by import, not by version."""

    model_cls: type
    stack_cls: type
    submodules_cls: type
    spec_kwarg: str  # the model's stack-spec argument
    pattern_kwarg: str  # the model's layer-pattern argument
    stock_spec: str  # "module:name" of Megatron's TE stack spec (imported on use: it needs
    #                  TE, and mamba_ssm's triton kernels on 0.16)
    symbols: frozenset  # the layer symbols the pattern may hold
    # (Megatron-LM's command-line flag for the pattern: integration.flags.HYBRID_PATTERN_FLAGS,
    # read from the checkout's source, which need not be the installed release)

    def stock_stack_spec(self):
        import importlib

        module, name = self.stock_spec.split(":")
        return getattr(importlib.import_module(module), name)


@functools.lru_cache(maxsize=None)
def hybrid_model_api() -> HybridModelAPI:
    """The installed :class:`HybridModelAPI`, or :class:`HybridModelMissing` in one line."""
    try:  # megatron-core 0.19 (and core_v0.18's tree)
        from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
        from megatron.core.models.hybrid.hybrid_layer_allocation import Symbols
        from megatron.core.models.hybrid.hybrid_model import HybridModel

        return HybridModelAPI(HybridModel, HybridStack, HybridStackSubmodules,
                              "hybrid_stack_spec", "hybrid_layer_pattern",
                              "megatron.core.models.hybrid.hybrid_layer_specs:hybrid_stack_spec",
                              frozenset(Symbols.VALID_LAYERS))
    except ImportError:
        pass
    try:  # megatron-core 0.16.1: the same model as MambaModel
        from megatron.core.models.mamba.mamba_model import MambaModel
        from megatron.core.ssm.mamba_block import MambaStack, MambaStackSubmodules
        from megatron.core.ssm.mamba_hybrid_layer_allocation import Symbols
    except ImportError:
        MambaStackSubmodules = None
    if MambaStackSubmodules is None or "moe_layer" not in {
            f.name for f in dataclasses.fields(MambaStackSubmodules)}:
        raise HybridModelMissing(
            f"model.kind: hybrid needs Megatron's HybridModel (megatron-core "
            f"{TESTED_MCORE_RELEASES['0.19']}) or its MambaModel with MoE layers (megatron-core "
            f"{TESTED_MCORE_RELEASES['0.16']}); megatron-core {mcore_version()} has neither. "
            f"{_install_hint()}")
    return HybridModelAPI(MambaModel, MambaStack, MambaStackSubmodules, "mamba_stack_spec",
                          "hybrid_override_pattern",
                          "megatron.core.models.mamba.mamba_layer_specs:mamba_stack_spec",
                          frozenset(Symbols.VALID))


# ==================================================================================
# Megatron-LM (the training framework: pretrain_gpt.py, megatron.training) -- used by
# megatron_mohge.integration.megatron_lm, examples/pretrain_mohge.py and patches/.
# Every Megatron-LM-version-specific fact of the integration lives in this section.
# ==================================================================================

#: Megatron-LM tags the launcher and the patches were checked against. A tag's
#: ``megatron/core/package_info.py`` may be a patch release ahead (core_v0.19.0's says 0.19.1:
#: the tag sits on the release branch's version bump), so checks match MAJOR.MINOR only.
SUPPORTED_MEGATRON_LM_TAGS = ("core_v0.16.1", "core_v0.19.0")
#: The patch in patches/ for each supported tag (``patches/apply.sh`` picks by the same name).
MEGATRON_LM_PATCHES = {tag: f"megatron-lm-{tag}.patch" for tag in SUPPORTED_MEGATRON_LM_TAGS}

#: Megatron's ``NullTokenizer`` (``--tokenizer-type NullTokenizer --vocab-size V``): up to
#: core_v0.17 its eod is the extra id V (vocabulary V + 1); from core_v0.18 V counts the eod,
#: which defaults to V - 1 and is set by ``--null-tokenizer-eod-id`` (a flag core_v0.16 lacks).
#: Measured in each tag's ``megatron/core/tokenizers/text/libraries/null_tokenizer.py``.
NULL_TOKENIZER_COUNTS_EOD = SpecifierSet(">=0.18.0")


def megatron_lm_version(megatron_lm_dir=None) -> "Version | None":
    """megatron-core version of the Megatron-LM a run will use: the checkout's version file
    (``megatron_lm_dir``, else ``$MEGATRON_LM_DIR``), else the installed megatron-core
    distribution (read from its metadata, not imported); ``None`` when neither is known."""
    import os
    from importlib import metadata

    for d in (megatron_lm_dir, os.environ.get("MEGATRON_LM_DIR")):
        if d and megatron_lm_checkout_version(d) is not None:
            return megatron_lm_checkout_version(d)
    try:
        return Version(metadata.version("megatron-core"))
    except metadata.PackageNotFoundError:
        return None


def null_tokenizer_counts_eod(version: "Version | None") -> bool:
    """Whether ``version``'s NullTokenizer counts the eod in ``--vocab-size`` (unknown: the
    newest supported tag's rule)."""
    if version is None:
        return True
    return Version(version.base_version) in NULL_TOKENIZER_COUNTS_EOD


#: ``pretrain()`` call styles. Up to core_v0.17.x Megatron-LM parses the command line inside
#: ``pretrain(provider, model_provider, model_type, forward_step, ..., extra_args_provider=,
#: args_defaults=)``. From core_v0.18.0 it is ``pretrain(cfg_container, provider, model_type,
#: forward_step, model_provider=None, ...)``: the script first calls
#: ``parse_and_validate_args(extra_args_provider=, args_defaults=)`` and
#: ``pretrain_cfg_container_from_args(args, gpt_config_from_args(args))``, and the model is
#: built by the model config's builder (``GPTModelBuilder``), not by a model provider.
#: Other core_v0.18+ changes the integration follows (found by shape, not by version):
#: ``training_log`` reports MoE metrics through ``get_moe_metrics_tracker().report`` (no
#: ``track_moe_metrics``), ``num_floating_point_operations`` takes
#: ``total_real_tokens_in_batch``, and ``GPTModelBuilder`` builds the MTP layer from the
#: stock decoder spec.
PRETRAIN_STYLE_ARGS = "args"  # core_v0.16.x / core_v0.17.x
PRETRAIN_STYLE_CONFIG_CONTAINER = "config_container"  # core_v0.18.0 and later


def megatron_lm_pretrain_style(pretrain) -> str:
    """Which ``pretrain()`` signature ``pretrain`` has (see ``PRETRAIN_STYLE_*``)."""
    import inspect

    try:
        params = list(inspect.signature(pretrain).parameters)
    except (TypeError, ValueError):
        return "unknown"
    if params and params[0] == "cfg_container":
        return PRETRAIN_STYLE_CONFIG_CONTAINER
    if "extra_args_provider" in params:
        return PRETRAIN_STYLE_ARGS
    return "unknown"


def megatron_lm_checkout_version(megatron_lm_dir) -> "Version | None":
    """megatron-core version of a Megatron-LM checkout, read from its ``package_info.py``
    (no import; ``None`` when the file is missing)."""
    import re
    from pathlib import Path

    info = Path(megatron_lm_dir) / "megatron" / "core" / "package_info.py"
    if not info.is_file():
        return None
    text = info.read_text()
    parts = {}
    for name in ("MAJOR", "MINOR", "PATCH"):
        m = re.search(rf"^{name}\s*=\s*(\d+)", text, re.M)
        if not m:
            return None
        parts[name] = m.group(1)
    pre = re.search(r'^PRE_RELEASE\s*=\s*[\'"]([^\'"]*)[\'"]', text, re.M)
    return Version(f"{parts['MAJOR']}.{parts['MINOR']}.{parts['PATCH']}{pre.group(1) if pre else ''}")


class MegatronTrainingMissing(RuntimeError):
    """``megatron.training`` (Megatron's own training loop) is not importable here."""


def megatron_training_available() -> bool:
    """Whether ``megatron.training`` is importable: the 0.19 megatron-core wheels ship it
    (``pretrain(cfg_container, ...)``), 0.16.1's does not (only a Megatron-LM checkout has it).
    Found by import, not by version."""
    import importlib.util

    try:
        return importlib.util.find_spec("megatron.training") is not None
    except ModuleNotFoundError:  # no megatron package at all
        return False


def require_megatron_training(prog: str = "mohge-pretrain") -> None:
    """Raise :class:`MegatronTrainingMissing` with the one-line way forward."""
    if megatron_training_available():
        return
    from importlib import metadata

    try:
        have = f"megatron-core {metadata.version('megatron-core')}"
    except metadata.PackageNotFoundError:
        have = "no megatron-core"
    raise MegatronTrainingMissing(
        f"{prog} runs Megatron's own pretrain() from megatron.training, which {have} does not "
        f"ship (the megatron-core {TESTED_MCORE_RELEASES['0.19']} wheel does); install it, use "
        "mohge-train, or put a Megatron-LM checkout on PYTHONPATH and run "
        "examples/pretrain_mohge.py (docs/megatron-lm.md).")


def check_megatron_lm(pretrain) -> str:
    """The ``pretrain()`` style the launcher drives (``PRETRAIN_STYLE_*``); refuses a
    ``pretrain()`` of neither style and warns on megatron-core lines no supported tag is on."""
    style = megatron_lm_pretrain_style(pretrain)
    if style not in (PRETRAIN_STYLE_ARGS, PRETRAIN_STYLE_CONFIG_CONTAINER):
        raise UnsupportedMegatronVersion(
            "examples/pretrain_mohge.py drives Megatron-LM's pretrain(provider, model_provider, "
            "model_type, forward_step, extra_args_provider=...) (core_v0.16/0.17) and "
            "pretrain(cfg_container, provider, model_type, forward_step, ...) (core_v0.18+); "
            f"this checkout's pretrain{_signature(pretrain)} is neither. Use a checkout at "
            f"{' or '.join(SUPPORTED_MEGATRON_LM_TAGS)}.")
    version = mcore_version()
    if version not in TESTED_MCORE:  # the supported tags are on the tested lines
        import warnings

        warnings.warn(f"megatron-mohge: Megatron-LM/megatron-core {version} is untested; the "
                      f"launcher was checked against {', '.join(SUPPORTED_MEGATRON_LM_TAGS)}.",
                      stacklevel=2)
    return style


def _signature(fn) -> str:
    import inspect

    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(...)"
