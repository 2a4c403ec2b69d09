"""Routing counts a router keeps for metrics and for loss-free balancing (never checkpointed).

One :class:`RoutingCounter` per router: our routers own one (``router.counter``), and
:func:`megatron_mohge.metrics.attach_stock_counters` gives Megatron's stock ``TopKRouter``
one too, so MoHGE and its stock baseline are measured by the same code.

Three horizons:

* the **window** (tokens per expert / group since the last :meth:`reset_window`): load CV,
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

from typing import Optional

import torch


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
                            ("step_tokens_per_expert_E", (num_experts,))):
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
               "maxvio_micro_n", "maxvio_batch_sum", "maxvio_batch_n")

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

    def reset_window(self) -> None:
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
