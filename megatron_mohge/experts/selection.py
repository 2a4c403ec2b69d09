"""Which expert backend a MoHGE layer uses (``MoHGEConfig.expert_backend``).

``auto`` resolves, in order:

1. ``te`` when the layer is built with Transformer Engine (``use_te``) and Megatron's spec
   gives TE grouped GEMMs (``TEGroupedMLP``);
2. ``torch`` on a CUDA machine (one ``torch._grouped_mm`` per width instead of a Python
   loop over experts; TE-free);
3. on CPU, ``CPU_AUTO_BACKEND``: the faster of ``local`` and ``torch`` in the layer
   benchmark (docs/expert-backends.md has the figures and the command).

``local`` is Megatron's ``SequentialMLP`` and runs anywhere. Explicit choices that cannot run
here are errors, never silent fallbacks.
"""

from __future__ import annotations

from megatron_mohge.config import ConfigError

#: expert_backend="auto" on a CPU-only machine. The layer benchmark's --compare-backends, backends
#: interleaved repeat by repeat (fp32, 1 thread, megatron-core 0.19.2), gave torch / local paired
#: median 0.70 [0.65, 0.82] at hidden 64 / 1,024 tokens and 0.94 [0.89, 0.99] at hidden 256 /
#: 4,096 tokens (60 pairs each; docs/expert-backends.md): torch is the faster at both shapes.
CPU_AUTO_BACKEND = "torch"


def resolve_expert_backend(requested: str, use_te: bool, te_grouped: bool) -> str:
    """The backend to build: ``requested`` (``auto|local|torch|te``) given whether the layer
    uses TE (``use_te``) and whether Megatron's TE spec has grouped GEMMs (``te_grouped``)."""
    import torch

    from megatron_mohge.experts.torch_backend import grouped_mm_available

    if requested == "auto":
        if use_te and te_grouped:
            return "te"
        if not grouped_mm_available():
            return "local"
        return "torch" if torch.cuda.is_available() else CPU_AUTO_BACKEND
    if requested == "te" and not (use_te and te_grouped):
        raise ConfigError(
            "MoHGEConfig.expert_backend=te needs Transformer Engine grouped GEMMs (TE >= 1.7 with "
            "its PyTorch extension, a GPU, and use_te not False); use torch or local instead.")
    if requested == "torch" and not grouped_mm_available():
        raise ConfigError(
            f"MoHGEConfig.expert_backend=torch needs torch._grouped_mm (torch >= 2.8), not in "
            f"torch {torch.__version__}; use local, or upgrade torch.")
    return requested
