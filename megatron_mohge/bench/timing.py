"""Timed pieces of the MoE-layer benchmark: one call each, wall clock on CPU, CUDA events on
a GPU (host-side launch overhead not counted twice).

* :func:`time_fwd_bwd`: a layer's forward + ``out.sum()`` backward;
* :func:`time_router`: the router forward as the layer runs it in training;
* :func:`time_experts`: the expert module alone on the inputs :func:`capture_expert_inputs`
  recorded from the dispatcher;
* :func:`time_matmul`: one plain matmul fwd+bwd (the GFLOP/s reference).
"""

from __future__ import annotations

import time

import torch


def _sync(x: torch.Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)


class _Timer:
    """Wall time on CPU; CUDA events on a GPU (no host-side launch overhead counted twice)."""

    def __init__(self, x: torch.Tensor):
        self.cuda = x.is_cuda
        _sync(x)
        if self.cuda:
            self.start, self.end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            self.start.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1e3
        return time.perf_counter() - self.t0


def time_fwd_bwd(layer, x: torch.Tensor) -> float:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    t = _Timer(x)
    out, _ = layer(x)
    out.sum().backward()
    return t.stop()


def time_router(layer, x: torch.Tensor) -> float:
    # The router forward as the layer runs it in training (grad on, losses attached).
    t = _Timer(x)
    probs, routing_map = layer.router(x)
    dt = t.stop()
    del probs, routing_map
    return dt


def capture_expert_inputs(layer, x: torch.Tensor) -> tuple:
    """``(tokens [T', h], tokens_per_expert list, probs [T'])`` the dispatcher hands the
    layer's experts for ``x`` (one forward, no grad)."""
    seen = {}

    def hook(module, args):
        hidden, tpe, probs = args[:3]
        seen["args"] = (hidden.detach().clone(), [int(v) for v in tpe.tolist()],
                        probs.detach().clone())

    handle = layer.experts.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            layer(x)
    finally:
        handle.remove()
    return seen["args"]


def time_experts(layer, inputs: tuple, grad: torch.Tensor) -> float:
    hidden, counts, probs = inputs
    layer.zero_grad(set_to_none=True)
    h = hidden.requires_grad_(True)
    h.grad = None
    t = _Timer(hidden)
    out, _ = layer.experts(h, torch.tensor(counts), probs)
    out.backward(grad)
    return t.stop()


def time_matmul(a: torch.Tensor, b: torch.Tensor, grad: torch.Tensor) -> float:
    a.grad = b.grad = None
    t = _Timer(a)
    (a @ b).backward(grad)
    return t.stop()
