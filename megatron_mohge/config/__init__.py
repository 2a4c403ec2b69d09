"""MoHGE configuration: typed dataclasses, YAML in and out, validated once at the edge.

``megatron_mohge.config`` is the config package's public surface; the code lives in:

* :mod:`.errors` -- ``ConfigError`` and the field validators (``expect_int`` ...,
  ``parse_split``): a leaf every other config module imports;
* :mod:`.allocation` -- ``plan_allocation``: which experts each expert-parallel rank holds
  (the layer config's checks need it, so it lives here);
* :mod:`.io` -- the YAML loader our files are read with, ``build_dataclass`` (the one
  mapping -> dataclass builder), ``apply_overrides`` and ``YamlDataclass``;
* :mod:`.layer` -- the MoHGE layer config (``MoHGEConfig`` and its sections);
* :mod:`.megatron` -- ``TransformerConfig`` facts the layer config checks against, and the
  one mapping of a run's MoE section to Megatron's MoE fields and Megatron-LM arguments;
* :mod:`.run` / :mod:`.run_validation` -- the run config (``RunConfig``) and its checks.
"""

from megatron_mohge.config.errors import (
    ConfigError,
    expect_bool,
    expect_choice,
    expect_int,
    expect_number,
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

__all__ = [
    "ConfigError", "expect_bool", "expect_choice", "expect_int", "expect_number",
    "parse_split", "YamlDataclass", "build_dataclass", "load_yaml",
    "read_yaml_file",
    "EXPERT_BACKENDS", "EXPERT_WEIGHTINGS", "GROUP_GRADIENTS", "GROUP_LOSS_COUNTS",
    "GROUP_SCORES", "INTRA_GROUP_MODES",
    "RELEASED_INTRA_GROUP_COEFF", "ROUTER_TYPES", "AllocationConfig", "LossConfig",
    "MoHGEConfig", "NoisyGatingConfig", "RouterConfig",
]
