"""Megatron-LM's training loop, told about MoHGE: loss-schedule progress, aux-loss logging, FLOPs.

* :func:`update_training_progress` -- called from the forward step; Megatron never tells
  routers how far training is, and the group-wise loss starts at a fraction of it.
* :func:`mohge_track_names` -- ``training_log`` reduces (across pipeline stages and
  data-parallel ranks) and logs only the MoE metrics it names; MoHGE adds its router losses.
* :func:`install_megatron_lm_hooks` -- what the unpatched launcher installs at run time. The
  seams differ by tag and are found by shape: ``track_moe_metrics(track_names=...)`` in
  ``megatron.training.training`` up to core_v0.17; from core_v0.18 ``training_log`` calls
  ``get_moe_metrics_tracker().report(track_names=...)`` (names it does not list are neither
  reduced nor logged there), so the tracker's ``report`` is wrapped instead.
  ``num_floating_point_operations`` is wrapped on every tag (``flops``), and
  ``training_log`` / ``evaluate`` / ``finalize_model_grads`` for the routing diagnostics
  (:mod:`.routing_log`).
"""

from __future__ import annotations

import inspect

from megatron_mohge.config import MoHGEConfig
from megatron_mohge.integration.megatron_lm.args import mohge_config_from_args
from megatron_mohge.integration.megatron_lm.flops import mohge_flops_correction

#: Tracker names of Megatron's own load-balancing losses; MoHGE routers never log them.
MEGATRON_LB_LOSS_NAMES = ("load_balancing_loss", "seq_load_balancing_loss",
                          "global_load_balancing_loss")

def update_training_progress(model, args) -> None:
    """Tell the routers of ``model`` how far training is (loss schedules):
    :func:`megatron_mohge.routing.base.set_training_progress` at ``args``' iteration.

    Megatron-LM's loop never does; the group-wise loss stays off until
    ``losses.group_start_fraction`` of ``args.train_iters`` otherwise never arrives. Cheap:
    the router list of each model chunk is found once (``find_routers``).
    """
    if not getattr(args, "mohge_config", None):
        return
    train_iters = getattr(args, "train_iters", None)
    if not train_iters:
        return
    iteration = getattr(args, "curr_iteration", None)
    if iteration is None:
        iteration = getattr(args, "iteration", 0) or 0
    from megatron_mohge.routing.base import set_training_progress

    set_training_progress(model, iteration, train_iters)


def mohge_aux_loss_names(cfg: MoHGEConfig) -> list[str]:
    """Aux-loss tracker names the routers of ``cfg`` log (those with a non-zero coefficient)."""
    if cfg.router.type == "mohge":
        from megatron_mohge.routing.mohge_router import (GROUP_BALANCE_LOSS_NAME,
                                                         GROUP_LOSS_NAME, INTRA_GROUP_LOSS_NAME)

        pairs = ((cfg.losses.group_coeff, GROUP_LOSS_NAME),
                 (cfg.losses.group_balance_coeff, GROUP_BALANCE_LOSS_NAME),
                 (cfg.losses.intra_group_coeff, INTRA_GROUP_LOSS_NAME))
    else:
        from megatron_mohge.routing.noisy_topk import IMPORTANCE_LOSS_NAME, LOAD_LOSS_NAME

        pairs = ((cfg.noisy_gating.importance_coeff, IMPORTANCE_LOSS_NAME),
                 (cfg.noisy_gating.load_coeff, LOAD_LOSS_NAME))
    return [name for coeff, name in pairs if coeff > 0]


def mohge_track_names(args, track_names) -> list[str]:
    """Megatron-LM ``training_log``'s ``track_names`` with the MoHGE router losses added.

    Megatron's own load-balancing names are dropped (MoHGE routers never log them); ``z_loss``
    stays when ``--moe-z-loss-coeff`` (mirrored from ``router.z_loss_coeff``) is set. Runs
    without ``--mohge-config`` get ``track_names`` back unchanged.
    """
    names = list(track_names or [])
    cfg = mohge_config_from_args(args)
    if cfg is None:
        return names
    names = [n for n in names if n not in MEGATRON_LB_LOSS_NAMES]
    if cfg.router.z_loss_coeff and "z_loss" not in names:
        names.append("z_loss")
    return names + [n for n in mohge_aux_loss_names(cfg) if n not in names]


def _with_mohge_track_names(stock):
    """``stock`` (a function taking ``track_names=``) with :func:`mohge_track_names` applied."""
    params = list(inspect.signature(stock).parameters)
    position = params.index("track_names") if "track_names" in params else None

    def wrapper(*a, **kw):
        from megatron.training import get_args

        if kw.get("track_names") is not None:  # how training_log passes it on every tag
            kw["track_names"] = mohge_track_names(get_args(), kw["track_names"])
        elif position is not None and len(a) > position and a[position] is not None:
            a = (*a[:position], mohge_track_names(get_args(), a[position]), *a[position + 1:])
        return stock(*a, **kw)

    wrapper.__mohge_stock__ = stock
    wrapper.__wrapped__ = stock
    return wrapper


def install_tracker_report_hook() -> bool:
    """Wrap ``report`` of megatron.core's MoE metrics tracker (core_v0.18+); ``False`` when it
    was already wrapped. The wrapper lives on the tracker object ``training_log`` reports to."""
    from megatron.core.transformer.moe.moe_logging import get_moe_metrics_tracker

    tracker = get_moe_metrics_tracker()
    if getattr(tracker.report, "__mohge_stock__", None):
        return False
    tracker.report = _with_mohge_track_names(_routers_sized_entries(tracker))
    return True


def _routers_sized_entries(tracker):
    """``tracker.report`` that first creates missing entries at the size routers record with
    (``num_layers`` + MTP layers). For a hybrid model ``training_log`` passes the count of
    ``E`` layers as ``num_layers`` and ``force_initialize`` creates entries that short, while
    routers record at their layer number (up to ``num_layers``): a loss first recorded after
    the first report (MoHGE's group loss, from ``group_start_fraction``) then indexed past its
    entry (``IndexError: index 3 is out of bounds for dimension 0 with size 2``). The mean
    still divides by the MoE-layer count Megatron computes."""
    stock = tracker.report

    def report(*a, track_names=None, **kw):
        from megatron.training import get_args

        args = get_args()
        if track_names is not None and getattr(args, "hybrid_layer_pattern", None):
            size = args.num_layers + (args.mtp_num_layers or 0)
            for name in [track_names] if isinstance(track_names, str) else track_names:
                tracker.ensure_initialized(name, size)
        return stock(*a, track_names=track_names, **kw)

    report.__wrapped__ = stock
    return report


def install_megatron_lm_hooks() -> str:
    """Make an unpatched ``megatron.training.training`` log MoHGE losses and count MoHGE FLOPs,
    and run :func:`megatron_mohge.routing.balance.end_of_step` after ``finalize_model_grads``;
    log the routing diagnostics (:mod:`.routing_log`); the rank's checkpoint-writer processes
    die with it (``training.procs``), on every tag.

    Returns ``"patched"`` (a patched checkout does it itself: nothing to do), ``"installed"``
    or ``"already installed"``. The wrappers leave runs without ``--mohge-config`` unchanged.
    """
    import megatron.training.training as T

    from megatron_mohge.routing.balance import wrap_finalize_model_grads

    # train() installs this name as config.finalize_model_grads_func on every tag: the
    # once-per-step loss-free bias update and global-batch figures run right after it
    # (idempotent; patched checkouts get it too).
    T.finalize_model_grads = wrap_finalize_model_grads(T.finalize_model_grads)
    # routing diagnostics every log interval (log line, TensorBoard, routing_diagnostics.json),
    # evaluation kept out of the window (idempotent)
    from megatron_mohge.integration.megatron_lm.routing_log import install_routing_log_hooks

    install_routing_log_hooks(T)
    # distributed-optimizer checkpoints with torch Adam (no Apex / TE, e.g. GPU installs
    # without TE): Megatron's load breaks in three places (compat.distopt; idempotent)
    from megatron_mohge.compat import distopt
    from megatron_mohge.training import procs

    distopt.install_load_fixes()
    # the checkpoint writers' results Manager (and its resource tracker) die with the rank,
    # even under kill -9, as in mohge-train: before Megatron's first save starts it
    procs.install_child_reaper()
    if getattr(T, "MOHGE_PATCH", None):
        return "patched"
    if getattr(T.num_floating_point_operations, "__mohge_stock__", None):
        return "already installed"
    if hasattr(T, "track_moe_metrics"):  # core_v0.16 / core_v0.17
        T.track_moe_metrics = _with_mohge_track_names(T.track_moe_metrics)
    elif hasattr(T, "get_moe_metrics_tracker"):  # core_v0.18+
        install_tracker_report_hook()
    else:
        raise RuntimeError("megatron.training.training has neither track_moe_metrics nor "
                           "get_moe_metrics_tracker: an unsupported Megatron-LM version; see "
                           "megatron_mohge/compat/versions.py (Megatron-LM section)")
    stock_flops = T.num_floating_point_operations
    sig = inspect.signature(stock_flops)

    def num_floating_point_operations(args, batch_size, *a, **kw):
        tokens = sig.bind(args, batch_size, *a, **kw).arguments.get("total_real_tokens_in_batch")
        return (stock_flops(args, batch_size, *a, **kw)
                + mohge_flops_correction(args, batch_size, total_real_tokens_in_batch=tokens))

    num_floating_point_operations.__mohge_stock__ = stock_flops
    T.num_floating_point_operations = num_floating_point_operations
    return "installed"


def mohge_forward_step(data_iterator, model, return_schedule_plan: bool = False):
    """``pretrain_gpt.forward_step`` after :func:`update_training_progress`."""
    import pretrain_gpt
    from megatron.training import get_args

    update_training_progress(model, get_args())
    return pretrain_gpt.forward_step(data_iterator, model, return_schedule_plan)
