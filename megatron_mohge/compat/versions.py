"""Megatron-Core version gates: every version-specific decision of the plugin lives here.

The plugin is developed and tested on megatron-core 0.16.x (the newest wheel for Python
3.11). Known breaks in newer releases, so users on them get a clear message instead of a
silently wrong model:

* 0.17 reworked the MoE submodule protocols (``MoESubmodules`` / router builders) and
  fixed ``router_gating_linear``'s ``te_general_gemm`` NameError without TE.
* 0.18 changed Megatron-LM's ``pretrain()`` signature (matters to launchers, not layers).
"""

from __future__ import annotations

import functools

from packaging.specifiers import SpecifierSet
from packaging.version import Version

#: Releases the layers, specs and CPU mode were tested against.
TESTED_MCORE = SpecifierSet(">=0.16.1,<0.17")


class UnsupportedMegatronVersion(RuntimeError):
    """The installed megatron-core is outside the range this feature was validated on."""


@functools.lru_cache(maxsize=None)
def mcore_version() -> Version:
    """Installed megatron-core version (imports megatron.core lazily)."""
    from megatron.core import package_info

    return Version(package_info.__version__)


def is_tested_mcore() -> bool:
    return mcore_version() in TESTED_MCORE


def require_tested_mcore(feature: str) -> None:
    """Raise a clear error when ``feature`` is used with an untested megatron-core."""
    if not is_tested_mcore():
        raise UnsupportedMegatronVersion(
            f"{feature} was validated on megatron-core {TESTED_MCORE} but {mcore_version()} "
            "is installed. Install 'megatron-core>=0.16.1,<0.17' (Python 3.10/3.11 wheels), or "
            "port the gates in megatron_mohge/compat/versions.py to the new release."
        )


def make_moe_submodules(experts, shared_experts, router):
    """Build ``MoESubmodules`` (its fields/protocols changed in megatron-core 0.17)."""
    require_tested_mcore("MoHGE layer specs")
    from megatron.core.transformer.moe.moe_layer import MoESubmodules

    return MoESubmodules(experts=experts, shared_experts=shared_experts, router=router)
