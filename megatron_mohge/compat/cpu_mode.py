"""Former home of CPU mode, kept as an alias: see :mod:`megatron_mohge.compat.cpu`."""

from megatron_mohge.compat.cpu import (  # noqa: F401
    PATCHES,
    REDIRECTED_MODULES,
    CpuModePatch,
    cpu_mode_patches,
    enable_cpu_mode,
    is_cpu_mode_enabled,
)
from megatron_mohge.compat.cpu import __doc__  # noqa: F401
