"""Run configuration: one YAML file describes a training run end to end.

``RunConfig`` nests the GPT backbone (``model``), the MoE variant (``moe``: MoHGE, stock
Megatron MoE or dense), the parallel layout, data, optimizer/schedule, evaluation,
checkpointing, logging and -- for Megatron-LM on Slurm -- the ``launch`` section. The same
file drives ``mohge-train`` (megatron.core alone), ``mohge-check-config`` and the Slurm
launchers (translated to Megatron-LM flags). Validated once, on construction
(:mod:`.run_validation`); every error names the field (``train.lr``) and the fix.
``apply_overrides`` takes ``key.sub=value`` strings from a command line.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from megatron_mohge.config import run_validation
from megatron_mohge.config.errors import ConfigError
from megatron_mohge.config.io import (YamlDataclass, apply_overrides, build_dataclass,
                                      field_aliases, read_yaml_file)
from megatron_mohge.config.layer import MoHGEConfig, NoisyGatingConfig


@dataclass
class ModelConfig:
    """The backbone (Megatron ``TransformerConfig`` / ``GPTModel`` or ``HybridModel`` arguments)."""

    # gpt: Megatron's GPTModel (deprecated upstream from megatron-core 0.19, kept while it
    # ships) | hybrid: HybridModel (MambaModel on 0.16.1), layers from hybrid_layer_pattern
    kind: str = "gpt"
    # kind=hybrid: one symbol per layer: * attention, E MoE (MoHGE or stock, per moe.kind),
    # - dense MLP; M Mamba / G GatedDeltaNet need CUDA kernels and TE. e.g. "*E*E"
    hybrid_layer_pattern: Optional[str] = None
    num_layers: int = 4  # transformer layers (kind=hybrid: the pattern's length)
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


#: Former values of ``moe.kind``, accepted forever (old run files, old checkpoints' run.yaml).
KIND_ALIASES = {"moe": "stock"}
#: The ``kind`` results files (summary.json, results.json) record: stock runs keep "moe", the
#: name every earlier result was recorded under, so old and new results compare as they are.
RESULT_KINDS = {"stock": "moe"}


@dataclass
class MoEConfig:
    """Which FFN the MoE layers use. ``kind: mohge`` needs ``mohge``; ``kind: stock`` (formerly
    ``moe``, still accepted) is Megatron's stock ``MoELayer`` with uniform experts (the fields
    below)."""

    kind: str = "stock"  # mohge | stock (Megatron's MoELayer) | dense (no experts)
    mohge: Optional[MoHGEConfig] = None  # kind=mohge: the MoHGE layer (mapping or YAML path)
    num_experts: int = 16  # kind=stock: routed experts per layer
    expert_hidden_size: int = 64  # kind=stock: FFN width of every routed expert
    topk: int = 2  # kind=stock: experts per token
    num_shared_experts: int = 0  # kind=stock: always-active shared experts
    # kind=stock: width of each shared expert (the name MoHGEConfig uses too; formerly
    # shared_expert_hidden_size, still accepted)
    shared_expert_width: Optional[int] = field(
        default=None, metadata={"aliases": ("shared_expert_hidden_size",)})
    router: str = "topk"  # kind=stock: topk (Megatron TopKRouter) | noisy_topk (Shazeer 2017)
    aux_loss_coeff: float = 1e-2  # kind=stock, router=topk: Megatron's load-balancing loss
    z_loss_coeff: Optional[float] = None  # kind=stock: router z-loss; None disables
    noisy_gating: NoisyGatingConfig = field(default_factory=NoisyGatingConfig)  # router=noisy_topk
    token_dispatcher: str = "auto"  # auto (alltoall if EP>1 else allgather) | alltoall | allgather | flex
    use_te: Optional[bool] = None  # Transformer Engine layers; None = when usable (GPU + TE)
    # (MoHGE expert GEMMs: moe.mohge.expert_backend, local | torch | te | auto)

    def __post_init__(self):
        if isinstance(self.kind, str):
            self.kind = KIND_ALIASES.get(self.kind, self.kind)

    @property
    def result_kind(self) -> str:
        """``kind`` as results files record it (``RESULT_KINDS``)."""
        return RESULT_KINDS.get(self.kind, self.kind)


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

    #: The MoHGE layer file a ``moe.mohge: PATH`` was read from (absolute), or None. Not a
    #: field (no annotation): ``to_dict`` holds the layer itself, this says where it came from.
    layer_file = None

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
    def is_hybrid(self) -> bool:
        return self.model.kind == "hybrid"

    @property
    def moe_layer_pattern(self) -> list[int]:
        """1 for MoE layers, 0 for the others (all 0 for ``kind: dense``); a hybrid model's
        MoE layers are its pattern's ``E`` layers."""
        n, freq = self.model.num_layers, self.model.moe_layer_freq
        if self.is_hybrid:
            return [int(s == "E") for s in self.model.hybrid_layer_pattern]
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
        """Raise ``ConfigError`` naming the first bad field (:mod:`.run_validation`)."""
        run_validation.validate(self)

    def check_world_size(self, world_size: int) -> int:
        """Check the layout against ``world_size`` ranks; return the data-parallel size."""
        return run_validation.check_world_size(self, world_size)

    # ------------------------------------------------------------------ I/O
    @classmethod
    def from_dict(cls, data: dict, base_dir: Optional[Path] = None) -> "RunConfig":
        """Build from a mapping; ``moe.mohge`` may be a YAML path (relative to ``base_dir``,
        without one to the current folder)."""
        layer_file = None
        if isinstance(data, dict):
            data, layer_file = _resolve_mohge_path(data, base_dir)
        run = build_dataclass(cls, data)
        run.layer_file = layer_file
        return run

    @classmethod
    def from_yaml(cls, path: Union[str, Path], overrides: Optional[list[str]] = None) -> "RunConfig":
        """The run file ``path`` with ``key.sub=value`` ``overrides``. Its ``moe.mohge: PATH``
        is relative to the file's folder (wherever the command runs); an override's
        ``moe.mohge=PATH`` is typed on a command line, so relative to the current folder."""
        p = Path(path)
        data = read_yaml_file(p, "run config") or {}
        if not isinstance(data, dict):
            raise ConfigError(
                f"run config {path}: expected a mapping of sections (model:, moe:, train:, "
                f"...), got a YAML {type(data).__name__} ({str(data)[:60]!r}); write the file "
                f"as 'section:' blocks of 'key: value' lines (see examples/configs/)")
        data, layer_file = _resolve_mohge_path(data, p.parent)  # overrides reach moe.mohge.*
        run = cls.from_dict(apply_overrides(data, overrides or []))
        run.layer_file = run.layer_file or layer_file
        return run


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


def normalize_run_dict(data: Any) -> Any:
    """A run mapping (a run file, a checkpoint's run.yaml, a bench preset's run) with former
    spellings replaced by today's (``KIND_ALIASES``, ``MoEConfig``'s field aliases), so two
    of them compare field by field whichever code wrote them."""
    if not isinstance(data, dict) or not isinstance(data.get("moe"), dict):
        return data
    aliases = field_aliases(MoEConfig)
    moe = {aliases.get(k, k): v for k, v in data["moe"].items()}
    if isinstance(moe.get("kind"), str):
        moe["kind"] = KIND_ALIASES.get(moe["kind"], moe["kind"])
    return {**data, "moe": moe}


def _resolve_mohge_path(data: dict, base_dir: Optional[Path]) -> tuple[dict, Optional[Path]]:
    """``data`` with a ``moe.mohge: PATH`` replaced by the layer it names, and that file
    (absolute; None when ``moe.mohge`` is no path). A relative PATH is relative to
    ``base_dir`` only, never looked up in the current folder first: the same run file then
    reads the same layer from wherever it is run."""
    moe = data.get("moe")
    if not (isinstance(moe, dict) and isinstance(moe.get("mohge"), str)):
        return data, None
    given = Path(moe["mohge"]).expanduser()
    ref = given if given.is_absolute() or base_dir is None else Path(base_dir) / given
    if not ref.is_file():
        where = ("" if given.is_absolute() else " (a relative path is read from the run "
                 "file's folder)" if base_dir is not None else " (relative to the current folder)")
        raise ConfigError(f"moe.mohge: MoHGE config file not found: {ref}{where}; give the "
                          f"layer YAML's path relative to the run file, or an absolute path")
    ref = ref.resolve()
    return {**data, "moe": {**moe, "mohge": MoHGEConfig.from_yaml(ref).to_dict()}}, ref
