"""``megatron_mohge.run_config``: the run configuration's import path, kept for users and
scripts. The code lives in :mod:`megatron_mohge.config.run` (the dataclasses and file I/O)
and :mod:`megatron_mohge.config.run_validation` (the checks)."""

# The names below are this module's public API (re-exported).
from megatron_mohge.config.io import apply_overrides  # noqa: F401
from megatron_mohge.config.run import (  # noqa: F401
    KIND_ALIASES,
    LAYER_FIELDS,
    RESULT_KINDS,
    RUN_FIELDS,
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    HealthConfig,
    LaunchConfig,
    LoggingConfig,
    ModelConfig,
    MoEConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
    config_kind,
    normalize_run_dict,
)
from megatron_mohge.config.run_validation import (  # noqa: F401
    DISPATCHERS,
    LAUNCH_SHAPES,
    LR_DECAY_STYLES,
    MOE_KINDS,
    NORMS,
    POSITION_EMBEDDINGS,
    PRECISIONS,
    STOCK_ROUTERS,
)

