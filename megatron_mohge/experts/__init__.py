"""Routed experts of heterogeneous widths: local, torch grouped-GEMM and TE backends."""

from megatron_mohge.experts.hetero import HeterogeneousExperts, width_config

__all__ = ["HeterogeneousExperts", "width_config"]
