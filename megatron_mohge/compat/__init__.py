"""Compatibility layer: megatron-core version gates and the explicit CPU mode.

``enable_cpu_mode`` / ``is_cpu_mode_enabled`` live in :mod:`megatron_mohge.compat.cpu`
and are re-exported here lazily, so importing this package patches nothing and does not
import torch or megatron.
"""

_CPU_MODE_EXPORTS = ("enable_cpu_mode", "is_cpu_mode_enabled", "cpu_mode_patches")

__all__ = list(_CPU_MODE_EXPORTS)


def __getattr__(name):
    if name in _CPU_MODE_EXPORTS:
        from megatron_mohge.compat import cpu as cpu_mode

        return getattr(cpu_mode, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
