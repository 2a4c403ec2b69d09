"""Analytic accounting of a run: parameters, activated widths per token, expert memory.

Everything here is computed from the configuration alone (no torch, no Megatron), so
``mohge-check-config`` runs anywhere; ``tests/test_check_config.py`` checks the parameter
counts against a megatron.core ``GPTModel`` built on CPU.

Conventions (they follow what megatron.core 0.16 builds):

* attention: fused QKV ``h x (q + 2 kv)`` and output projection ``q x h`` with
  ``q = heads * h/heads``, ``kv = query_groups * h/heads``; biases when ``add_bias_linear``;
* every transformer layer has two norms (input, pre-MLP) plus one final norm; RMSNorm has a
  weight, LayerNorm a weight and a bias;
* a gated (SwiGLU) FFN of width ``W`` has ``3 h W`` weights (fc1 is ``h x 2W``), else ``2 h W``;
* shared experts are one fused MLP of width ``num_shared * shared_width`` (Megatron's
  ``moe_shared_expert_intermediate_size``);
* routers: Megatron's gate ``E x h`` (+ ``E`` bias with ``add_bias_linear``); the MoHGE router
  adds the group gate ``Ng x h``; the noisy top-k router adds ``W_noise`` (``E x h``) and, when
  hierarchical, a clean and a noise group gate (``Ng x h`` each);
* word embeddings ``V x h`` (``V`` padded as Megatron-LM pads it), learned absolute position
  embeddings ``seq x h``, and an output layer ``V x h`` only when untied.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from megatron_mohge.config import MoHGEConfig
from megatron_mohge.config.megatron import routed_expert_widths, run_moe_transformer_fields
from megatron_mohge.sizes import ffn_param_coeffs, ffn_params  # noqa: F401  (A.ffn_params)

#: Above this many group subsets, the MoHGE min/max/expectation use closed forms (exact for
#: equal group sizes) instead of enumerating every choice of Kg groups.
MAX_ENUMERATED_SUBSETS = 50_000

#: Bytes per parameter that training keeps for it, by precision (Megatron-LM defaults).
#: bf16: bf16 weight (2) + fp32 main grad (4, Megatron forces fp32 grad accumulation for bf16)
#:       + fp32 master weight (4) + Adam exp_avg (4) + exp_avg_sq (4) = 18.
#: fp16: fp16 weight (2) + fp16 grad (2) + fp32 master (4) + Adam (8) = 16.
#: fp32: weight (4) + grad (4) + Adam (8) = 16 (no master copy).
BYTES_PER_PARAM = {
    "bf16": {"weight": 2, "grad": 4, "optimizer": 12},
    "fp16": {"weight": 2, "grad": 2, "optimizer": 12},
    "fp32": {"weight": 4, "grad": 4, "optimizer": 8},
}


# ---------------------------------------------------------------------- activated widths
@dataclass
class WidthRange:
    """Sum of the FFN widths of the routed experts one token activates (``K`` experts)."""

    min: float  # the K cheapest experts a token can reach
    uniform: float  # expectation under the uniform routing prior (see ``activated_widths``)
    max: float  # the K most expensive experts a token can reach

    def to_dict(self) -> dict:
        return asdict(self)


def activated_widths(cfg: MoHGEConfig) -> WidthRange:
    """Min / expected / max summed width of the ``K`` routed experts per token.

    Reachability follows the router type. ``mohge``: any ``K`` experts inside the union of
    ``Kg`` groups. ``hierarchical_noisy_topk``: ``K/Kg`` experts in each of ``Kg`` groups.
    ``noisy_topk``: any ``K`` experts.

    The uniform-routing prior: every set of ``Kg`` groups is equally likely and the ``K``
    experts are a uniform draw from the experts of the chosen groups (so each expert of a
    group of equal-size groups is picked with probability ``K/E``, giving ``K x`` the mean
    expert width). Measured routing (``megatron_mohge.metrics``: ``mean_chosen_width``)
    replaces it once a model is trained; the paper's group loss pushes it below.
    """
    k, kg = cfg.topk, cfg.group_topk
    widths, sizes = list(cfg.widths), list(cfg.experts_per_group)
    experts = sorted(cfg.expert_widths)
    rtype = cfg.router.type
    if rtype == "noisy_topk":
        return WidthRange(float(sum(experts[:k])), k * sum(experts) / len(experts),
                          float(sum(experts[-k:])))
    if rtype == "hierarchical_noisy_topk":
        per = k // kg
        ws = sorted(widths)
        return WidthRange(float(per * sum(ws[:kg])), float(per * sum(widths)) * kg / len(widths),
                          float(per * sum(ws[-kg:])))
    ng = len(widths)
    if math.comb(ng, kg) <= MAX_ENUMERATED_SUBSETS:
        lo, hi, total, count = math.inf, -math.inf, 0.0, 0
        for subset in itertools.combinations(range(ng), kg):
            union = sorted(w for g in subset for w in [widths[g]] * sizes[g])
            lo = min(lo, sum(union[:k]))
            hi = max(hi, sum(union[-k:]))
            total += k * sum(union) / len(union)
            count += 1
        return WidthRange(float(lo), total / count, float(hi))
    # Closed forms: greedy over groups sorted by width (exact when it fits in Kg groups).
    return WidthRange(float(_greedy_sum(widths, sizes, k, kg, cheapest=True)),
                      k * sum(experts) / len(experts),
                      float(_greedy_sum(widths, sizes, k, kg, cheapest=False)))


def _greedy_sum(widths, sizes, k, kg, cheapest: bool) -> int:
    order = sorted(range(len(widths)), key=lambda g: widths[g], reverse=not cheapest)
    taken, total = 0, 0
    for g in order[:kg]:
        n = min(sizes[g], k - taken)
        total += n * widths[g]
        taken += n
        if taken == k:
            break
    return total


# ---------------------------------------------------------------------- parameter counts
@dataclass
class ParamCounts:
    """Parameters of the whole model by kind (one model replica, all pipeline stages)."""

    embedding: int = 0  # word embeddings (+ learned position embeddings)
    output_layer: int = 0  # untied output layer
    attention: int = 0  # QKV + output projections (+ biases), all layers
    norms: int = 0  # input / pre-MLP norms of every layer + final norm
    dense_ffn: int = 0  # FFNs of dense (non-MoE) layers
    routers: int = 0  # gates of the MoE layers (expert gate, group gate, noise gates)
    shared_experts: int = 0  # shared experts of the MoE layers
    routed_experts: int = 0  # routed experts of the MoE layers
    num_moe_layers: int = 0
    per_expert: list[int] = field(default_factory=list)  # one MoE layer, canonical order

    @property
    def total(self) -> int:
        return (self.embedding + self.output_layer + self.attention + self.norms
                + self.dense_ffn + self.routers + self.shared_experts + self.routed_experts)

    @property
    def non_routed(self) -> int:
        return self.total - self.routed_experts

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "per_expert"}
        d["total"] = self.total
        return d


def shared_width_of(run) -> int:
    """Width of the fused shared-expert MLP (0 without shared experts)."""
    return run_moe_transformer_fields(run.moe).get("moe_shared_expert_intermediate_size") or 0


def router_params(run) -> int:
    """Gate parameters of one MoE layer."""
    h, bias = run.model.hidden_size, run.model.add_bias_linear
    moe = run.moe
    if moe.kind == "dense":
        return 0
    if moe.kind == "stock":
        e = moe.num_experts
        n = e * h + (e if bias else 0)
        if moe.router == "noisy_topk" and moe.noisy_gating.noise:
            n += e * h
        return n
    m = moe.mohge
    e, ng = m.num_experts, m.num_groups
    n = e * h + (e if bias else 0)
    if m.router.type == "mohge":
        n += ng * h
    else:
        if m.noisy_gating.noise:
            n += e * h
        if m.router.type == "hierarchical_noisy_topk":
            n += ng * h * (2 if m.noisy_gating.noise else 1)
    return n


def analytic_param_counts(run, padded_vocab: int) -> ParamCounts:
    """Analytic parameter counts of ``run`` (a ``RunConfig``) with vocabulary ``padded_vocab``."""
    m = run.model
    h, L = m.hidden_size, m.num_layers
    bias, gated = m.add_bias_linear, m.swiglu
    heads = m.num_attention_heads
    groups = m.num_query_groups or heads
    kv_ch = h // heads
    q, kv = heads * kv_ch, groups * kv_ch
    norm = h * (2 if m.normalization == "LayerNorm" else 1)

    c = ParamCounts()
    c.embedding = padded_vocab * h
    if m.position_embedding_type == "learned_absolute":
        c.embedding += m.seq_length * h
    c.output_layer = padded_vocab * h if m.untie_embeddings_and_output_weights else 0
    attn = h * (q + 2 * kv) + q * h + (((q + 2 * kv) + h) if bias else 0)
    pattern = run.moe_layer_pattern
    c.num_moe_layers = sum(pattern)
    if run.is_hybrid:  # a hybrid layer is one half of a GPT layer: attention, MLP or MoE
        layers = run.model.hybrid_layer_pattern
        if set(layers) - set("*-E"):
            from megatron_mohge.config import ConfigError

            raise ConfigError(f"model.hybrid_layer_pattern {layers!r}: the analytic counts "
                             "cover '*', '-' and 'E' layers, not Mamba / GatedDeltaNet.")
        n_attn, n_dense, n_norms = layers.count("*"), layers.count("-"), L + 1
    else:
        n_attn, n_dense, n_norms = L, L - c.num_moe_layers, 2 * L + 1
    c.attention = n_attn * attn
    c.norms = n_norms * norm
    c.dense_ffn = n_dense * ffn_params(h, run.ffn_hidden_size, gated, bias)
    if c.num_moe_layers:
        c.per_expert = [ffn_params(h, w, gated, bias) for w in routed_expert_widths(run.moe)]
        c.routed_experts = c.num_moe_layers * sum(c.per_expert)
        shared = shared_width_of(run)
        c.shared_experts = c.num_moe_layers * (ffn_params(h, shared, gated, bias) if shared else 0)
        c.routers = c.num_moe_layers * router_params(run)
    return c


def routed_width_range(run) -> WidthRange:
    """Activated routed width per token per MoE layer (min / uniform / max)."""
    if run.moe.kind == "mohge":
        return activated_widths(run.moe.mohge)
    if run.moe.kind == "stock":
        w = run.moe.topk * run.moe.expert_hidden_size
        return WidthRange(float(w), float(w), float(w))
    return WidthRange(0.0, 0.0, 0.0)


def activated_routed_params(run, widths: WidthRange) -> dict:
    """Routed-expert parameters a token activates (all MoE layers) for each width figure."""
    h, gated, bias = run.model.hidden_size, run.model.swiglu, run.model.add_bias_linear
    k = _topk(run)
    per_width, per_expert = ffn_param_coeffs(h, gated, bias)
    n_moe = sum(run.moe_layer_pattern)
    return {name: n_moe * (per_width * w + k * per_expert)
            for name, w in widths.to_dict().items()}


def _topk(run) -> int:
    if run.moe.kind == "mohge":
        return run.moe.mohge.topk
    if run.moe.kind == "stock":
        return run.moe.topk
    return 0


# ---------------------------------------------------------------------- vocabulary
def resolve_vocab(run, override: Optional[int] = None) -> tuple[int, str]:
    """The padded vocabulary Megatron-LM would use, and where the number came from.

    Order: ``override`` (a raw tokenizer vocabulary, padded here), ``model.vocab_size``
    (taken as is), the byte tokenizer (257 ids), a local ``tokenizer.json`` (needs the
    ``tokenizers`` package). Returns ``(0, reason)`` when it cannot be known.
    """
    if override is not None:
        return run.padded_vocab_size(override), f"--vocab-size {override}, padded"
    if run.model.vocab_size is not None:
        return run.model.vocab_size, "model.vocab_size"
    tok = run.data.tokenizer
    if tok == "byte":
        return run.padded_vocab_size(257), "byte tokenizer (256 bytes + eod), padded"
    path = Path(tok).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        try:
            from megatron_mohge.data.tokenizers import HFTokenizer

            return run.padded_vocab_size(HFTokenizer(path).vocab_size), f"{path}, padded"
        except Exception as exc:  # tokenizers missing or unreadable file
            return 0, f"cannot read {path}: {exc}"
    return 0, f"tokenizer {tok!r} not found"


# ---------------------------------------------------------------------- expert memory
def expert_memory_per_rank(run, world_size: Optional[int] = None) -> dict:
    """Expert parameters and training memory held by every EP rank (busiest pipeline stage).

    Routed experts of the MoE layers of one pipeline stage, split by expert-TP; for MoHGE the
    experts of rank ``r`` come from the allocation plan. Bytes use ``BYTES_PER_PARAM`` for the
    model precision; with ``parallel.use_distributed_optimizer`` the optimizer part is divided
    by the expert-data-parallel size ``world / (PP x EP x expert-TP)`` when ``world_size`` is
    known. Activations, the shared experts and the dense part are not included.
    """
    m, p = run.model, run.parallel
    ep, etp, pp = p.expert_parallel, run.expert_tensor_parallel, p.pipeline_parallel
    h, gated, bias = m.hidden_size, m.swiglu, m.add_bias_linear
    pattern = run.moe_layer_pattern
    per_stage = len(pattern) // pp
    moe_layers = max((sum(pattern[s * per_stage:(s + 1) * per_stage]) for s in range(pp)),
                     default=0)
    widths = routed_expert_widths(run.moe)
    if not widths:
        return {"ranks": [], "moe_layers_per_stage": 0}
    if run.moe.kind == "mohge":
        plan = run.moe.mohge.allocation_plan(ep)
        rank_widths = [plan.local_widths(r) for r in range(ep)]
    else:
        n = len(widths) // ep
        rank_widths = [widths[r * n:(r + 1) * n] for r in range(ep)]

    def sharded(w: int) -> int:  # one expert's params on one expert-TP rank
        return ffn_params(h, w, gated, bias, etp)

    precision = m.precision if m.precision in BYTES_PER_PARAM else "fp32"
    b = BYTES_PER_PARAM[precision]
    expert_dp = None
    if world_size:
        expert_dp = max(1, world_size // (pp * ep * etp))
    opt_div = expert_dp if (p.use_distributed_optimizer and expert_dp) else 1
    ranks = []
    for r, ws in enumerate(rank_widths):
        params = moe_layers * sum(sharded(w) for w in ws)
        nbytes = params * (b["weight"] + b["grad"]) + params * b["optimizer"] / opt_div
        ranks.append({"rank": r, "experts": len(ws), "width_sum": sum(ws), "params": params,
                      "bytes": int(nbytes), "gib": nbytes / 2**30})
    assumption = (f"{precision}: {b['weight']} B weight + {b['grad']} B grad + {b['optimizer']} B "
                  f"optimizer state per parameter"
                  + (f", optimizer state sharded over expert-DP={opt_div}" if opt_div > 1 else "")
                  + f"; {moe_layers} MoE layers on the busiest pipeline stage, expert-TP={etp}; "
                    "activations, shared experts and dense parts excluded")
    return {"ranks": ranks, "moe_layers_per_stage": moe_layers, "expert_data_parallel": expert_dp,
            "bytes_per_param": dict(b), "assumption": assumption}
