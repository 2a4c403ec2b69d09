"""Held-out loss by the width of the expert a token chose: do easy tokens go to narrow
experts, as the MoHGE paper reports?

During the final evaluation every MoE layer's router output gives each token's top-1 expert
(the largest combine weight) and so its FFN width; the model's per-token loss gives how hard
the token was. :func:`loss_by_width_sums` adds the masked losses and token counts per
(layer, top-1 width); :func:`loss_by_width_figures` turns the sums into the summary's
``heldout_loss_by_width``. :class:`WidthLossRecorder` collects them with forward hooks while
the trainer evaluates.

Token order: Megatron's MoE layers route the ``[s, b]`` hidden states flattened s-major
(token ``t = s * b_size + b``), while ``GPTModel`` returns the loss as ``[b, s]``.

Measured on one pipeline stage without sequence parallelism (each rank then routes exactly
the tokens whose loss it computes); other layouts record nothing (``supported``).

Shape suffixes as in the package legend (``megatron_mohge.routing``); ``_G`` is one column per
distinct width (one per group).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


def loss_by_width_sums(loss_T: torch.Tensor, mask_T: torch.Tensor, width_index_LT: torch.Tensor,
                       num_widths: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss sum, token count)``, each ``[L, G]`` float64: per layer ``l`` and width index
    ``w``, the masked per-token losses and the number of (masked-in) tokens whose top-1
    expert in layer ``l`` has width index ``w``."""
    mask = mask_T.double().reshape(-1)
    loss = loss_T.double().reshape(-1) * mask
    L = width_index_LT.shape[0]
    sums = torch.zeros(L, num_widths, dtype=torch.float64)
    counts = torch.zeros(L, num_widths, dtype=torch.float64)
    idx = width_index_LT.long().cpu()
    sums.scatter_add_(1, idx, loss.cpu().expand(L, -1))
    counts.scatter_add_(1, idx, mask.cpu().expand(L, -1))
    return sums, counts


def loss_by_width_figures(sums_LG: torch.Tensor, counts_LG: torch.Tensor,
                          widths: Sequence[int], layers: Sequence[Optional[int]]) -> dict:
    """The summary's ``heldout_loss_by_width``: ``widths``; ``mean_loss`` and
    ``token_share`` over all MoE layers (each token counted once per layer); and per layer
    the same (``None`` for a width no token chose). The overall token-mean loss is the
    mean of ``mean_loss`` weighted by ``token_share``."""
    def row(s: torch.Tensor, c: torch.Tensor) -> dict:
        total = float(c.sum())
        return {"mean_loss": [float(a / b) if b > 0 else None for a, b in zip(s, c)],
                "token_share": [float(b / total) if total > 0 else 0.0 for b in c]}

    out = {"widths": [int(w) for w in widths], **row(sums_LG.sum(0), counts_LG.sum(0))}
    out["layers"] = [{"layer_number": n, **row(s, c)}
                     for n, s, c in zip(layers, sums_LG, counts_LG)]
    return out


class WidthLossRecorder:
    """Forward hooks on the routers and the model chunk(s) for one evaluation: give it the
    evaluation's loss masks in micro-batch order (:meth:`expect`), run the evaluation, read
    :meth:`figures`. Sums are kept per micro-batch and nothing else is stored."""

    def __init__(self, chunks, routers):
        self.routers = list(routers)
        widths_by_router = [r.slot_widths() for r in self.routers]
        self.widths = sorted({w for ws in widths_by_router for w in ws})
        pos = {w: i for i, w in enumerate(self.widths)}
        self.slot_index = [torch.tensor([pos[w] for w in ws]) for ws in widths_by_router]
        self.layers = [r.layer_number for r in self.routers]
        self.sums = torch.zeros(len(self.routers), len(self.widths), dtype=torch.float64)
        self.counts = torch.zeros_like(self.sums)
        self.masks: list = []
        self._top1: list = [None] * len(self.routers)
        from megatron_mohge.training.mcore_plumbing import unwrap

        self.handles = [r.register_forward_hook(self._router_hook(i))
                        for i, r in enumerate(self.routers)]
        self.handles += [unwrap(c).register_forward_hook(self._model_hook) for c in chunks]

    def _router_hook(self, i: int):
        def hook(module, args, output):
            probs_TE, routing_map_TE = output
            E = probs_TE.shape[-1]
            top1_T = probs_TE.reshape(-1, E).float().masked_fill(
                ~routing_map_TE.reshape(-1, E).bool(), float("-inf")).argmax(-1)
            self._top1[i] = self.slot_index[i][top1_T.cpu()]
        return hook

    def _model_hook(self, module, args, output):
        if not self.masks or not torch.is_tensor(output) or output.dim() != 2:
            return  # not a loss (a hidden-states output), or more forwards than expected
        mask_BS = self.masks.pop(0)
        B, S = output.shape
        if any(t is None or t.numel() != B * S for t in self._top1):
            self._top1 = [None] * len(self.routers)
            return
        # routers saw tokens s-major ([s, b] flattened): bring them to the loss's [b, s]
        index_LT = torch.stack([t.reshape(S, B).t().reshape(-1) for t in self._top1])
        s, c = loss_by_width_sums(output.detach().reshape(-1), mask_BS.reshape(-1), index_LT,
                                  len(self.widths))
        self.sums += s
        self.counts += c
        self._top1 = [None] * len(self.routers)

    def expect(self, batches: list) -> None:
        """The micro-batches about to be evaluated, in order (their ``loss_mask``)."""
        for mbs in batches:
            self.masks += [mb["loss_mask"] for mb in mbs]

    def figures(self, group=None) -> dict:
        """:func:`loss_by_width_figures` of the sums, added over ``group`` (data parallel)."""
        import torch.distributed as dist

        packed = torch.stack([self.sums, self.counts])
        if group is not None and dist.is_initialized() and dist.get_world_size(group) > 1:
            from megatron_mohge.training import mcore_plumbing as M

            packed = packed.to(M.device())
            dist.all_reduce(packed, group=group)
            packed = packed.cpu()
        return loss_by_width_figures(packed[0], packed[1], self.widths, self.layers)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def supported(pipeline_parallel: int, tensor_parallel: int, sequence_parallel: bool) -> bool:
    """Whether each rank routes the very tokens it computes the loss of (see the module
    docstring): one pipeline stage, and TP ranks holding whole sequences."""
    return pipeline_parallel == 1 and not (tensor_parallel > 1 and sequence_parallel)


__all__ = ["loss_by_width_sums", "loss_by_width_figures", "WidthLossRecorder", "supported"]
