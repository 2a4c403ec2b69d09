"""MoHGE in Megatron-LM's ``pretrain_gpt.py``: arguments, model builder, aux losses, FLOPs.

Two ways in, sharing this module:

* ``examples/pretrain_mohge.py`` (no patch): reuses ``pretrain_gpt``'s dataset provider and
  forward step, calls ``pretrain`` with :func:`mohge_gpt_builder` and
  :func:`add_mohge_args`, and installs :func:`install_megatron_lm_hooks` (aux-loss names and
  FLOPs) into ``megatron.training.training`` at run time -- see :func:`run_pretrain`.
* ``patches/megatron-lm-core_v0.16.1.patch``: stock ``pretrain_gpt.py --mohge-config x.yaml``;
  the patch only calls :func:`add_mohge_args`, :func:`mohge_gpt_builder`,
  :func:`update_training_progress`, :func:`mohge_track_names` and
  :func:`mohge_flops_correction`.

``--mohge-config PATH`` takes a MoHGE layer YAML or a run YAML (its ``moe.mohge`` section).
While the command line is parsed it fills Megatron's own MoE arguments (``--num-experts E``,
``--moe-router-topk K``, ``--moe-ffn-hidden-size``, shared-expert size, router dtype, no
Megatron load-balancing loss, z-loss, jitter) exactly as ``MoHGEConfig.apply_to`` sets the
``TransformerConfig``, so Megatron-LM's validation, logging and checkpoint metadata see a
consistent MoE model; an explicit ``--num-experts``/``--moe-router-topk`` that disagrees is an
error when the model is built.

Nothing at module level imports torch, megatron.core or megatron.training.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import warnings
import weakref
from pathlib import Path
from typing import Any, Callable, Optional


from megatron_mohge.config import (
    EXPERT_BACKENDS,
    EXPERT_WEIGHTINGS,
    GROUP_SCORES,
    ConfigError,
    MoHGEConfig,
    read_yaml_file,
)

ARG_GROUP_TITLE = "MoHGE (megatron-mohge)"
FLOPS_EXPECTATIONS = ("uniform", "min", "max")
#: Tracker names of Megatron's own load-balancing losses; MoHGE routers never log them.
MEGATRON_LB_LOSS_NAMES = ("load_balancing_loss", "seq_load_balancing_loss",
                          "global_load_balancing_loss")
#: Command-line overrides of the MoHGE YAML: argparse dest -> path in MoHGEConfig
#: (section None: a top-level field).
CLI_OVERRIDES = {
    "mohge_expert_backend": (None, "expert_backend"),
    "mohge_group_coeff": ("losses", "group_coeff"),
    "mohge_intra_group_coeff": ("losses", "intra_group_coeff"),
    "mohge_group_start_fraction": ("losses", "group_start_fraction"),
    "mohge_expert_weighting": ("router", "expert_weighting"),
    "mohge_group_score": ("router", "group_score"),
}


# ====================================================================== arguments
def load_mohge_config(path) -> MoHGEConfig:
    """A MoHGE layer YAML, or a run YAML whose ``moe.mohge`` section (mapping or path) is used."""
    p = Path(path).expanduser()
    data = read_yaml_file(p, "--mohge-config") or {}
    if isinstance(data, dict) and ("moe" in data or "model" in data):
        from megatron_mohge.run_config import RunConfig

        run = RunConfig.from_yaml(p)
        if run.moe.kind != "mohge" or run.moe.mohge is None:
            raise ConfigError(f"--mohge-config {path}: a run file with moe.kind={run.moe.kind!r}; "
                              "pass a run file with moe.kind: mohge, or a MoHGE layer YAML.")
        return run.moe.mohge
    return MoHGEConfig.from_dict(data)


@dataclasses.dataclass
class _MoEFields:
    """The TransformerConfig fields ``MoHGEConfig.apply_to`` reads or writes, with
    megatron-core's defaults: applying it here keeps the CLI arguments in step with it."""

    num_moe_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None
    moe_shared_expert_intermediate_size: Optional[int] = None
    moe_router_dtype: Optional[str] = None
    moe_router_load_balancing_type: Any = "aux_loss"
    moe_aux_loss_coeff: Any = 0.0
    moe_z_loss_coeff: Optional[float] = None
    moe_input_jitter_eps: Optional[float] = None
    moe_router_topk_scaling_factor: Optional[float] = None
    moe_router_pre_softmax: bool = False
    moe_router_enable_expert_bias: bool = False
    moe_expert_capacity_factor: Optional[float] = None
    moe_router_num_groups: Optional[int] = None
    moe_router_group_topk: Optional[int] = None
    moe_latent_size: Optional[int] = None
    expert_model_parallel_size: int = 1
    expert_tensor_parallel_size: Optional[int] = None
    tensor_model_parallel_size: int = 1
    fp8: Optional[str] = None
    fp8_recipe: Optional[str] = None


#: Megatron-LM argument name of each TransformerConfig field we mirror (same unless listed).
_ARG_NAME = {"num_moe_experts": "num_experts"}
#: Fields ``apply_to`` writes: they become Megatron-LM arguments.
MIRRORED_FIELDS = ("num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size",
                   "moe_shared_expert_intermediate_size", "moe_router_dtype",
                   "moe_router_load_balancing_type", "moe_aux_loss_coeff", "moe_z_loss_coeff",
                   "moe_input_jitter_eps", "moe_router_topk_scaling_factor",
                   "moe_router_pre_softmax")


def megatron_moe_args(cfg: MoHGEConfig, ep: int = 1, expert_tp: Optional[int] = None,
                      tp: int = 1) -> dict[str, Any]:
    """Megatron-LM argument values (``args`` names) implied by ``cfg`` via ``apply_to``."""
    fields = cfg.apply_to(_MoEFields(expert_model_parallel_size=ep,
                                     expert_tensor_parallel_size=expert_tp,
                                     tensor_model_parallel_size=tp))
    return {_ARG_NAME.get(name, name): getattr(fields, name) for name in MIRRORED_FIELDS}


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
    g.add_argument("--mohge-group-coeff", type=float, default=None,
                   help="override losses.group_coeff (a_G of the group-wise aux loss)")
    g.add_argument("--mohge-intra-group-coeff", type=float, default=None,
                   help="override losses.intra_group_coeff (a_E of the intra-group loss)")
    g.add_argument("--mohge-group-start-fraction", type=float, default=None,
                   help="override losses.group_start_fraction (group loss off before it)")
    g.add_argument("--mohge-expert-weighting", choices=EXPERT_WEIGHTINGS, default=None,
                   help="override router.expert_weighting (renorm | paper)")
    g.add_argument("--mohge-group-score", choices=GROUP_SCORES, default=None,
                   help="override router.group_score (sigmoid | softmax)")
    g.add_argument("--mohge-expert-backend", choices=EXPERT_BACKENDS, default=None,
                   help="override expert_backend: local (SequentialMLP) | torch (torch._grouped_mm "
                        "per width, no TE) | te | auto (te with --transformer-impl "
                        "transformer_engine and TE, else torch on GPUs)")
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


# ====================================================================== model
def use_te_from_args(args) -> bool:
    """Transformer Engine layers when ``--transformer-impl transformer_engine`` and TE is usable
    (TE + a GPU); otherwise the local (torch) layers, with a warning if TE was asked for."""
    if getattr(args, "transformer_impl", "local") != "transformer_engine":
        return False
    from megatron_mohge.specs import te_available

    if te_available():
        return True
    warnings.warn("megatron-mohge: --transformer-impl transformer_engine but Transformer Engine "
                  "is not usable here; building the local (torch) layers instead.", stacklevel=2)
    return False


def build_mohge_gpt_model(args, config, mohge_cfg: MoHGEConfig, pre_process: bool = True,
                          post_process: bool = True, vp_stage: Optional[int] = None,
                          pg_collection=None, use_te: Optional[bool] = None):
    """A megatron.core ``GPTModel`` whose MoE layers are MoHGE layers (megatron.core only).

    ``config`` is the ``TransformerConfig`` from the arguments (Megatron-LM's
    ``core_transformer_config_from_args``); ``args`` supplies the ``GPTModel`` arguments
    Megatron-LM's ``gpt_builder`` passes (vocabulary, positions, embeddings tying...). The
    decoder spec honours ``moe_layer_freq`` and pipeline / virtual-pipeline slicing.
    """
    from megatron.core.models.gpt import GPTModel

    from megatron_mohge.specs import get_mohge_decoder_block_spec

    tc = mohge_cfg.apply_to(config)
    if use_te is None:
        use_te = use_te_from_args(args)
    spec = get_mohge_decoder_block_spec(tc, mohge_cfg, use_te=use_te, vp_stage=vp_stage)
    mtp_block_spec = None
    if getattr(args, "mtp_num_layers", None):
        mtp_block_spec = _mtp_block_spec(tc, mohge_cfg, use_te, vp_stage)
    return GPTModel(
        config=tc,
        transformer_layer_spec=spec,
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=getattr(args, "fp16_lm_cross_entropy", False),
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=getattr(args, "rotary_percent", 1.0),
        rotary_base=getattr(args, "rotary_base", 10000),
        rope_scaling=getattr(args, "use_rope_scaling", False),
        mtp_block_spec=mtp_block_spec,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
    )


def _mtp_block_spec(tc, mohge_cfg, use_te, vp_stage):
    """Multi-token prediction block whose layer is the decoder's last layer (MoHGE if MoE)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_layer_specs,
        get_gpt_mtp_block_spec,
    )

    from megatron_mohge.specs import _is_moe_layer, _with_mlp, get_mohge_moe_module_spec

    last = get_gpt_decoder_layer_specs(tc, use_transformer_engine=use_te,
                                       normalization=tc.normalization, vp_stage=vp_stage)[-1]
    if _is_moe_layer(last):
        last = _with_mlp(last, get_mohge_moe_module_spec(mohge_cfg, use_te))
    return get_gpt_mtp_block_spec(tc, last, use_transformer_engine=use_te, vp_stage=vp_stage)


def mohge_gpt_builder(args, pre_process, post_process, vp_stage=None, config=None,
                      pg_collection=None):
    """Drop-in for Megatron-LM's ``gpt_builders.gpt_builder`` (same signature)."""
    cfg = finalize_mohge_args(args)
    if cfg is None:
        raise ConfigError("mohge_gpt_builder: --mohge-config is required (a MoHGE layer YAML or "
                          "a run YAML with moe.kind: mohge).")
    for name, what in (("use_legacy_models", "--use-legacy-models"), ("spec", "--spec"),
                       ("yaml_cfg", "--yaml-cfg"),
                       ("heterogeneous_layers_config_path", "--heterogeneous-layers-config-path"),
                       ("experimental_attention_variant", "--experimental-attention-variant")):
        if getattr(args, name, None):
            raise ConfigError(f"{what} cannot be combined with --mohge-config (the MoHGE builder "
                              "makes the decoder spec itself).")
    if config is None:
        from megatron.training.arguments import core_transformer_config_from_args

        config = core_transformer_config_from_args(args)
    _print_rank_0(f"building MoHGE GPT model ({cfg.num_groups} groups x "
                  f"{cfg.experts_per_group} experts, widths {cfg.widths}, Kg={cfg.group_topk}, "
                  f"K={cfg.topk}) ...")
    return build_mohge_gpt_model(args, config, cfg, pre_process, post_process, vp_stage,
                                 pg_collection)


def _print_rank_0(msg: str) -> None:
    try:
        import torch.distributed as dist

        if dist.is_initialized() and dist.get_rank() != 0:
            return
    except ImportError:
        pass
    print(msg, flush=True)


# ====================================================================== training loop
_ROUTERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def update_training_progress(model, args) -> None:
    """Tell the MoHGE / noisy routers of ``model`` how far training is (loss schedules).

    Megatron-LM's loop never does; the group-wise loss stays off until
    ``losses.group_start_fraction`` of ``args.train_iters`` otherwise never arrives. Cheap:
    the router list of each model chunk is found once.
    """
    if not getattr(args, "mohge_config", None):
        return
    train_iters = getattr(args, "train_iters", None)
    if not train_iters:
        return
    iteration = getattr(args, "curr_iteration", None)
    if iteration is None:
        iteration = getattr(args, "iteration", 0) or 0
    routers = _ROUTERS.get(model)
    if routers is None:
        from megatron_mohge.routing.base import GroupedExpertRouter

        routers = [m for m in model.modules() if isinstance(m, GroupedExpertRouter)]
        _ROUTERS[model] = routers
    for r in routers:
        r.set_training_progress(iteration / train_iters)


def mohge_aux_loss_names(cfg: MoHGEConfig) -> list[str]:
    """Aux-loss tracker names the routers of ``cfg`` log (those with a non-zero coefficient)."""
    if cfg.router.type == "mohge":
        from megatron_mohge.routing.mohge_router import GROUP_LOSS_NAME, INTRA_GROUP_LOSS_NAME

        pairs = ((cfg.losses.group_coeff, GROUP_LOSS_NAME),
                 (cfg.losses.intra_group_coeff, INTRA_GROUP_LOSS_NAME))
    else:
        from megatron_mohge.routing.noisy_topk import IMPORTANCE_LOSS_NAME, LOAD_LOSS_NAME

        pairs = ((cfg.noisy_gating.importance_coeff, IMPORTANCE_LOSS_NAME),
                 (cfg.noisy_gating.load_coeff, LOAD_LOSS_NAME))
    return [name for coeff, name in pairs if coeff > 0]


def mohge_track_names(args, track_names) -> list[str]:
    """Megatron-LM ``training_log``'s ``track_names`` with the MoHGE router losses added.

    Only tracked names are reduced across pipeline stages and data-parallel ranks before
    logging; untracked ones are logged from the last rank's own layers only. Megatron's own
    load-balancing names are dropped (MoHGE routers never log them); ``z_loss`` stays when
    ``--moe-z-loss-coeff`` (mirrored from ``router.z_loss_coeff``) is set.
    """
    names = list(track_names or [])
    cfg = mohge_config_from_args(args)
    if cfg is None:
        return names
    names = [n for n in names if n not in MEGATRON_LB_LOSS_NAMES]
    if cfg.router.z_loss_coeff and "z_loss" not in names:
        names.append("z_loss")
    return names + [n for n in mohge_aux_loss_names(cfg) if n not in names]


# ====================================================================== FLOPs
def activated_routed_width(args, cfg: MoHGEConfig) -> float:
    """Summed width of the ``K`` routed experts per token used for FLOPs (see ``--mohge-flops-*``)."""
    measured = getattr(args, "mohge_flops_routed_width", None)
    if measured:
        return cfg.topk * float(measured)
    from megatron_mohge.integration.accounting import activated_widths

    which = getattr(args, "mohge_flops_expectation", None) or "uniform"
    return float(getattr(activated_widths(cfg), which))


def _moe_layer_count(args) -> int:
    freq, n = getattr(args, "moe_layer_freq", 1), args.num_layers
    pattern = [1 if i % freq == 0 else 0 for i in range(n)] if isinstance(freq, int) else list(freq)
    count = sum(pattern)
    mtp = getattr(args, "mtp_num_layers", None)
    if mtp and pattern and pattern[-1]:
        count += mtp  # Megatron counts MTP layers as MoE when the last layer is
    return count


def mohge_flops_correction(args, batch_size: int, mohge_cfg: Optional[MoHGEConfig] = None) -> float:
    """What to add to Megatron-LM's ``num_floating_point_operations`` for heterogeneous widths.

    Megatron counts the routed experts of each MoE layer as ``moe_router_topk`` experts of
    ``moe_ffn_hidden_size`` (the widest group for MoHGE); the MoHGE routed term uses the
    activated routed width instead (:func:`activated_routed_width`). Same conventions as
    Megatron: 3 GEMM passes (fwd, wgrad, dgrad) x 2 FLOPs per MAC x (3 gated | 2) GEMM halves.
    """
    cfg = mohge_cfg or mohge_config_from_args(args)
    if cfg is None or getattr(args, "is_hybrid_model", False):
        return 0.0
    stock_width = args.moe_ffn_hidden_size if args.moe_ffn_hidden_size is not None \
        else args.ffn_hidden_size
    ffn_factor = 3 if getattr(args, "swiglu", False) else 2
    delta = activated_routed_width(args, cfg) - stock_width * args.moe_router_topk
    return (3 * 2 * batch_size * args.seq_length * args.hidden_size * ffn_factor
            * _moe_layer_count(args) * delta)


def mohge_num_floating_point_operations(args, batch_size: int,
                                        mohge_cfg: Optional[MoHGEConfig] = None,
                                        stock: Optional[Callable] = None) -> float:
    """Megatron-LM's FLOPs of one global batch, corrected for MoHGE widths.

    ``stock`` is Megatron's ``num_floating_point_operations`` (default: the one in
    ``megatron.training.training``, before :func:`install_megatron_lm_hooks`). A patched
    checkout already adds the correction, so its function is returned as is.
    """
    if stock is None:
        import megatron.training.training as T

        if getattr(T, "MOHGE_PATCH", None):
            return T.num_floating_point_operations(args, batch_size)
        fn = T.num_floating_point_operations
        stock = getattr(fn, "__mohge_stock__", fn)
    return stock(args, batch_size) + mohge_flops_correction(args, batch_size, mohge_cfg)


# ====================================================================== hooks / launcher
def install_megatron_lm_hooks() -> str:
    """Wrap ``track_moe_metrics`` and ``num_floating_point_operations`` in
    ``megatron.training.training`` so MoHGE runs are logged and timed correctly.

    Returns ``"patched"`` (a patched checkout does it itself: nothing to do), ``"installed"``
    or ``"already installed"``. The wrappers leave runs without ``--mohge-config`` unchanged.
    """
    import megatron.training.training as T

    if getattr(T, "MOHGE_PATCH", None):
        return "patched"
    if getattr(T.num_floating_point_operations, "__mohge_stock__", None):
        return "already installed"
    stock_track, stock_flops = T.track_moe_metrics, T.num_floating_point_operations

    def track_moe_metrics(*a, **kw):
        if "track_names" in kw:
            from megatron.training import get_args

            kw["track_names"] = mohge_track_names(get_args(), kw["track_names"])
        return stock_track(*a, **kw)

    def num_floating_point_operations(args, batch_size, *a, **kw):
        return stock_flops(args, batch_size, *a, **kw) + mohge_flops_correction(args, batch_size)

    track_moe_metrics.__mohge_stock__ = stock_track
    num_floating_point_operations.__mohge_stock__ = stock_flops
    T.track_moe_metrics = track_moe_metrics
    T.num_floating_point_operations = num_floating_point_operations
    return "installed"


def mohge_forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """``pretrain_gpt.forward_step`` after :func:`update_training_progress`."""
    import pretrain_gpt
    from megatron.training import get_args

    update_training_progress(model, get_args())
    return pretrain_gpt.forward_step(data_iterator, model, return_schedule_plan)


def run_pretrain(program_start: Optional[float] = None) -> None:
    """``examples/pretrain_mohge.py``: Megatron-LM's GPT pretraining with MoHGE layers.

    Needs a Megatron-LM checkout (tag core_v0.16.1) on ``sys.path`` (``pretrain_gpt``,
    ``model_provider``). Everything else on the command line is Megatron-LM's.
    """
    import time
    from functools import partial

    start = program_start if program_start is not None else time.time()
    from megatron_mohge.compat.versions import check_megatron_lm

    import pretrain_gpt  # noqa: E402  (Megatron-LM root on sys.path)
    from megatron.core.enums import ModelType
    from megatron.training import inprocess_restart, pretrain
    from model_provider import model_provider

    check_megatron_lm(pretrain)
    install_megatron_lm_hooks()
    try:
        from megatron.training import set_startup_timestamps

        set_startup_timestamps(program_start=start, main_entry=time.time())
    except ImportError:
        pass
    provider = pretrain_gpt.train_valid_test_datasets_provider
    provider.is_distributed = True  # as pretrain_gpt's __main__ does
    modelopt = pretrain_gpt.add_modelopt_args if pretrain_gpt.has_nvidia_modelopt else None
    pretrain_fn, store = inprocess_restart.maybe_wrap_for_inprocess_restart(pretrain)
    pretrain_fn(
        provider,
        partial(model_provider, mohge_gpt_builder),
        ModelType.encoder_or_decoder,
        mohge_forward_step,
        args_defaults={"tokenizer_type": "GPT2BPETokenizer"},
        extra_args_provider=compose_extra_args_providers(modelopt, add_mohge_args),
        store=store,
        get_embedding_ranks=pretrain_gpt.get_embedding_ranks,
    )


def add_megatron_lm_to_path(megatron_lm_dir: Optional[str] = None) -> Optional[str]:
    """Put a Megatron-LM checkout first on ``sys.path`` (argument, ``$MEGATRON_LM_DIR``, or
    the current directory when it holds ``pretrain_gpt.py``); returns the directory used."""
    import os

    candidates = [megatron_lm_dir, os.environ.get("MEGATRON_LM_DIR"), os.getcwd()]
    for c in candidates:
        if c and (Path(c) / "pretrain_gpt.py").is_file():
            c = str(Path(c).resolve())
            if c not in sys.path:
                sys.path.insert(0, c)
            return c
    return None
