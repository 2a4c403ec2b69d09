"""Routed experts of heterogeneous widths (local torch path and Transformer Engine path)."""

from megatron_mohge.experts.hetero import HeterogeneousExperts, width_config

__all__ = ["HeterogeneousExperts", "width_config"]
