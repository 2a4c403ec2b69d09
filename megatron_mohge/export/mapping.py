"""A run's model + its checkpoint tensors -> the exported ``config.json`` and state dict.

The run file decides what the modeling code must compute; every option that changes the
forward pass must be one :data:`SUPPORTED` knows, with a value it implements: anything else
(a newer option, ``router.type: noisy_topk``...) is refused with a one-line ``ConfigError``
naming the field, so an export never silently computes something else. Fields listed as
training-only (losses, dropout, allocation, dispatcher...) do not change inference.

Every checkpoint tensor must be consumed by the name map; a leftover (an unknown module,
``expert_bias`` of Megatron's own loss-free balancing...) is refused too.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from megatron_mohge.config import ConfigError
from megatron_mohge.config.megatron import shared_intermediate_size

ANY = object()  # any value: the field does not change the forward pass (or is read below)

#: run-file section -> {field: allowed values or ANY}
SUPPORTED: dict[str, dict[str, Any]] = {
    "model": {
        "num_layers": ANY, "hidden_size": ANY, "num_attention_heads": ANY,
        "num_query_groups": ANY, "ffn_hidden_size": ANY, "seq_length": ANY,
        "vocab_size": ANY, "make_vocab_size_divisible_by": ANY,
        "normalization": ("RMSNorm", "LayerNorm"), "swiglu": ANY, "add_bias_linear": ANY,
        "untie_embeddings_and_output_weights": ANY,
        "position_embedding_type": ("rope", "learned_absolute"), "rotary_base": ANY,
        "init_method_std": ANY, "hidden_dropout": ANY, "attention_dropout": ANY,
        "precision": ANY, "moe_layer_freq": ANY,
        "kind": ("gpt",), "hybrid_layer_pattern": (None,),  # HybridModel: not exported yet
    },
    "moe": {
        "kind": ("mohge", "stock", "dense"), "mohge": ANY, "num_experts": ANY,
        "expert_hidden_size": ANY, "topk": ANY, "num_shared_experts": ANY,
        "shared_expert_width": ANY, "router": ("topk",), "aux_loss_coeff": ANY,
        "z_loss_coeff": ANY, "noisy_gating": ANY, "token_dispatcher": ANY, "use_te": ANY,
    },
    "moe.mohge": {
        "widths": ANY, "experts_per_group": ANY, "group_topk": ANY, "topk": ANY,
        "num_shared_experts": ANY, "shared_expert_width": ANY, "router": ANY, "losses": ANY,
        "allocation": ANY, "noisy_gating": ANY, "expert_backend": ANY,
    },
    "moe.mohge.router": {
        "type": ("mohge",), "group_score": ("sigmoid", "softmax"),
        "expert_weighting": ("renorm", "paper"),
        "fp32": (True,),  # the exported router runs in fp32
        "z_loss_coeff": ANY, "input_jitter_eps": ANY,  # training only
        "group_gradient": ANY,  # backward only: the straight-through factor is 1 in value
    },
    "moe.mohge.losses": {  # training only; the loss-free bias is read from the checkpoint
        "group_coeff": ANY, "group_cost_delta": ANY, "group_start_fraction": ANY,
        "intra_group_coeff": ANY, "intra_group_mode": ANY, "expert_bias_update_rate": ANY,
        "global_batch_stats": ANY, "group_loss_count": ANY, "group_balance_coeff": ANY,
    },
}


def _as_dict(obj) -> dict:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj or {})


def check_supported(run) -> None:
    """``ConfigError`` naming the first run-file field the modeling code does not implement."""
    sections = {"model": _as_dict(run.model), "moe": _as_dict(run.moe)}
    if run.moe.kind == "mohge":
        mohge = _as_dict(run.moe.mohge)
        sections.update({"moe.mohge": mohge, "moe.mohge.router": mohge["router"],
                         "moe.mohge.losses": mohge["losses"]})
    for section, values in sections.items():
        allowed = SUPPORTED[section]
        for name, value in values.items():
            if section == "moe" and name == "router" and run.moe.kind != "stock":
                continue
            if name not in allowed:
                raise ConfigError(f"{section}.{name}: the Hugging Face export does not implement "
                                  "this option (exporting would compute something else)")
            if allowed[name] is not ANY and value not in allowed[name]:
                raise ConfigError(f"{section}.{name}={value!r}: the Hugging Face export "
                                  f"implements only {list(allowed[name])}")


def hf_config(run, vocab_size: int, tokenizer_ids: dict) -> dict:
    """The ``config.json`` fields of the exported model (see configuration_mohge.py)."""
    m, moe = run.model, run.moe
    cfg = dict(
        vocab_size=vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups or m.num_attention_heads,
        head_dim=m.hidden_size // m.num_attention_heads,
        intermediate_size=run.ffn_hidden_size, hidden_act="silu" if m.swiglu else "gelu",
        gated_mlp=bool(m.swiglu), add_bias_linear=bool(m.add_bias_linear),
        normalization=m.normalization, norm_eps=1e-5,  # Megatron's layernorm_epsilon default
        position_embedding_type=m.position_embedding_type, rope_theta=float(m.rotary_base),
        max_position_embeddings=m.seq_length,
        tie_word_embeddings=not m.untie_embeddings_and_output_weights,
        mlp_layer_types=["moe" if p else "dense" for p in run.moe_layer_pattern],
        torch_dtype={"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[m.precision],
        **tokenizer_ids,
    )
    if moe.kind == "mohge":
        c = moe.mohge
        cfg.update(expert_group_widths=list(c.widths), experts_per_group=list(c.experts_per_group),
                   num_shared_experts=c.num_shared_experts,
                   shared_expert_intermediate_size=shared_intermediate_size(
                       c.num_shared_experts, c.shared_expert_width),
                   router=dict(group_score=c.router.group_score,
                               expert_weighting=c.router.expert_weighting,
                               group_topk=c.group_topk, topk=c.topk, group_gate=True,
                               gate_bias=bool(m.add_bias_linear),
                               selection_bias=c.losses.expert_bias_update_rate > 0))
    elif moe.kind == "stock":
        cfg.update(expert_group_widths=[moe.expert_hidden_size],
                   experts_per_group=[moe.num_experts],
                   num_shared_experts=moe.num_shared_experts,
                   shared_expert_intermediate_size=shared_intermediate_size(
                       moe.num_shared_experts, moe.shared_expert_width),
                   # Megatron's TopKRouter: softmax over the top-k logits (not pre-softmax)
                   router=dict(group_score="softmax", expert_weighting="softmax_topk",
                               group_topk=1, topk=moe.topk, group_gate=False,
                               gate_bias=bool(m.add_bias_linear), selection_bias=False))
    return cfg


def _linear(out: dict, dst: str, layer: dict, src: str) -> None:
    """``src.weight`` / ``src.bias`` of ``layer`` -> ``dst.weight`` / ``dst.bias``."""
    for p in ("weight", "bias"):
        if f"{src}.{p}" in layer:
            out[f"{dst}.{p}"] = layer.pop(f"{src}.{p}")


def _norm(out: dict, dst: str, layer: dict, src: str) -> None:
    for p in ("weight", "bias"):
        if f"{src}{p}" in layer:
            out[f"{dst}.{p}"] = layer.pop(f"{src}{p}")


def _split_qkv(w: torch.Tensor, heads: int, groups: int, head_dim: int):
    """Megatron's fused QKV rows, per query group ``[q (heads/groups heads), k, v]`` -> q, k, v."""
    per = heads // groups
    w = w.reshape(groups, (per + 2) * head_dim, *w.shape[1:])
    q, k, v = torch.split(w, [per * head_dim, head_dim, head_dim], dim=1)
    return (q.reshape(-1, *w.shape[2:]), k.reshape(-1, *w.shape[2:]),
            v.reshape(-1, *w.shape[2:]))


def hf_state_dict(cfg: dict, glob: dict, layers: dict, where: str) -> dict:
    """Checkpoint tensors (:func:`reader.read_layers`) -> the exported state dict; every
    tensor must be used (``where``: the checkpoint, for the error)."""
    glob, out = dict(glob), {}
    out["model.embed_tokens.weight"] = glob.pop("embedding.word_embeddings.weight")
    if "embedding.position_embeddings.weight" in glob:
        out["model.embed_positions.weight"] = glob.pop("embedding.position_embeddings.weight")
    _norm(out, "model.norm", glob, "decoder.final_layernorm.")
    if "output_layer.weight" in glob:
        w = glob.pop("output_layer.weight")
        if not cfg["tie_word_embeddings"]:
            out["lm_head.weight"] = w
    heads, groups, hd = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    for i, src in layers.items():
        layer, pre = dict(src), f"model.layers.{i}."
        _norm(out, pre + "input_layernorm", layer, "self_attention.linear_qkv.layer_norm_")
        _norm(out, pre + "post_attention_layernorm", layer, "mlp.linear_fc1.layer_norm_")
        for p in ("weight", "bias"):
            key = f"self_attention.linear_qkv.{p}"
            if key in layer:
                for name, t in zip("qkv", _split_qkv(layer.pop(key), heads, groups, hd)):
                    out[f"{pre}self_attn.{name}_proj.{p}"] = t
        _linear(out, pre + "self_attn.o_proj", layer, "self_attention.linear_proj")
        if cfg["mlp_layer_types"][i] == "dense":
            _linear(out, pre + "mlp.fc1", layer, "mlp.linear_fc1")
            _linear(out, pre + "mlp.fc2", layer, "mlp.linear_fc2")
        else:
            _moe_layer(out, pre + "mlp.", layer, cfg, i, where)
        for key in layer:
            raise ConfigError(f"{where}: layer {i} tensor {key} has no place in the exported "
                              "model (an option the export does not implement)")
    for key in glob:
        raise ConfigError(f"{where}: tensor {key} has no place in the exported model")
    for key, t in out.items():
        if t.is_floating_point() and torch.isnan(t).any():
            raise ConfigError(f"{where}: {key} is incomplete in the checkpoint (missing chunks)")
    return {k: v.contiguous() for k, v in out.items()}


def _moe_layer(out: dict, pre: str, layer: dict, cfg: dict, i: int, where: str) -> None:
    r = cfg["router"]
    if "mlp.router.weight" not in layer:
        raise ConfigError(f"{where}: layer {i} is a MoE layer in the run file but has no "
                          "router weights in the checkpoint (model.moe_layer_freq differs?)")
    _linear(out, pre + "gate", layer, "mlp.router")
    if r["group_gate"]:
        out[pre + "group_gate.weight"] = layer.pop("mlp.router.group_weight")
    if r["selection_bias"]:
        out[pre + "selection_bias"] = layer.pop("mlp.router.balance_bias_E").float()
    stock = not r["group_gate"]
    for g in range(len(cfg["experts_per_group"])):
        src = "mlp.experts.experts." if stock else f"mlp.experts.group_{g}."
        for lin, name in (("linear_fc1", "fc1"), ("linear_fc2", "fc2")):
            for p in ("weight", "bias"):
                if f"{src}{lin}.{p}" in layer:
                    out[f"{pre}groups.{g}.{name}_{p}"] = layer.pop(f"{src}{lin}.{p}")
    if cfg["num_shared_experts"]:
        _linear(out, pre + "shared_experts.fc1", layer, "mlp.shared_experts.linear_fc1")
        _linear(out, pre + "shared_experts.fc2", layer, "mlp.shared_experts.linear_fc2")
