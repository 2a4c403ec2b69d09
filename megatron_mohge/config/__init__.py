"""MoHGE configuration: typed dataclasses, YAML in and out, validated once at the edge.

``megatron_mohge.config`` keeps every name it always had; the code lives in:

* :mod:`.errors` -- ``ConfigError`` and the field validators (``expect_int`` ...,
  ``parse_split``, ``group_offsets``): a leaf every other config module imports;
* :mod:`.io` -- the YAML loader our files are read with, ``build_dataclass`` (the one
  mapping -> dataclass builder), ``apply_overrides`` and ``YamlDataclass``;
* :mod:`.layer` -- the MoHGE layer config (``MoHGEConfig`` and its sections);
* :mod:`.megatron` -- ``TransformerConfig`` facts the layer config checks against, and the
  one mapping of a run's MoE section to Megatron's MoE fields and Megatron-LM arguments;
* :mod:`.run` / :mod:`.run_validation` -- the run config (``RunConfig``), imported as
  :mod:`megatron_mohge.run_config`.
"""

from megatron_mohge.config.errors import (
    ConfigError,
    expect_bool,
    expect_choice,
    expect_int,
    expect_number,
    group_offsets,
    parse_split,
)
from megatron_mohge.config.io import YamlDataclass, build_dataclass, load_yaml, read_yaml_file
from megatron_mohge.config.layer import (
    EXPERT_BACKENDS,
    EXPERT_WEIGHTINGS,
    GROUP_GRADIENTS,
    GROUP_LOSS_COUNTS,
    GROUP_SCORES,
    INTRA_GROUP_MODES,
    RELEASED_INTRA_GROUP_COEFF,
    ROUTER_TYPES,
    AllocationConfig,
    LossConfig,
    MoHGEConfig,
    NoisyGatingConfig,
    RouterConfig,
)
from megatron_mohge.config.megatron import FP8_ALIGN

__all__ = [
    "ConfigError", "expect_bool", "expect_choice", "expect_int", "expect_number",
    "group_offsets", "parse_split", "YamlDataclass", "build_dataclass", "load_yaml",
    "read_yaml_file",
    "EXPERT_BACKENDS", "EXPERT_WEIGHTINGS", "GROUP_GRADIENTS", "GROUP_LOSS_COUNTS",
    "GROUP_SCORES", "INTRA_GROUP_MODES",
    "RELEASED_INTRA_GROUP_COEFF", "ROUTER_TYPES", "AllocationConfig", "LossConfig",
    "MoHGEConfig", "NoisyGatingConfig", "RouterConfig",
]
