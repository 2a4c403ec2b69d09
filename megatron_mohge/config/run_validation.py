"""Validation of a ``RunConfig``: every field checked once, each error names the field
(``train.lr``) and the fix. ``RunConfig.validate`` / ``check_world_size`` call these."""

from __future__ import annotations

from typing import TYPE_CHECKING

from megatron_mohge.config.errors import ConfigError, parse_split
from megatron_mohge.config.errors import expect_bool as _bool
from megatron_mohge.config.errors import expect_choice as _choice
from megatron_mohge.config.errors import expect_int as _int
from megatron_mohge.config.errors import expect_number as _num

if TYPE_CHECKING:
    from megatron_mohge.config.run import RunConfig

MOE_KINDS = ("mohge", "stock", "dense")  # "moe": an alias of stock (run.KIND_ALIASES)
STOCK_ROUTERS = ("topk", "noisy_topk")
PRECISIONS = ("fp32", "bf16", "fp16")
NORMS = ("RMSNorm", "LayerNorm")
POSITION_EMBEDDINGS = ("rope", "learned_absolute")
DISPATCHERS = ("auto", "alltoall", "allgather", "flex")
LR_DECAY_STYLES = ("cosine", "linear", "constant")
LAUNCH_SHAPES = ("torchrun", "srun")
MODEL_KINDS = ("gpt", "hybrid")
#: Layer symbols a run's hybrid pattern may use (Megatron's D / + need MLA settings a run file
#: does not have; '|' and '/' -- pipeline stages, MTP -- are not supported by our trainers).
HYBRID_SYMBOLS = "*E-MG"


def validate(run: RunConfig) -> None:
    """Check every field of ``run``; raise ``ConfigError`` naming the first bad one."""
    m = run.model
    if not isinstance(run.name, str) or not run.name or "/" in run.name:
        raise ConfigError(f"name: a non-empty run name without '/', got {run.name!r}")
    for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length",
                 "make_vocab_size_divisible_by", "rotary_base"):
        _int(f"model.{name}", getattr(m, name), 1)
    for name in ("num_query_groups", "ffn_hidden_size", "vocab_size"):
        if getattr(m, name) is not None:
            _int(f"model.{name}", getattr(m, name), 1)
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"model.num_attention_heads={m.num_attention_heads} must divide "
                          f"model.hidden_size={m.hidden_size}.")
    if m.num_query_groups is not None and m.num_attention_heads % m.num_query_groups:
        raise ConfigError(f"model.num_query_groups={m.num_query_groups} must divide "
                          f"model.num_attention_heads={m.num_attention_heads}.")
    _choice("model.normalization", m.normalization, NORMS)
    _choice("model.position_embedding_type", m.position_embedding_type, POSITION_EMBEDDINGS)
    _choice("model.precision", m.precision, PRECISIONS)
    for name in ("swiglu", "add_bias_linear", "untie_embeddings_and_output_weights"):
        _bool(f"model.{name}", getattr(m, name))
    for name in ("init_method_std", "hidden_dropout", "attention_dropout"):
        _num(f"model.{name}", getattr(m, name), 0.0)
    for name in ("hidden_dropout", "attention_dropout"):
        if getattr(m, name) >= 1.0:
            raise ConfigError(f"model.{name}: a probability in [0, 1), got {getattr(m, name)}")
    _model_kind(run)
    _layer_freq(run)
    _moe(run)
    _parallel(run)
    _data(run)
    _train(run)
    _int("eval.interval", run.eval.interval, 0)
    _int("eval.iters", run.eval.iters, 1)
    if run.eval.final_iters is not None:
        _int("eval.final_iters", run.eval.final_iters, 1)
    _int("checkpoint.interval", run.checkpoint.interval, 0)
    _bool("checkpoint.fully_parallel", run.checkpoint.fully_parallel)
    _bool("checkpoint.enabled", run.checkpoint.enabled)
    _int("checkpoint.keep_last", run.checkpoint.keep_last, 0)
    _bool("checkpoint.fallback", run.checkpoint.fallback)
    if run.health.loss_spike_factor is not None:
        _num("health.loss_spike_factor", run.health.loss_spike_factor, 1.0)
    _int("health.loss_spike_window", run.health.loss_spike_window, 1)
    _int("logging.interval", run.logging.interval, 1)
    _bool("logging.tensorboard", run.logging.tensorboard)
    _bool("logging.progress_bar", run.logging.progress_bar)
    _launch(run)

def _model_kind(run: RunConfig) -> None:
    m = run.model
    _choice("model.kind", m.kind, MODEL_KINDS)
    pattern = m.hybrid_layer_pattern
    if m.kind == "gpt":
        if pattern is not None:
            raise ConfigError("model.hybrid_layer_pattern: only used with model.kind: hybrid; "
                              "set model.kind: hybrid or remove the pattern.")
        return
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError("model.hybrid_layer_pattern: required with model.kind: hybrid, one "
                          "symbol per layer (* attention, E MoE, - MLP), e.g. \"*E*E\".")
    bad = sorted(set(pattern) - set(HYBRID_SYMBOLS))
    if bad:
        raise ConfigError(f"model.hybrid_layer_pattern: {''.join(bad)!r} not supported; use "
                          f"{HYBRID_SYMBOLS!r} (* attention, E MoE, - MLP, M Mamba, G "
                          "GatedDeltaNet; pipeline stages come from parallel.pipeline_parallel).")
    if m.num_layers != len(pattern):
        raise ConfigError(f"model.num_layers={m.num_layers} must equal the layers of "
                          f"model.hybrid_layer_pattern {pattern!r}; set model.num_layers: "
                          f"{len(pattern)}.")
    if m.moe_layer_freq != 1:
        raise ConfigError("model.moe_layer_freq: not used with model.kind: hybrid (the "
                          "pattern's E layers are the MoE layers); remove it.")
    if run.moe.kind == "dense" and "E" in pattern:
        raise ConfigError(f"model.hybrid_layer_pattern {pattern!r}: E layers need experts but "
                          "moe.kind is dense; use - (MLP) layers or set moe.kind.")
    if run.moe.kind != "dense" and "E" not in pattern:
        raise ConfigError(f"model.hybrid_layer_pattern {pattern!r}: no E (MoE) layer; add one "
                          "or use moe.kind: dense.")


def _layer_freq(run: RunConfig) -> None:
    if run.model.kind == "hybrid":
        return  # the pattern places the MoE layers (_model_kind)
    freq, n = run.model.moe_layer_freq, run.model.num_layers
    if isinstance(freq, bool) or not isinstance(freq, (int, list)):
        raise ConfigError(f"model.moe_layer_freq: an int (every k-th layer) or a 0/1 list per "
                          f"layer, got {freq!r}")
    if isinstance(freq, int):
        _int("model.moe_layer_freq", freq, 1)
    else:
        if len(freq) != n or any(v not in (0, 1) or isinstance(v, bool) for v in freq):
            raise ConfigError(f"model.moe_layer_freq: a list needs one 0/1 entry per layer "
                              f"({n}), got {freq!r}")
        if run.moe.kind != "dense" and not any(freq):
            raise ConfigError("model.moe_layer_freq: no MoE layer; use moe.kind: dense for a "
                              "dense model.")

def _moe(run: RunConfig) -> None:
    moe = run.moe
    _choice("moe.kind", moe.kind, MOE_KINDS)
    _choice("moe.router", moe.router, STOCK_ROUTERS)
    _choice("moe.token_dispatcher", moe.token_dispatcher, DISPATCHERS)
    if moe.use_te is not None:
        _bool("moe.use_te", moe.use_te)
    if moe.kind == "mohge" and moe.mohge is None:
        raise ConfigError("moe.mohge: required when moe.kind is mohge (the MoHGE layer: widths, "
                          "experts_per_group, group_topk, topk; or a path to its YAML file).")
    if moe.kind == "mohge" and moe.use_te is False and moe.mohge.expert_backend == "te":
        raise ConfigError("moe.mohge.expert_backend: te needs Transformer Engine layers but "
                          "moe.use_te is false; use expert_backend torch or local, or drop "
                          "use_te.")
    if moe.kind == "stock":
        _int("moe.num_experts", moe.num_experts, 1)
        _int("moe.expert_hidden_size", moe.expert_hidden_size, 1)
        _int("moe.topk", moe.topk, 1)
        _int("moe.num_shared_experts", moe.num_shared_experts, 0)
        if moe.topk > moe.num_experts:
            raise ConfigError(f"moe.topk={moe.topk} exceeds moe.num_experts={moe.num_experts}.")
        if moe.num_shared_experts and moe.shared_expert_width is None:
            raise ConfigError("moe.shared_expert_width: required when "
                              "moe.num_shared_experts > 0.")
        if moe.shared_expert_width is not None:
            _int("moe.shared_expert_width", moe.shared_expert_width, 1)
        _num("moe.aux_loss_coeff", moe.aux_loss_coeff, 0.0)
    if moe.z_loss_coeff is not None:
        _num("moe.z_loss_coeff", moe.z_loss_coeff, 0.0)
    shared = (moe.num_shared_experts if moe.kind == "stock" else
              moe.mohge.num_shared_experts if moe.kind == "mohge" else 0)
    if shared and run.model.add_bias_linear:
        raise ConfigError("model.add_bias_linear: Megatron's SharedExpertMLP has no bias "
                          "support; set it to false or remove the shared experts.")

def _parallel(run: RunConfig) -> None:
    p, m, moe = run.parallel, run.model, run.moe
    for name in ("tensor_parallel", "pipeline_parallel", "expert_parallel"):
        _int(f"parallel.{name}", getattr(p, name), 1)
    if p.expert_tensor_parallel is not None:
        _int("parallel.expert_tensor_parallel", p.expert_tensor_parallel, 1)
    if p.sequence_parallel is not None:
        _bool("parallel.sequence_parallel", p.sequence_parallel)
    _bool("parallel.use_distributed_optimizer", p.use_distributed_optimizer)
    _num("parallel.collective_timeout_s", p.collective_timeout_s, 1.0)
    tp = p.tensor_parallel
    if m.num_attention_heads % tp:
        raise ConfigError(f"parallel.tensor_parallel={tp} must divide "
                          f"model.num_attention_heads={m.num_attention_heads}.")
    if m.num_query_groups is not None and m.num_query_groups % tp:
        raise ConfigError(f"parallel.tensor_parallel={tp} must divide "
                          f"model.num_query_groups={m.num_query_groups}.")
    if run.ffn_hidden_size % tp:
        raise ConfigError(f"parallel.tensor_parallel={tp} must divide the dense FFN width "
                          f"{run.ffn_hidden_size} (model.ffn_hidden_size).")
    if tp > 1 and moe.kind != "dense" and p.sequence_parallel is False:
        raise ConfigError("parallel.sequence_parallel: Megatron requires sequence parallelism "
                          "for MoE training with tensor_parallel > 1; set it to true or null.")
    if m.num_layers % p.pipeline_parallel:
        raise ConfigError(f"parallel.pipeline_parallel={p.pipeline_parallel} must divide "
                          f"model.num_layers={m.num_layers}.")
    ep, etp = p.expert_parallel, run.expert_tensor_parallel
    if moe.kind == "dense" and ep > 1:
        raise ConfigError("parallel.expert_parallel: a dense model has no experts; set it to 1.")
    if moe.kind == "stock":
        if moe.num_experts % ep:
            raise ConfigError(f"parallel.expert_parallel={ep} must divide "
                              f"moe.num_experts={moe.num_experts}.")
        if moe.expert_hidden_size % etp:
            raise ConfigError(f"parallel.expert_tensor_parallel={etp} must divide "
                              f"moe.expert_hidden_size={moe.expert_hidden_size}.")
    if moe.kind == "mohge":
        try:
            moe.mohge.check_parallel_layout(ep, etp, fp8=False)
        except ConfigError as exc:
            raise ConfigError(f"moe.mohge / parallel: {exc}") from exc

def _data(run: RunConfig) -> None:
    d = run.data
    if isinstance(d.path, str):
        d.path = [d.path]
    if not isinstance(d.path, list) or not all(isinstance(x, str) and x for x in d.path):
        raise ConfigError(f"data.path: a list of dataset prefixes (or one), got {d.path!r}")
    if not isinstance(d.tokenizer, str) or not d.tokenizer:
        raise ConfigError(f"data.tokenizer: 'byte' or a tokenizer.json path, got {d.tokenizer!r}")
    parse_split(d.split, "data.split")
    _int("data.default_corpus_bytes", d.default_corpus_bytes, 10_000)
    if d.valid_seed is not None:
        _int("data.valid_seed", d.valid_seed, 0)

def _train(run: RunConfig) -> None:
    t = run.train
    for name in ("iters", "micro_batch_size", "global_batch_size"):
        _int(f"train.{name}", getattr(t, name), 1)
    _int("train.lr_warmup_iters", t.lr_warmup_iters, 0)
    _int("train.seed", t.seed, 0)
    if t.lr_decay_iters is not None:
        _int("train.lr_decay_iters", t.lr_decay_iters, 1)
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} must be a multiple of "
                          f"train.micro_batch_size={t.micro_batch_size}.")
    for name in ("lr", "min_lr", "weight_decay", "adam_eps", "clip_grad"):
        _num(f"train.{name}", getattr(t, name), 0.0)
    if t.lr <= 0:
        raise ConfigError(f"train.lr: must be > 0, got {t.lr}")
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr={t.min_lr} exceeds train.lr={t.lr}.")
    for name in ("adam_beta1", "adam_beta2"):
        v = getattr(t, name)
        _num(f"train.{name}", v, 0.0)
        if v >= 1.0:
            raise ConfigError(f"train.{name}: must be in [0, 1), got {v}")
    _choice("train.lr_decay_style", t.lr_decay_style, LR_DECAY_STYLES)
    decay = t.lr_decay_iters or t.iters
    if t.lr_warmup_iters >= decay and t.lr_decay_style != "constant":
        raise ConfigError(f"train.lr_warmup_iters={t.lr_warmup_iters} must be below the decay "
                          f"length {decay} (train.lr_decay_iters or train.iters).")

def _launch(run: RunConfig) -> None:
    la = run.launch
    _int("launch.nodes", la.nodes, 1)
    _int("launch.gpus_per_node", la.gpus_per_node, 1)
    _choice("launch.shape", la.shape, LAUNCH_SHAPES)
    for name in ("container_mounts", "extra_args"):
        v = getattr(la, name)
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ConfigError(f"launch.{name}: a list of strings, got {v!r}")
    if not isinstance(la.env, dict):
        raise ConfigError(f"launch.env: a mapping NAME: value, got {la.env!r}")
    la.env = {str(k): str(v) for k, v in la.env.items()}

def check_world_size(run: RunConfig, world_size: int) -> int:
    """Check the layout against ``world_size`` ranks; return the data-parallel size."""
    p, t = run.parallel, run.train
    mp = p.tensor_parallel * p.pipeline_parallel
    if world_size % mp:
        raise ConfigError(f"parallel: tensor_parallel x pipeline_parallel = {mp} does not "
                          f"divide the world size {world_size} (ranks launched).")
    dp = world_size // mp
    expert_dp_world = dp * p.tensor_parallel
    if expert_dp_world % (p.expert_parallel * run.expert_tensor_parallel):
        raise ConfigError(
            f"parallel.expert_parallel={p.expert_parallel} x expert_tensor_parallel="
            f"{run.expert_tensor_parallel} must divide data_parallel x tensor_parallel = "
            f"{expert_dp_world} at world size {world_size}.")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} must be a multiple of "
            f"micro_batch_size x data_parallel = {t.micro_batch_size} x {dp} at world size "
            f"{world_size}.")
    return dp
