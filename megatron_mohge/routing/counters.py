"""Routing counts a router keeps for metrics and for loss-free balancing (never checkpointed).

One :class:`RoutingCounter` per router (``router.counter``): every router of the package
owns one, Megatron's stock ``TopKRouter`` included through
:class:`megatron_mohge.routing.stock.CountedTopKRouter`, so MoHGE and its stock baseline are
measured by the same code. :meth:`RoutingCounter.metrics` turns the window into the figures
of one layer (:class:`LayerRouting`), given what the router's experts are
(:class:`RoutedLayout`); the trainer, the bench and :mod:`megatron_mohge.metrics` read only
that, never router internals.

Three horizons:

* the **window** (tokens per expert / group since the last :meth:`reset`): load CV,
  group share, activated params, rank FLOPs over a log interval or an evaluation;
* the **micro-batch**: MaxVio ``max_e n_e / mean_e n_e - 1`` of every forward call on this
  rank, summed over the window (``maxvio_micro``);
* the **optimizer step**: the local counts of every training forward since the last step
  (``step_tokens_per_expert_E``), summed over all ranks and micro-batches at the end of the
  step by :func:`megatron_mohge.routing.balance.end_of_step`, which turns them into the
  global-batch MaxVio (``maxvio_batch``) and the loss-free bias update.

MaxVio is the balance figure of Wang et al., "Auxiliary-Loss-Free Load Balancing" (arXiv
2408.15664). The accumulators avoid host syncs (no ``.item()`` in the forward pass).

Shape suffixes (``_TE``, ``_TG``, ...): see :mod:`megatron_mohge.routing`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_mohge.sizes import group_offsets


@dataclass(frozen=True)
class RoutedLayout:
    """What a router's counts are weighed with (built by the router, see
    ``CountedTopKRouter.routed_layout``): each expert's FFN width and parameters (biases
    included) in canonical order, the routing groups, the allocation groups (widths and
    expert counts), and the MoHGE allocation plan (None: Megatron's contiguous layout)."""

    expert_widths: Sequence[int]
    params_per_expert: Sequence[int]
    group_sizes: Sequence[int]
    alloc_widths: Sequence[int]
    alloc_counts: Sequence[int]
    plan: Optional[object] = None  # allocation.AllocationPlan of MoHGE experts

    @property
    def all_size(self) -> bool:
        """Heterogeneous (MoHGE) experts: the all-size allocation applies."""
        return self.plan is not None


@dataclass
class LayerRouting:
    """Routing figures of one MoE layer over the counted tokens."""

    layer_number: Optional[int]
    tokens: float  # tokens routed (valid tokens, not token-expert pairs)
    tokens_per_expert: list[float]  # canonical (group-major) order
    group_token_share: list[float]  # f_g: share of group selections per group (sums to 1)
    mean_chosen_width: float  # mean FFN width over all (token, expert) assignments
    activated_routed_params_per_token: float  # sum over chosen experts of their weights
    expert_load_cv: float  # std/mean of tokens per expert (population std)
    expert_load_max_over_mean: float
    # load CV inside each group (canonical group order; one entry for stock experts)
    group_load_cv: list[float] = field(default_factory=list)
    # MaxVio = max load / mean load - 1 (arXiv 2408.15664): mean over forward calls of one
    # rank's micro-batch, and mean over optimizer steps of the global batch (training only)
    maxvio_micro: Optional[float] = None
    maxvio_batch: Optional[float] = None
    rank_flops_max_over_mean: Optional[float] = None  # with EP > 1
    # CV of Importance_e (Shazeer et al. 2017): routers that count importance (noisy) only
    importance_cv: Optional[float] = None
    # --- routing diagnostics (is the router learning?), see RoutingCounter.record_diagnostics
    # share of token-expert assignments per group (group_token_share counts selections)
    group_assignment_share: list[float] = field(default_factory=list)
    max_group_share: Optional[float] = None  # the largest group's assignment share
    same_group_fraction: Optional[float] = None  # tokens whose K picks share one group
    ingroup_max_prob: Optional[float] = None  # mean max in-group probability (1/N_g: flat)
    weight_gap: Optional[float] = None  # mean max - min combine weight of the K picks
    # mean L2 norm of the gate weights' gradient per backward pass (one micro-batch on one
    # rank, before data-parallel averaging; training only)
    group_gate_grad_norm: Optional[float] = None
    expert_gate_grad_norm: Optional[float] = None

    def figures(self) -> dict:
        """The figures as a dict; ``importance_cv`` only where the router measures it."""
        out = asdict(self)
        if out["importance_cv"] is None:
            del out["importance_cv"]
        return out


def cv(load: torch.Tensor) -> float:
    """Population std / mean of a load vector (0 when empty)."""
    mean = load.double().mean()
    return float(load.double().std(unbiased=False) / mean) if float(mean) > 0 else 0.0


def _ratio(total: torch.Tensor, count: torch.Tensor) -> Optional[float]:
    return float(total / count) if float(count) > 0 else None


def group_bounds(group_sizes) -> list[tuple[int, int]]:
    """``[first, end)`` canonical expert ids of each group."""
    starts = group_offsets(group_sizes)
    return list(zip(starts, starts[1:] + [sum(group_sizes)]))


def max_violation(load_E: torch.Tensor) -> torch.Tensor:
    """``max/mean - 1`` of a load vector (0 when nothing was routed), as a 0-d tensor."""
    mean = load_E.float().mean()
    return torch.where(mean > 0, load_E.float().max() / mean.clamp_min(1e-12) - 1.0,
                       torch.zeros_like(mean))


class RoutingCounter(torch.nn.Module):
    """Token counts of one router, canonical (group-major) expert order."""

    def __init__(self, num_experts: int, num_groups: int, device=None, importance: bool = False):
        super().__init__()

        def zeros(shape):
            return torch.zeros(shape, dtype=torch.float64, device=device)

        for name, shape in (("tokens_per_expert_E", (num_experts,)),
                            ("tokens_per_group_G", (num_groups,)), ("tokens_seen", ()),
                            ("maxvio_micro_sum", ()), ("maxvio_micro_n", ()),
                            ("maxvio_batch_sum", ()), ("maxvio_batch_n", ()),
                            ("step_tokens_per_expert_E", (num_experts,)),
                            # [tokens, same_group, ingroup_max_prob, weight_gap] sums
                            ("diag_sums", (4,)),
                            # [group gate backward calls, sum of their grad norms, expert ...]
                            ("grad_sums", (4,))):
            self.register_buffer(name, zeros(shape), persistent=False)
        self.step_forwards = 0  # training forwards since the last end_of_step (host int)
        # Noisy routers' Importance_e = sum of gate weights (Shazeer et al.): a window count
        # like the others, so it is reset, snapshotted and kept in float64 with them.
        self._window = self._WINDOW
        if importance:
            self.register_buffer("importance_E", zeros((num_experts,)), persistent=False)
            self._window = self._WINDOW + ("importance_E",)

    def _apply(self, fn, recurse=True):
        # Follow device moves only: Float16Module's .bfloat16() would turn the counts into
        # bf16 (exact only up to 256), so every buffer stays float64 with its values.
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = buf.to(fn(buf).device)
        return self

    _WINDOW = ("tokens_per_expert_E", "tokens_per_group_G", "tokens_seen", "maxvio_micro_sum",
               "maxvio_micro_n", "maxvio_batch_sum", "maxvio_batch_n", "diag_sums", "grad_sums")

    @torch.no_grad()
    def record_diagnostics(self, sums: torch.Tensor) -> None:
        """Add ``[tokens, same_group, ingroup_max_prob, weight_gap]`` sums of one forward call
        (``routing.functional.routing_diagnostics``)."""
        self.diag_sums += sums.to(self.diag_sums)

    @torch.no_grad()
    def add_gate_grad(self, gate: str, grad: torch.Tensor) -> None:
        """Count one backward call's gradient norm of a gate weight (``gate``: ``group`` or
        ``expert``), without a host sync."""
        slot = {"group": 0, "expert": 2}[gate]
        add = torch.stack([torch.ones((), dtype=torch.float64, device=grad.device),
                           grad.detach().double().norm()])
        self.grad_sums[slot:slot + 2] += add.to(self.grad_sums)

    @torch.no_grad()
    def record(self, routing_map_TE: torch.Tensor, group_mask_TG: Optional[torch.Tensor],
               keep_T1: Optional[torch.Tensor], training: bool) -> None:
        """Add one forward call's routing (``keep_T1``: 1 for real tokens, 0 for padding).

        ``group_mask_TG`` is None for one-group (stock) routers: every token then counts as
        one selection of the single group."""
        dev = self.tokens_per_expert_E.device
        rm = routing_map_TE.to(torch.float64)
        if keep_T1 is not None:
            rm = rm * keep_T1.to(rm.dtype)
        n_E = rm.sum(0).to(dev)
        tokens = (torch.tensor(float(rm.shape[0]), dtype=torch.float64, device=dev)
                  if keep_T1 is None else keep_T1.sum().to(dev, torch.float64))
        self.tokens_per_expert_E += n_E
        if group_mask_TG is None:
            self.tokens_per_group_G += tokens
        else:
            gm = group_mask_TG.to(torch.float64)
            if keep_T1 is not None:
                gm = gm * keep_T1.to(gm.dtype)
            self.tokens_per_group_G += gm.sum(0).to(dev)
        self.tokens_seen += tokens
        routed = (n_E.sum() > 0).to(torch.float64)
        self.maxvio_micro_sum += max_violation(n_E) * routed
        self.maxvio_micro_n += routed
        if training:
            self.step_tokens_per_expert_E += n_E
            self.step_forwards += 1

    @torch.no_grad()
    def add_importance(self, weights_TE: torch.Tensor) -> None:
        """Add one forward call's gate weights (padding rows already zeroed)."""
        self.importance_E += weights_TE.sum(0).to(self.importance_E.device, torch.float64)

    @torch.no_grad()
    def add_batch(self, global_load_E: torch.Tensor) -> None:
        """Account one optimizer step's global-batch load (summed over ranks)."""
        routed = (global_load_E.sum() > 0).to(self.maxvio_batch_n)  # no host sync
        self.maxvio_batch_sum += max_violation(global_load_E).to(self.maxvio_batch_sum) * routed
        self.maxvio_batch_n += routed

    def reset_step(self) -> None:
        self.step_tokens_per_expert_E.zero_()
        self.step_forwards = 0

    def reset(self) -> None:
        """Start a new window (the step counts are :meth:`reset_step`'s)."""
        for name in self._window:
            getattr(self, name).zero_()

    def snapshot(self) -> dict:
        """Copies of the window counts, for :meth:`restore`."""
        return {name: getattr(self, name).clone() for name in self._window}

    def restore(self, snap: dict) -> None:
        for name, value in snap.items():
            getattr(self, name).copy_(value)

    def window_vector(self) -> torch.Tensor:
        """The window counts packed into one float64 vector (for one all-reduce)."""
        return torch.cat([getattr(self, n).reshape(-1) for n in self._window])

    def unpack_window(self, packed: torch.Tensor) -> dict:
        out, i = {}, 0
        for name in self._window:
            n = getattr(self, name).numel()
            out[name] = packed[i:i + n].reshape(getattr(self, name).shape)
            i += n
        return out

    def metrics(self, layout: RoutedLayout, group=None,
                layer_number: Optional[int] = None) -> LayerRouting:
        """Figures of the window, its counts summed over ``group`` first (one all-reduce)."""
        packed = self.window_vector()
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            dist.all_reduce(packed, group=group)
        win = self.unpack_window(packed)
        n_e, n_g, tokens = win["tokens_per_expert_E"], win["tokens_per_group_G"], float(win["tokens_seen"])
        G = n_g.numel()
        w = torch.tensor(list(layout.expert_widths), dtype=torch.float64)
        p = torch.tensor(list(layout.params_per_expert), dtype=torch.float64)
        assigned = float(n_e.sum())
        mean = n_e.mean()
        share = (n_g / n_g.sum()).tolist() if float(n_g.sum()) > 0 else [0.0] * G
        out = LayerRouting(
            layer_number=layer_number,
            tokens=tokens,
            tokens_per_expert=n_e.tolist(),
            group_token_share=share,
            mean_chosen_width=float((n_e * w).sum() / assigned) if assigned else 0.0,
            activated_routed_params_per_token=float((n_e * p).sum() / tokens) if tokens else 0.0,
            expert_load_cv=cv(n_e),
            expert_load_max_over_mean=float(n_e.max() / mean) if float(mean) > 0 else 0.0,
            group_load_cv=[cv(n_e[a:b]) for a, b in group_bounds(layout.group_sizes)],
            maxvio_micro=_ratio(win["maxvio_micro_sum"], win["maxvio_micro_n"]),
            maxvio_batch=_ratio(win["maxvio_batch_sum"], win["maxvio_batch_n"]),
        )
        if "importance_E" in win:
            out.importance_cv = cv(win["importance_E"])
        self._diagnostics(out, win, layout)
        if layout.plan is not None and layout.plan.ep_size > 1 and assigned:
            flops = layout.plan.rank_flops(n_e.tolist())
            out.rank_flops_max_over_mean = max(flops) / (sum(flops) / len(flops))
        return out


    @staticmethod
    def _diagnostics(out: LayerRouting, win: dict, layout: RoutedLayout) -> None:
        n_e = win["tokens_per_expert_E"]
        a_g = torch.stack([n_e[a:b].sum() for a, b in group_bounds(layout.group_sizes)])
        if float(a_g.sum()) > 0 and len(layout.group_sizes) > 1:
            out.group_assignment_share = (a_g / a_g.sum()).tolist()
            out.max_group_share = max(out.group_assignment_share)
        tokens, same, inmax, gap = win["diag_sums"].tolist()
        if tokens > 0:
            out.weight_gap = gap / tokens
            if len(layout.group_sizes) > 1:  # meaningless for one group of experts
                out.same_group_fraction, out.ingroup_max_prob = same / tokens, inmax / tokens
        g_calls, g_sum, e_calls, e_sum = win["grad_sums"].tolist()
        out.group_gate_grad_norm = g_sum / g_calls if g_calls else None
        out.expert_gate_grad_norm = e_sum / e_calls if e_calls else None


def rank_flops_layouts(layout: RoutedLayout, tokens_per_expert: list[float],
                       ep_size: int) -> dict:
    """Per-rank expert FLOPs at ``ep_size`` for the all-size allocation (MoHGE experts) and
    Megatron's contiguous layout (rank r owns canonical experts ``[r*E/ep, (r+1)*E/ep)``),
    each normalised to its mean, with max/mean."""
    from megatron_mohge.config.allocation import plan_allocation

    # report even layouts the config would refuse (imbalance above its threshold)
    plan = plan_allocation(list(layout.alloc_widths), list(layout.alloc_counts), ep_size,
                           allow_imbalance=True)
    layouts = {"contiguous": plan.rank_flops(tokens_per_expert, canonical=False)}
    if layout.all_size:
        layouts["all_size"] = plan.rank_flops(tokens_per_expert)
    out = {"ep": ep_size}
    for name, flops in layouts.items():
        mean = sum(flops) / len(flops)
        out[name] = [f / mean if mean else 0.0 for f in flops]
        out[f"{name}_max_over_mean"] = max(flops) / mean if mean else 0.0
    return out
