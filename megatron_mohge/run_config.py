"""Run configuration: one YAML file describes a training run end to end.

``RunConfig`` nests the GPT backbone (``model``), the MoE variant (``moe``: MoHGE, stock
Megatron MoE or dense), the parallel layout, data, optimizer/schedule, evaluation,
checkpointing, logging and -- for Megatron-LM on Slurm -- the ``launch`` section. The same
file drives ``mohge-train`` (megatron.core alone), ``mohge-check-config`` and the Slurm
launchers (translated to Megatron-LM flags). Validated once, here; every error names the
field (``train.lr``) and the fix. ``apply_overrides`` takes ``key.sub=value`` strings from a
command line.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from megatron_mohge.config import (
    ConfigError,
    MoHGEConfig,
    NoisyGatingConfig,
    YamlDataclass,
    load_yaml,
    parse_split,
    read_yaml_file,
)
from megatron_mohge.config import expect_bool as _bool
from megatron_mohge.config import expect_choice as _choice
from megatron_mohge.config import expect_int as _int
from megatron_mohge.config import expect_number as _num

MOE_KINDS = ("mohge", "moe", "dense")
STOCK_ROUTERS = ("topk", "noisy_topk")
PRECISIONS = ("fp32", "bf16", "fp16")
NORMS = ("RMSNorm", "LayerNorm")
POSITION_EMBEDDINGS = ("rope", "learned_absolute")
DISPATCHERS = ("auto", "alltoall", "allgather", "flex")
LR_DECAY_STYLES = ("cosine", "linear", "constant")
LAUNCH_SHAPES = ("torchrun", "srun")


@dataclass
class ModelConfig:
    """GPT backbone (Megatron ``TransformerConfig`` / ``GPTModel`` arguments)."""

    num_layers: int = 4  # transformer layers
    hidden_size: int = 64  # model width
    num_attention_heads: int = 4  # attention heads (must divide hidden_size)
    num_query_groups: Optional[int] = None  # GQA key/value groups; None = multi-head attention
    ffn_hidden_size: Optional[int] = None  # FFN width of dense layers; None = 4 * hidden_size
    seq_length: int = 64  # training sequence length (tokens)
    vocab_size: Optional[int] = None  # None: the tokenizer's, padded as below
    make_vocab_size_divisible_by: int = 128  # Megatron pads the vocab to a multiple of this * TP
    normalization: str = "RMSNorm"  # RMSNorm | LayerNorm
    swiglu: bool = True  # gated SiLU FFNs (dense, experts, shared experts)
    add_bias_linear: bool = False  # biases in linear layers (Megatron's default is True)
    untie_embeddings_and_output_weights: bool = False  # separate output layer
    position_embedding_type: str = "rope"  # rope | learned_absolute
    rotary_base: int = 10000  # RoPE base
    init_method_std: float = 0.02  # std of the normal weight init
    hidden_dropout: float = 0.0  # dropout after attention / FFN
    attention_dropout: float = 0.0  # dropout on attention probabilities
    precision: str = "fp32"  # fp32 | bf16 | fp16 (CPU runs: fp32)
    moe_layer_freq: Union[int, list[int]] = 1  # 1: every layer MoE; k: every k-th; or 0/1 per layer


@dataclass
class MoEConfig:
    """Which FFN the MoE layers use. ``kind: mohge`` needs ``mohge``; ``kind: moe`` is
    Megatron's stock ``MoELayer`` with uniform experts (the fields below)."""

    kind: str = "moe"  # mohge | moe (stock Megatron MoE) | dense (no experts)
    mohge: Optional[MoHGEConfig] = None  # kind=mohge: the MoHGE layer (mapping or YAML path)
    num_experts: int = 16  # kind=moe: routed experts per layer
    expert_hidden_size: int = 64  # kind=moe: FFN width of every routed expert
    topk: int = 2  # kind=moe: experts per token
    num_shared_experts: int = 0  # kind=moe: always-active shared experts
    shared_expert_hidden_size: Optional[int] = None  # kind=moe: width of each shared expert
    router: str = "topk"  # kind=moe: topk (Megatron TopKRouter) | noisy_topk (Shazeer 2017)
    aux_loss_coeff: float = 1e-2  # kind=moe, router=topk: Megatron's load-balancing loss
    z_loss_coeff: Optional[float] = None  # kind=moe: router z-loss; None disables
    noisy_gating: NoisyGatingConfig = field(default_factory=NoisyGatingConfig)  # router=noisy_topk
    token_dispatcher: str = "auto"  # auto (alltoall if EP>1 else allgather) | alltoall | allgather | flex
    use_te: Optional[bool] = None  # Transformer Engine layers; None = when usable (GPU + TE)
    # (MoHGE expert GEMMs: moe.mohge.expert_backend, local | torch | te | auto)


@dataclass
class ParallelConfig:
    """Megatron parallel layout; data parallel = world / (tensor * pipeline)."""

    tensor_parallel: int = 1  # TP size
    pipeline_parallel: int = 1  # PP size
    expert_parallel: int = 1  # EP size (carved out of DP x TP, as in Megatron)
    expert_tensor_parallel: Optional[int] = None  # expert-TP size; None = tensor_parallel
    sequence_parallel: Optional[bool] = None  # None: on when TP > 1 (Megatron needs it for MoE)
    use_distributed_optimizer: bool = False  # shard optimizer state over DP (ZeRO-1)
    # A collective (or barrier) waiting longer than this fails the job, naming the stalled
    # rank; Megatron-LM's --distributed-timeout-minutes default (10 min). Cover the slowest
    # checkpoint save: ranks wait for each other at its barriers.
    collective_timeout_s: float = 600.0


@dataclass
class DataConfig:
    """Training text: indexed datasets written by ``mohge-prepare-data`` (or Megatron-LM)."""

    path: list[str] = field(default_factory=list)  # dataset prefixes; [] = the default corpus
    tokenizer: str = "byte"  # byte | path to a HuggingFace tokenizer.json
    split: str = "95,5,0"  # train,valid,test weights of the documents
    cache_dir: str = "runs/data"  # default-corpus dataset and GPTDataset index cache
    default_corpus_bytes: int = 4_000_000  # how much Python stdlib source the default corpus uses
    # Shuffles the validation split into samples. Fixed, so runs with different train.seed
    # are evaluated on the same held-out samples (paired comparisons); null = train.seed.
    valid_seed: Optional[int] = 1234


@dataclass
class TrainConfig:
    """Optimizer (Megatron Adam) and LR schedule (Megatron ``OptimizerParamScheduler``)."""

    iters: int = 300  # optimizer steps
    micro_batch_size: int = 8  # sequences per micro-batch per DP rank
    global_batch_size: int = 16  # sequences per step over all DP ranks (grad accumulation)
    lr: float = 3e-3  # peak learning rate
    min_lr: float = 3e-4  # final learning rate of the decay
    lr_warmup_iters: int = 30  # linear warmup steps
    lr_decay_style: str = "cosine"  # cosine | linear | constant
    lr_decay_iters: Optional[int] = None  # None = iters
    weight_decay: float = 0.0  # decoupled weight decay (AdamW)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # global grad-norm clipping; 0 disables
    seed: int = 1234  # weights, data order, router noise


@dataclass
class EvalConfig:
    """Held-out evaluation on the validation split."""

    interval: int = 100  # every this many steps (0: only at the end)
    iters: int = 8  # global batches per evaluation
    # global batches of the final evaluation (the reported held-out loss); a larger final
    # set lowers evaluation noise without slowing the periodic evaluations. None = iters
    final_iters: Optional[int] = None

    @property
    def final_batches(self) -> int:
        return self.final_iters if self.final_iters is not None else self.iters


@dataclass
class CheckpointConfig:
    """Megatron distributed checkpoints (reshardable across TP/EP/PP)."""

    save: Optional[str] = None  # directory; None = <output_dir>/checkpoints
    interval: int = 0  # save every this many steps (0: only at the end)
    load: Optional[str] = None  # resume from here; None = `save` if it holds a checkpoint
    fully_parallel: bool = False  # spread checkpoint I/O over DP ranks (Megatron-LM default)
    enabled: bool = True  # False: never save (benchmarks)
    keep_last: int = 0  # keep this many newest checkpoints (never the one resumed from); 0 = all
    # True: when the newest checkpoint is damaged (truncated / missing files), resume from the
    # previous complete one (the damaged one is renamed iter_XXXXXXX.damaged); False: stop
    fallback: bool = False


@dataclass
class HealthConfig:
    """Stop a diverging run before it is saved (non-finite loss / grad norm always stops it)."""

    loss_spike_factor: Optional[float] = None  # stop if loss > factor x mean of the window; None = off
    loss_spike_window: int = 20  # steps in that mean (the guard starts once it is full)


@dataclass
class LoggingConfig:
    interval: int = 10  # steps between log lines
    tensorboard: bool = True  # write TensorBoard event files to <output_dir>/tensorboard
    progress_bar: bool = True  # tqdm bar on rank 0


@dataclass
class LaunchConfig:
    """Megatron-LM on Slurm (``examples/slurm``); ignored by ``mohge-train``."""

    nodes: int = 1  # Slurm nodes
    gpus_per_node: int = 8  # GPUs (ranks) per node
    shape: str = "torchrun"  # torchrun: one task per node; srun: one task per GPU
    partition: Optional[str] = None  # sbatch --partition
    account: Optional[str] = None  # sbatch --account
    time: str = "04:00:00"  # sbatch --time
    megatron_lm_dir: Optional[str] = None  # Megatron-LM checkout (core_v0.16.1 or core_v0.19.0)
    container_image: Optional[str] = None  # pyxis --container-image (srun shape)
    container_mounts: list[str] = field(default_factory=list)  # pyxis --container-mounts
    extra_args: list[str] = field(default_factory=list)  # verbatim extra Megatron-LM flags
    env: dict[str, str] = field(default_factory=dict)  # extra environment variables


@dataclass
class RunConfig(YamlDataclass):
    name: str = "run"  # run name (default output dir runs/<name>)
    output_dir: Optional[str] = None  # logs, TensorBoard, summary; None = runs/<name>
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------ derived
    @property
    def out_dir(self) -> Path:
        return Path(self.output_dir) if self.output_dir else Path("runs") / self.name

    @property
    def save_dir(self) -> Path:
        return Path(self.checkpoint.save) if self.checkpoint.save else self.out_dir / "checkpoints"

    @property
    def ffn_hidden_size(self) -> int:
        return self.model.ffn_hidden_size or 4 * self.model.hidden_size

    @property
    def expert_tensor_parallel(self) -> int:
        p = self.parallel
        return p.expert_tensor_parallel if p.expert_tensor_parallel is not None else p.tensor_parallel

    @property
    def sequence_parallel(self) -> bool:
        p = self.parallel
        return p.sequence_parallel if p.sequence_parallel is not None else p.tensor_parallel > 1

    @property
    def moe_layer_pattern(self) -> list[int]:
        """1 for MoE layers, 0 for dense ones (all 0 for ``kind: dense``)."""
        n, freq = self.model.num_layers, self.model.moe_layer_freq
        if self.moe.kind == "dense":
            return [0] * n
        if isinstance(freq, int):
            return [1 if i % freq == 0 else 0 for i in range(n)]
        return list(freq)

    def dispatcher(self) -> str:
        d = self.moe.token_dispatcher
        return d if d != "auto" else ("alltoall" if self.parallel.expert_parallel > 1 else "allgather")

    def padded_vocab_size(self, tokenizer_vocab: int) -> int:
        """Megatron-LM's padding: a multiple of make_vocab_size_divisible_by * TP."""
        if self.model.vocab_size is not None:
            if self.model.vocab_size < tokenizer_vocab:
                raise ConfigError(
                    f"model.vocab_size={self.model.vocab_size} is smaller than the tokenizer's "
                    f"vocabulary ({tokenizer_vocab}); raise it or set it to null.")
            return self.model.vocab_size
        return self.megatron_padded_vocab(tokenizer_vocab)

    def megatron_padded_vocab(self, vocab: int) -> int:
        """``vocab`` rounded up to a multiple of make_vocab_size_divisible_by * TP."""
        m = self.model.make_vocab_size_divisible_by * self.parallel.tensor_parallel
        return int(math.ceil(vocab / m) * m)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        m = self.model
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ConfigError(f"name: a non-empty run name without '/', got {self.name!r}")
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
        self._validate_layer_freq()
        self._validate_moe()
        self._validate_parallel()
        self._validate_data()
        self._validate_train()
        _int("eval.interval", self.eval.interval, 0)
        _int("eval.iters", self.eval.iters, 1)
        if self.eval.final_iters is not None:
            _int("eval.final_iters", self.eval.final_iters, 1)
        _int("checkpoint.interval", self.checkpoint.interval, 0)
        _bool("checkpoint.fully_parallel", self.checkpoint.fully_parallel)
        _bool("checkpoint.enabled", self.checkpoint.enabled)
        _int("checkpoint.keep_last", self.checkpoint.keep_last, 0)
        _bool("checkpoint.fallback", self.checkpoint.fallback)
        if self.health.loss_spike_factor is not None:
            _num("health.loss_spike_factor", self.health.loss_spike_factor, 1.0)
        _int("health.loss_spike_window", self.health.loss_spike_window, 1)
        _int("logging.interval", self.logging.interval, 1)
        _bool("logging.tensorboard", self.logging.tensorboard)
        _bool("logging.progress_bar", self.logging.progress_bar)
        self._validate_launch()

    def _validate_layer_freq(self) -> None:
        freq, n = self.model.moe_layer_freq, self.model.num_layers
        if isinstance(freq, bool) or not isinstance(freq, (int, list)):
            raise ConfigError(f"model.moe_layer_freq: an int (every k-th layer) or a 0/1 list per "
                              f"layer, got {freq!r}")
        if isinstance(freq, int):
            _int("model.moe_layer_freq", freq, 1)
        else:
            if len(freq) != n or any(v not in (0, 1) or isinstance(v, bool) for v in freq):
                raise ConfigError(f"model.moe_layer_freq: a list needs one 0/1 entry per layer "
                                  f"({n}), got {freq!r}")
            if self.moe.kind != "dense" and not any(freq):
                raise ConfigError("model.moe_layer_freq: no MoE layer; use moe.kind: dense for a "
                                  "dense model.")

    def _validate_moe(self) -> None:
        moe = self.moe
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
        if moe.kind == "moe":
            _int("moe.num_experts", moe.num_experts, 1)
            _int("moe.expert_hidden_size", moe.expert_hidden_size, 1)
            _int("moe.topk", moe.topk, 1)
            _int("moe.num_shared_experts", moe.num_shared_experts, 0)
            if moe.topk > moe.num_experts:
                raise ConfigError(f"moe.topk={moe.topk} exceeds moe.num_experts={moe.num_experts}.")
            if moe.num_shared_experts and moe.shared_expert_hidden_size is None:
                raise ConfigError("moe.shared_expert_hidden_size: required when "
                                  "moe.num_shared_experts > 0.")
            if moe.shared_expert_hidden_size is not None:
                _int("moe.shared_expert_hidden_size", moe.shared_expert_hidden_size, 1)
            _num("moe.aux_loss_coeff", moe.aux_loss_coeff, 0.0)
        if moe.z_loss_coeff is not None:
            _num("moe.z_loss_coeff", moe.z_loss_coeff, 0.0)
        shared = (moe.num_shared_experts if moe.kind == "moe" else
                  moe.mohge.num_shared_experts if moe.kind == "mohge" else 0)
        if shared and self.model.add_bias_linear:
            raise ConfigError("model.add_bias_linear: Megatron's SharedExpertMLP has no bias "
                              "support; set it to false or remove the shared experts.")

    def _validate_parallel(self) -> None:
        p, m, moe = self.parallel, self.model, self.moe
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
        if self.ffn_hidden_size % tp:
            raise ConfigError(f"parallel.tensor_parallel={tp} must divide the dense FFN width "
                              f"{self.ffn_hidden_size} (model.ffn_hidden_size).")
        if tp > 1 and moe.kind != "dense" and p.sequence_parallel is False:
            raise ConfigError("parallel.sequence_parallel: Megatron requires sequence parallelism "
                              "for MoE training with tensor_parallel > 1; set it to true or null.")
        if m.num_layers % p.pipeline_parallel:
            raise ConfigError(f"parallel.pipeline_parallel={p.pipeline_parallel} must divide "
                              f"model.num_layers={m.num_layers}.")
        ep, etp = p.expert_parallel, self.expert_tensor_parallel
        if moe.kind == "dense" and ep > 1:
            raise ConfigError("parallel.expert_parallel: a dense model has no experts; set it to 1.")
        if moe.kind == "moe":
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

    def _validate_data(self) -> None:
        d = self.data
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

    def _validate_train(self) -> None:
        t = self.train
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

    def _validate_launch(self) -> None:
        la = self.launch
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

    def check_world_size(self, world_size: int) -> int:
        """Check the layout against ``world_size`` ranks; return the data-parallel size."""
        p, t = self.parallel, self.train
        mp = p.tensor_parallel * p.pipeline_parallel
        if world_size % mp:
            raise ConfigError(f"parallel: tensor_parallel x pipeline_parallel = {mp} does not "
                              f"divide the world size {world_size} (ranks launched).")
        dp = world_size // mp
        expert_dp_world = dp * p.tensor_parallel
        if expert_dp_world % (p.expert_parallel * self.expert_tensor_parallel):
            raise ConfigError(
                f"parallel.expert_parallel={p.expert_parallel} x expert_tensor_parallel="
                f"{self.expert_tensor_parallel} must divide data_parallel x tensor_parallel = "
                f"{expert_dp_world} at world size {world_size}.")
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} must be a multiple of "
                f"micro_batch_size x data_parallel = {t.micro_batch_size} x {dp} at world size "
                f"{world_size}.")
        return dp

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, data: dict, base_dir: Optional[Path] = None) -> "RunConfig":
        """Build from a mapping; ``moe.mohge`` may be a YAML path (relative to ``base_dir``)."""
        if not isinstance(data, dict):
            raise ConfigError(f"RunConfig: expected a mapping, got {type(data).__name__}")
        data = _resolve_mohge_path(data, base_dir)
        return _build(cls, data, "")

    @classmethod
    def from_yaml(cls, path: Union[str, Path], overrides: Optional[list[str]] = None) -> "RunConfig":
        p = Path(path)
        data = read_yaml_file(p, "run config") or {}
        data = _resolve_mohge_path(data, p.parent)  # so overrides can reach moe.mohge.*
        if overrides:
            data = apply_overrides(data, overrides)
        return cls.from_dict(data, base_dir=p.parent)


#: Top-level keys of a run file and of a MoHGE layer file (a layer file may wrap its keys in
#: one ``mohge:`` section). Disjoint, so one key tells the two kinds apart.
RUN_FIELDS = frozenset(f.name for f in dataclasses.fields(RunConfig))
LAYER_FIELDS = frozenset(f.name for f in dataclasses.fields(MoHGEConfig)) | {"mohge"}


def config_kind(data: Any, where: str) -> str:
    """``"run"`` or ``"layer"``: the kind of YAML file ``where`` holding ``data``.

    A file is a run file as soon as one top-level key is a ``RunConfig`` field, so a run file
    with a misspelt section (``trian:``) still reaches ``RunConfig``'s own error message."""
    keys = set(data) if isinstance(data, dict) else set()
    if keys & RUN_FIELDS:
        return "run"
    if keys & LAYER_FIELDS:
        return "layer"
    raise ConfigError(f"{where}: neither a run file (top-level keys among {sorted(RUN_FIELDS)}) "
                      f"nor a MoHGE layer file (keys among {sorted(LAYER_FIELDS)}).")


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``["train.iters=50", "moe.mohge.topk=4"]`` -> a new nested dict (values parsed as YAML)."""
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key.sub=value (e.g. train.iters=50)")
        key, _, raw = item.partition("=")
        try:
            value = load_yaml(raw)
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML: {exc}") from exc
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = nxt
        node[parts[-1]] = value
    return out


def _resolve_mohge_path(data: dict, base_dir: Optional[Path]) -> dict:
    moe = data.get("moe")
    if isinstance(moe, dict) and isinstance(moe.get("mohge"), str):
        ref = Path(moe["mohge"])
        if not ref.is_absolute() and base_dir is not None and not ref.exists():
            ref = base_dir / ref
        if not ref.is_file():
            raise ConfigError(f"moe.mohge: MoHGE config file not found: {moe['mohge']}")
        data = {**data, "moe": {**moe, "mohge": MoHGEConfig.from_yaml(ref).to_dict()}}
    return data


def _build(cls, data: Any, path: str):
    """Construct dataclass ``cls`` recursively, rejecting unknown keys with a suggestion."""
    where = path or "RunConfig"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"{full}: unknown key.{hint} Valid keys: {', '.join(names)}.")
        sub = _dataclass_of(hints[key])
        if sub is MoHGEConfig:
            if value is not None:
                try:
                    value = MoHGEConfig.from_dict(value)
                except ConfigError as exc:
                    raise ConfigError(f"{full}: {exc}") from exc
        elif sub is NoisyGatingConfig:
            from megatron_mohge.config import _build as build_mohge_part

            value = build_mohge_part(NoisyGatingConfig, value, full)
        elif sub is not None and value is not None:
            value = _build(sub, value, full)
        kwargs[key] = value
    return cls(**kwargs)


def _dataclass_of(tp) -> Optional[type]:
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in typing.get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None
