"""MoHGE causal LM for Hugging Face ``transformers`` (exported by ``mohge-export-hf``).

Self-contained: imports only ``torch`` and ``transformers``, no Megatron and no Transformer
Engine, runs on a CPU. It computes what megatron-mohge's Megatron model computed in training:

* backbone: Megatron's GPT (pre-norm RMSNorm/LayerNorm, fused-QKV attention with GQA split
  into q/k/v, RoPE with rotate-half or learned absolute positions, gated SiLU or GELU MLPs,
  optional linear biases, tied or untied output layer, the padded vocabulary as trained);
* MoE layers: routed experts in width groups, one expert block per group (3-D weights
  ``[N_g, ...]``: every expert of a group has one width), the two-level router of
  ``megatron_mohge.routing.functional.two_level_route`` (formulas in :func:`route`) and
  optional shared experts added to the routed output.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_mohge import MohgeConfig

# transformers 5.x names the KV cache ``cache``; 4.x called it ``past_key_values``
_CACHE_FIELD = ("cache" if "cache" in getattr(CausalLMOutputWithPast, "__dataclass_fields__", {})
                else "past_key_values")


def _act(name):
    return F.silu if name == "silu" else F.gelu


def _norm(config):
    cls = nn.RMSNorm if config.normalization == "RMSNorm" else nn.LayerNorm
    return cls(config.hidden_size, eps=config.norm_eps)


class MohgeMLP(nn.Module):
    """Megatron's MLP: fc1 -> (gated) activation -> fc2; a gated fc1 stacks [gate; linear]."""

    def __init__(self, config, width):
        super().__init__()
        self.gated = config.gated_mlp
        self.act = _act(config.hidden_act)
        self.fc1 = nn.Linear(config.hidden_size, width * (2 if self.gated else 1),
                             bias=config.add_bias_linear)
        self.fc2 = nn.Linear(width, config.hidden_size, bias=config.add_bias_linear)

    def forward(self, x):
        h = self.fc1(x)
        if self.gated:
            g, lin = h.chunk(2, dim=-1)
            h = self.act(g) * lin
        else:
            h = self.act(h)
        return self.fc2(h)


class MohgeExpertGroup(nn.Module):
    """The ``n`` routed experts of one width group as 3-D weights: ``fc1_weight [n, 2W|W, d]``,
    ``fc2_weight [n, d, W]`` (+ biases ``[n, 2W|W]``, ``[n, d]``)."""

    def __init__(self, config, n, width):
        super().__init__()
        self.gated = config.gated_mlp
        self.act = _act(config.hidden_act)
        d, w1 = config.hidden_size, width * (2 if config.gated_mlp else 1)
        self.fc1_weight = nn.Parameter(torch.empty(n, w1, d))
        self.fc2_weight = nn.Parameter(torch.empty(n, d, width))
        if config.add_bias_linear:
            self.fc1_bias = nn.Parameter(torch.zeros(n, w1))
            self.fc2_bias = nn.Parameter(torch.zeros(n, d))
        else:
            self.fc1_bias = self.fc2_bias = None

    def expert(self, i, x):
        h = F.linear(x, self.fc1_weight[i], None if self.fc1_bias is None else self.fc1_bias[i])
        if self.gated:
            g, lin = h.chunk(2, dim=-1)
            h = self.act(g) * lin
        else:
            h = self.act(h)
        return F.linear(h, self.fc2_weight[i], None if self.fc2_bias is None else self.fc2_bias[i])


def route(u_TG, z_TE, group_of_E, group_sizes, opts, selection_bias_E=None):
    """Two-level routing -> (weights [T, K], canonical expert ids [T, K]).

    1. ``s = sigmoid(u)`` or ``softmax(u)``; the Kg groups ``S`` of largest ``u``.
    2. ``pi = softmax(z)`` inside each group.
    3. ``log q = log s_g + log pi - logsumexp`` over experts of groups in ``S`` (-inf
       elsewhere); with Kg=1, ``log q = log pi`` inside the one group (``s_g`` cancels).
    4. top-K experts of ``q`` -- or, with the loss-free bias ``b``, of
       ``log s_g + log softmax_g(z + b)`` (selection only; weights stay from ``q``).
    5. weights: renorm ``q_c / sum q_c``; paper ``softmax(q_c)``; K=1 (both) ``q_c``;
       softmax_topk (Megatron's stock router, one group) ``softmax(z_c)``.
    """
    neg_inf = float("-inf")
    k = opts["topk"]
    if opts["expert_weighting"] == "softmax_topk":  # stock TopKRouter: top-k of z, softmax
        z_c, idx = torch.topk(z_TE, k=k, dim=-1)
        return torch.softmax(z_c, dim=-1), idx

    def seg_log_softmax(x_TE):
        out = torch.empty_like(x_TE)
        start = 0
        for n in group_sizes:
            out[:, start:start + n] = torch.log_softmax(x_TE[:, start:start + n], dim=-1)
            start += n
        return out

    if opts["group_score"] == "sigmoid":
        log_s_TG = F.logsigmoid(u_TG)
    else:
        log_s_TG = torch.log_softmax(u_TG, dim=-1)
    kg = opts["group_topk"]
    _, gidx = torch.topk(u_TG, k=kg, dim=-1)
    group_mask_TG = torch.zeros_like(u_TG, dtype=torch.bool).scatter(1, gidx, True)
    log_pi_TE = seg_log_softmax(z_TE)
    masked_log_s_TE = log_s_TG.masked_fill(~group_mask_TG, neg_inf)[:, group_of_E]
    if kg == 1:
        log_q_TE = log_pi_TE.masked_fill(~group_mask_TG[:, group_of_E], neg_inf)
    else:
        log_q_TE = masked_log_s_TE + log_pi_TE
        log_q_TE = log_q_TE - torch.logsumexp(log_q_TE, dim=-1, keepdim=True)
    if selection_bias_E is None:
        select_TE = log_q_TE
    else:
        select_TE = masked_log_s_TE + seg_log_softmax(z_TE + selection_bias_E.to(z_TE.dtype))
    _, idx = torch.topk(select_TE, k=k, dim=-1)
    log_q_c = log_q_TE.gather(1, idx)
    if k == 1:
        w = log_q_c.exp()
    elif opts["expert_weighting"] == "renorm":
        w = torch.softmax(log_q_c, dim=-1)
    else:  # paper
        w = torch.softmax(log_q_c.exp(), dim=-1)
    return w, idx


class MohgeSparseMoe(nn.Module):
    """Router + one expert block per width group + optional shared experts."""

    def __init__(self, config):
        super().__init__()
        self.opts = dict(config.router)
        self.group_sizes = list(config.experts_per_group)
        num_experts, d = sum(self.group_sizes), config.hidden_size
        self.gate = nn.Linear(d, num_experts, bias=self.opts["gate_bias"])
        if self.opts["group_gate"]:
            self.group_gate = nn.Linear(d, len(self.group_sizes), bias=False)
        if self.opts["selection_bias"]:
            self.register_buffer("selection_bias", torch.zeros(num_experts, dtype=torch.float32))
        self.groups = nn.ModuleList(MohgeExpertGroup(config, n, w) for n, w in
                                    zip(self.group_sizes, config.expert_group_widths))
        self.shared_experts = (MohgeMLP(config, config.shared_expert_intermediate_size)
                               if config.num_shared_experts else None)

    def forward(self, hidden):
        shape = hidden.shape
        x = hidden.reshape(-1, shape[-1])
        xf = x.float()  # the router runs in fp32 (Megatron's moe_router_dtype='fp32')
        z = F.linear(xf, self.gate.weight.float(),
                     None if self.gate.bias is None else self.gate.bias.float())
        u = (F.linear(xf, self.group_gate.weight.float()) if self.opts["group_gate"]
             else z.new_zeros(z.shape[0], 1))
        bias = self.selection_bias if self.opts["selection_bias"] else None
        # built here, not a buffer: transformers materialises non-persistent buffers empty
        group_of = torch.repeat_interleave(torch.arange(len(self.group_sizes), device=z.device),
                                           torch.tensor(self.group_sizes, device=z.device))
        w, idx = route(u, z, group_of, self.group_sizes, self.opts, bias)
        out = torch.zeros_like(x)
        start = 0
        for block, n in zip(self.groups, self.group_sizes):
            for i in range(n):
                tok, slot = torch.nonzero(idx == start + i, as_tuple=True)
                if tok.numel():
                    y = block.expert(i, x[tok]) * w[tok, slot].unsqueeze(-1).to(x.dtype)
                    out.index_add_(0, tok, y)
            start += n
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out.reshape(shape)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class MohgeAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        d, bias = config.hidden_size, config.add_bias_linear
        self.q_proj = nn.Linear(d, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, d, bias=bias)

    def forward(self, x, rope, mask, cache):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        rep = self.heads // self.kv_heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)).float() / math.sqrt(self.head_dim)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)  # no NaN rows
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, -1)
        return self.o_proj(out)


class MohgeDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = _norm(config)
        self.self_attn = MohgeAttention(config, layer_idx)
        self.post_attention_layernorm = _norm(config)
        self.mlp = (MohgeSparseMoe(config) if config.mlp_layer_types[layer_idx] == "moe"
                    else MohgeMLP(config, config.intermediate_size))

    def forward(self, x, rope, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class MohgePreTrainedModel(PreTrainedModel):
    config_class = MohgeConfig
    base_model_prefix = "model"
    _no_split_modules = ["MohgeDecoderLayer"]

    def _init_weights(self, module):
        std = 0.02
        if isinstance(module, nn.Linear):
            module.weight.data.normal_(0.0, std)
            if module.bias is not None:
                module.bias.data.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.data.normal_(0.0, std)
        elif isinstance(module, MohgeExpertGroup):
            module.fc1_weight.data.normal_(0.0, std)
            module.fc2_weight.data.normal_(0.0, std)


class MohgeModel(MohgePreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        if config.position_embedding_type == "learned_absolute":
            self.embed_positions = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.layers = nn.ModuleList(MohgeDecoderLayer(config, i)
                                    for i in range(config.num_hidden_layers))
        self.norm = _norm(config)
        self.post_init()

    def _rope(self, position_ids, dtype):
        dim = self.config.head_dim
        inv_freq = 1.0 / (self.config.rope_theta ** (
            torch.arange(0, dim, 2, dtype=torch.float32, device=position_ids.device) / dim))
        freqs = position_ids.float().unsqueeze(-1) * inv_freq  # [b, s, dim/2]
        emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(1)  # [b, 1, s, dim]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, use_cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, s = x.shape[:2]
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=x.device).unsqueeze(0).expand(b, s)
        rope = None
        if self.config.position_embedding_type == "learned_absolute":
            x = x + self.embed_positions(position_ids)
        else:
            rope = self._rope(position_ids, x.dtype)
        # [b, 1, s, past+s]: causal, and keys the 2-D attention mask keeps
        q_pos = torch.arange(past, past + s, device=x.device)
        k_pos = torch.arange(past + s, device=x.device)
        mask = (k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)).view(1, 1, s, past + s)
        if attention_mask is not None and attention_mask.dim() == 2:
            mask = mask & attention_mask[:, -(past + s):].bool().view(b, 1, 1, past + s)
        for layer in self.layers:
            x = layer(x, rope, mask, cache)
        return self.norm(x), cache


class MohgeForCausalLM(MohgePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = MohgeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0,
                past_key_values=None, **kwargs):
        hidden, cache = self.model(input_ids, attention_mask, position_ids,
                                   cache if cache is not None else past_key_values,
                                   inputs_embeds, use_cache)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:  # next-token loss, labels aligned with input_ids (as HF)
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
