"""``--mohge-config`` for Megatron-LM: the argument hook and the MoE arguments it implies.

``--mohge-config PATH`` takes a MoHGE layer YAML or a run YAML (its ``moe.mohge`` section).
While the command line is parsed it fills Megatron's own MoE arguments (``--num-experts E``,
``--moe-router-topk K``, ``--moe-ffn-hidden-size``, shared-expert size, router dtype, no
Megatron load-balancing loss, z-loss, jitter) exactly as ``MoHGEConfig.apply_to`` sets the
``TransformerConfig``, so Megatron-LM's validation, logging and checkpoint metadata see a
consistent MoE model; an explicit ``--num-experts``/``--moe-router-topk`` that disagrees is an
error (:func:`finalize_mohge_args`). The same on every Megatron-LM tag: argparse is unchanged
between core_v0.16 and core_v0.19 (only who calls the parser moved, see ``launcher``).
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from megatron_mohge.config import (
    EXPERT_BACKENDS,
    EXPERT_WEIGHTINGS,
    GROUP_GRADIENTS,
    GROUP_LOSS_COUNTS,
    GROUP_SCORES,
    INTRA_GROUP_MODES,
    ConfigError,
    MoHGEConfig,
    read_yaml_file,
)
from megatron_mohge.config.megatron import (
    check_megatron_layout,
    megatron_lm_args,
    moe_transformer_fields,
)

ARG_GROUP_TITLE = "MoHGE (megatron-mohge)"
FLOPS_EXPECTATIONS = ("uniform", "min", "max")
#: Command-line overrides of the MoHGE YAML, one row each: (section, field, choices or type,
#: help). The flag is ``--mohge-<field>`` (dashes), argparse dest ``mohge_<field>``; section
#: None: a top-level field. The meaning of each field: the configuration reference.
CLI_OVERRIDE_FIELDS = (
    (None, "expert_backend", EXPERT_BACKENDS,
     "local (SequentialMLP) | torch (torch._grouped_mm per width, no TE) | te | auto (te with "
     "--transformer-impl transformer_engine and TE, else torch on GPUs)"),
    ("router", "expert_weighting", EXPERT_WEIGHTINGS, "combine weights of the chosen experts"),
    ("router", "group_score", GROUP_SCORES, "group gate scores"),
    ("router", "group_gradient", GROUP_GRADIENTS,
     "LM gradient to the group gate when a token's picks share a group"),
    ("losses", "group_coeff", float, "a_G of the group-wise cost loss"),
    ("losses", "group_start_fraction", float, "the cost loss is off before this fraction"),
    ("losses", "group_loss_count", GROUP_LOSS_COUNTS, "f_g of the cost loss"),
    ("losses", "group_balance_coeff", float, "group balance on use from step 0"),
    ("losses", "intra_group_coeff", float, "a_E of the intra-group loss"),
    ("losses", "intra_group_mode", INTRA_GROUP_MODES, "the intra-group loss's form"),
    ("losses", "expert_bias_update_rate", float, "loss-free in-group bias rate (0: off)"),
)
#: argparse dest -> (section, field) of MoHGEConfig.
CLI_OVERRIDES = {f"mohge_{name}": (section, name) for section, name, *_ in CLI_OVERRIDE_FIELDS}


def load_mohge_config(path) -> MoHGEConfig:
    """A MoHGE layer YAML, or a run YAML whose ``moe.mohge`` section (mapping or path) is used."""
    p = Path(path).expanduser()
    data = read_yaml_file(p, "--mohge-config") or {}
    from megatron_mohge.config.run import RunConfig, config_kind

    if config_kind(data, f"--mohge-config {path}") == "run":
        run = RunConfig.from_dict(data, base_dir=p.parent)
        if run.moe.kind != "mohge" or run.moe.mohge is None:
            raise ConfigError(f"--mohge-config {path}: a run file with moe.kind={run.moe.kind!r}; "
                              "pass a run file with moe.kind: mohge, or a MoHGE layer YAML.")
        return run.moe.mohge
    return MoHGEConfig.from_dict(data)


def megatron_moe_args(cfg: MoHGEConfig, ep: int = 1, expert_tp: Optional[int] = None,
                      tp: int = 1) -> dict[str, Any]:
    """Megatron-LM argument values (``args`` names) of ``cfg``: the fields ``apply_to`` sets
    (``config.megatron.moe_transformer_fields``), after checking the layout at EP ``ep`` and
    expert-TP ``expert_tp`` (``None``: ``tp``, as Megatron)."""
    check_megatron_layout(cfg, ep=ep, etp=expert_tp if expert_tp is not None else tp)
    return megatron_lm_args(moe_transformer_fields(cfg))


class _MoHGEConfigAction(argparse.Action):
    """Stores the path and fills Megatron's MoE arguments from the MoHGE config (later flags
    on the command line still win; :func:`finalize_mohge_args` checks them)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        try:
            cfg = load_mohge_config(values)
            implied = megatron_moe_args(cfg, ep=1)  # EP is checked once all args are known
        except ConfigError as exc:
            parser.error(str(exc))
        for name, value in implied.items():
            setattr(namespace, name, value)


def add_mohge_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron-LM ``extra_args_provider``: adds ``--mohge-config`` and its overrides."""
    g = parser.add_argument_group(title=ARG_GROUP_TITLE)
    g.add_argument("--mohge-config", type=str, default=None, action=_MoHGEConfigAction,
                   help="MoHGE layer YAML (or a run YAML whose moe.mohge section is used). Sets "
                        "--num-experts/--moe-router-topk/... to match and builds every MoE layer "
                        "as a MoHGE layer.")
    for section, name, kind, text in CLI_OVERRIDE_FIELDS:
        where = f"{section}.{name}" if section else name
        typed = dict(choices=kind) if isinstance(kind, tuple) else dict(type=kind)
        g.add_argument("--mohge-" + name.replace("_", "-"), default=None, **typed,
                       help=f"override {where}: {text}")
    g.add_argument("--mohge-flops-expectation", choices=FLOPS_EXPECTATIONS, default="uniform",
                   help="activated routed width used for FLOPs/throughput: the uniform-routing "
                        "expectation (default), or the min / max reachable")
    g.add_argument("--mohge-flops-routed-width", type=float, default=None,
                   help="measured mean chosen expert width (megatron_mohge.metrics "
                        "mean_chosen_width); FLOPs then use K x this width")
    return parser


def compose_extra_args_providers(*providers: Optional[Callable]) -> Callable:
    """One ``extra_args_provider`` calling each given one (``None`` entries are skipped)."""
    chain = [p for p in providers if p is not None]

    def provider(parser):
        for p in chain:
            parser = p(parser) or parser
        return parser

    return provider


_CONFIG_CACHE: dict = {}


def mohge_config_from_args(args) -> Optional[MoHGEConfig]:
    """The MoHGE config of ``args`` (``--mohge-config`` + overrides), or ``None`` without it.

    Cached per (path, overrides): Megatron-LM asks for it at every model chunk and log step.
    """
    path = getattr(args, "mohge_config", None)
    if not path:
        return None
    overrides = tuple((dest, getattr(args, dest, None)) for dest in CLI_OVERRIDES)
    key = (str(path), overrides)
    if key not in _CONFIG_CACHE:
        data = load_mohge_config(path).to_dict()
        for dest, value in overrides:
            if value is not None:
                section, name = CLI_OVERRIDES[dest]
                (data if section is None else data[section])[name] = value
        _CONFIG_CACHE[key] = MoHGEConfig.from_dict(data)
    return _CONFIG_CACHE[key]


def finalize_mohge_args(args, cfg: Optional[MoHGEConfig] = None) -> Optional[MoHGEConfig]:
    """Check ``args`` against the MoHGE config and make its MoE arguments consistent.

    ``--num-experts``/``--moe-router-topk`` that disagree raise ``ConfigError``; the other
    mirrored MoE arguments are set to what ``apply_to`` gives (with a warning naming any that
    changed), so logging and FLOPs read the same model the builder makes.
    """
    cfg = cfg or mohge_config_from_args(args)
    if cfg is None:
        return None
    ep = int(getattr(args, "expert_model_parallel_size", 1) or 1)
    tp = int(getattr(args, "tensor_model_parallel_size", 1) or 1)
    etp = getattr(args, "expert_tensor_parallel_size", None)
    want = megatron_moe_args(cfg, ep=ep, expert_tp=etp, tp=tp)
    for name in ("num_experts", "moe_router_topk"):
        have = getattr(args, name, None)
        if have != want[name]:
            flag = "--" + name.replace("_", "-")
            raise ConfigError(f"{flag}={have} but --mohge-config {args.mohge_config} implies "
                              f"{want[name]}; drop {flag} (it is set from the MoHGE config).")
    changed = []
    for name, value in want.items():
        have = getattr(args, name, None)
        if isinstance(have, list) and len(have) == 1 and not isinstance(value, list):
            have = have[0]
        if have != value:
            changed.append(f"{name}: {have!r} -> {value!r}")
        setattr(args, name, value)
    if changed:
        warnings.warn("megatron-mohge: MoE arguments set from --mohge-config: "
                      + ", ".join(changed), stacklevel=2)
    return cfg
