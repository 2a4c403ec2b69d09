"""A run YAML (``RunConfig``) as Megatron-LM ``pretrain_gpt.py`` command-line flags.

``megatron_lm_flags(run)`` covers the backbone, MoE (the MoE fields mohge-train sets, from
``config.megatron.run_moe_transformer_fields``, plus ``--mohge-config FILE`` for
``moe.kind: mohge``), parallelism, data and tokenizer, optimizer and LR schedule,
evaluation, checkpoints (``--ckpt-format torch_dist``) and logging. ``launch.extra_args`` come
last, so they override anything above (argparse keeps the last value).

Tokenizers: ``byte`` -> Megatron's ``NullTokenizer`` with ids 0..255 and eod 256, exactly our
``ByteTokenizer`` (``--vocab-size 256`` up to core_v0.17, ``--vocab-size 257
--null-tokenizer-eod-id 256`` from core_v0.18, see ``compat.versions.NULL_TOKENIZER_COUNTS_EOD``;
the flags follow the Megatron-LM checkout the run uses); Megatron pads 257 to a multiple of
``make_vocab_size_divisible_by x TP``; a ``tokenizer.json`` (or its folder) ->
``--tokenizer-type HuggingFaceTokenizer --tokenizer-model <folder>`` (Megatron-LM loads it with
``transformers.AutoTokenizer``, see docs/megatron-lm.md, "Prepare data"; the key -> flag table is docs/flags.md).
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path
from typing import Optional, Union

from megatron_mohge.config import ConfigError

#: The byte tokenizer's raw vocabulary (256 bytes + eod 256).
BYTE_VOCAB = 257
_FIND = object()  # megatron_lm_flags: find the Megatron-LM version


def _num(x) -> str:
    """Numbers as Megatron's argparse reads them back (no trailing '.0' noise for ints)."""
    if isinstance(x, bool):
        raise TypeError("booleans are flags, not values")
    if isinstance(x, float) and x.is_integer() and abs(x) < 1e15:
        return str(int(x)) if abs(x) >= 1 or x == 0 else repr(x)
    return repr(x) if isinstance(x, float) else str(x)


#: Megatron-LM's distributed-optimizer checkpoint in model space (``fully_reshardable``, as
#: ``mohge-train`` writes): it loads in any TP / EP / PP / DP layout. Without the flag
#: Megatron-LM writes ``dp_reshardable`` (its flat DP buffers), which loads only in the
#: layout that saved it. Rendered where the Megatron-LM source defines it (:func:`defines_arg`).
OPTIM_FULLY_RESHARDABLE = "--dist-ckpt-optim-fully-reshardable"


@functools.lru_cache(maxsize=None)
def _training_source_defines(training_dir: str, flag: str) -> bool:
    dest = flag.lstrip("-").replace("-", "_")
    field = re.compile(rf"^\s*{dest}\s*:", re.M)  # a config dataclass field (core_v0.16+)
    root = Path(training_dir)
    for path in (root / "arguments.py", *root.glob("training_config.py"),
                 *root.glob("config/*.py")):
        text = path.read_text(errors="replace") if path.is_file() else ""
        if field.search(text) or re.search(rf"add_argument\(\s*['\"]{flag}['\"]", text):
            return True
    return False


def defines_arg(flag: str, megatron_lm_dir=None, *, installed: bool = False) -> bool:
    """Whether Megatron-LM's ``megatron/training`` defines ``flag`` (a config dataclass field
    or an ``add_argument`` call; the source is read, not imported): the checkout
    ``megatron_lm_dir``, else ``$MEGATRON_LM_DIR``, else the installed megatron-core's (the 0.19
    wheels ship ``megatron.training``; ``installed=True``: only that one). False where none is
    found: a flag Megatron-LM may not know is left out."""
    import os
    from importlib import metadata

    dirs = [] if installed else [megatron_lm_dir, os.environ.get("MEGATRON_LM_DIR")]
    for d in dirs:
        if d and (Path(d) / "megatron" / "training").is_dir():
            return _training_source_defines(str(Path(d) / "megatron" / "training"), flag)
    try:
        wheel = Path(metadata.distribution("megatron-core").locate_file("megatron/training"))
    except metadata.PackageNotFoundError:
        return False
    return wheel.is_dir() and _training_source_defines(str(wheel), flag)


#: Megatron-LM's flags for a hybrid model's layer pattern, newest first: core_v0.19 reads
#: ``--hybrid-layer-pattern`` (``--hybrid-override-pattern`` deprecated there), core_v0.16 only
#: ``--hybrid-override-pattern`` (``pretrain_mamba.py``). Rendered as the Megatron-LM source
#: defines them (:func:`defines_arg`); where none is found, the newest.
HYBRID_PATTERN_FLAGS = ("--hybrid-layer-pattern", "--hybrid-override-pattern")


def hybrid_pattern_flags(run, megatron_lm_dir=None, *, installed: bool = False) -> list[str]:
    """``[flag, pattern]`` for a hybrid run (``model.kind: hybrid``), else ``[]``."""
    if not run.is_hybrid:
        return []
    flag = next((f for f in HYBRID_PATTERN_FLAGS
                 if defines_arg(f, megatron_lm_dir, installed=installed)), HYBRID_PATTERN_FLAGS[0])
    return [flag, run.model.hybrid_layer_pattern]


def default_mohge_config_path(run) -> Path:
    """Where the resolved MoHGE layer config of ``run`` is written for ``--mohge-config``."""
    return run.out_dir / "mohge_layer.yaml"


def write_mohge_config(run, path: Optional[Union[str, Path]] = None) -> Path:
    """Write ``run.moe.mohge`` (after overrides) as a MoHGE layer YAML; returns the path."""
    if run.moe.kind != "mohge":
        raise ConfigError(f"moe.kind={run.moe.kind!r}: only MoHGE runs have a MoHGE config")
    p = Path(path) if path is not None else default_mohge_config_path(run)
    p.parent.mkdir(parents=True, exist_ok=True)
    text = run.moe.mohge.to_yaml()
    if not p.is_file() or p.read_text() != text:
        # Atomically: every rank of mohge-pretrain writes it before torch.distributed exists,
        # and a rank must never read another's half-written file.
        import os

        tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, p)
    return p


def model_flags(run) -> list[str]:
    m = run.model
    f = ["--num-layers", str(m.num_layers), "--hidden-size", str(m.hidden_size),
         "--num-attention-heads", str(m.num_attention_heads)]
    if m.num_query_groups is not None and m.num_query_groups != m.num_attention_heads:
        f += ["--group-query-attention", "--num-query-groups", str(m.num_query_groups)]
    f += ["--ffn-hidden-size", str(run.ffn_hidden_size),
          "--seq-length", str(m.seq_length), "--max-position-embeddings", str(m.seq_length),
          "--make-vocab-size-divisible-by", str(m.make_vocab_size_divisible_by),
          "--normalization", m.normalization,
          "--position-embedding-type", m.position_embedding_type,
          "--init-method-std", _num(m.init_method_std),
          "--hidden-dropout", _num(m.hidden_dropout),
          "--attention-dropout", _num(m.attention_dropout)]
    if m.position_embedding_type == "rope":
        f += ["--rotary-base", str(m.rotary_base)]
    if m.swiglu:
        f.append("--swiglu")
    if not m.add_bias_linear:
        f.append("--disable-bias-linear")
    if m.untie_embeddings_and_output_weights:
        f.append("--untie-embeddings-and-output-weights")
    if m.precision == "bf16":
        f.append("--bf16")
    elif m.precision == "fp16":
        f.append("--fp16")
    if run.moe.kind != "dense" and not run.is_hybrid:  # hybrid: the pattern's E layers
        freq = m.moe_layer_freq
        f += ["--moe-layer-freq", str(freq) if isinstance(freq, int)
              else "[" + ",".join(str(int(v)) for v in freq) + "]"]
    return f


def _transformer_impl(run) -> str:
    # None (auto) means TE on the GPU nodes Slurm launches on; false forces local layers.
    return "local" if run.moe.use_te is False else "transformer_engine"


def arg_flags(args: dict) -> list[str]:
    """Megatron-LM arguments (``args`` names -> values) as flags: ``None`` and ``False`` are
    left out (Megatron's defaults for every MoE argument we set), ``True`` is a bare flag."""
    f: list[str] = []
    for name, value in args.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            f.append(flag)
        elif value is not None and value is not False:
            f += [flag, value if isinstance(value, str) else _num(value)]
    return f


def moe_flags(run, mohge_config_path: Optional[Union[str, Path]] = None) -> list[str]:
    """MoE flags: the fields ``config.megatron.run_moe_transformer_fields`` gives mohge-train's
    ``TransformerConfig`` (stock and MoHGE alike), plus ``--mohge-config`` for MoHGE."""
    from megatron_mohge.config.megatron import megatron_lm_args, run_moe_transformer_fields

    moe = run.moe
    if moe.kind == "dense":
        return []
    f: list[str] = []
    if moe.kind == "stock" and moe.router != "topk":
        raise ConfigError(
            f"moe.router={moe.router!r}: stock Megatron-LM has only its TopKRouter; the noisy "
            "top-k router needs the MoHGE builder (moe.kind: mohge with mohge.router.type: "
            "noisy_topk) or mohge-train.")
    if moe.kind == "mohge":  # its EP / expert-TP layout was checked when run was built
        path = mohge_config_path if mohge_config_path is not None \
            else default_mohge_config_path(run)
        f += ["--mohge-config", str(path)]
    f += arg_flags(megatron_lm_args(run_moe_transformer_fields(moe)))
    if moe.kind == "stock" and _transformer_impl(run) == "transformer_engine":
        f.append("--moe-grouped-gemm")  # the MoHGE spec picks its own expert GEMMs
    f += ["--moe-token-dispatcher-type", run.dispatcher()]
    return f


def parallel_flags(run) -> list[str]:
    p = run.parallel
    f = ["--tensor-model-parallel-size", str(p.tensor_parallel),
         "--pipeline-model-parallel-size", str(p.pipeline_parallel)]
    if run.moe.kind != "dense":
        f += ["--expert-model-parallel-size", str(p.expert_parallel)]
        if p.expert_tensor_parallel is not None:
            f += ["--expert-tensor-parallel-size", str(p.expert_tensor_parallel)]
    if run.sequence_parallel:
        f.append("--sequence-parallel")
    if p.use_distributed_optimizer:
        f.append("--use-distributed-optimizer")
    # Megatron-LM takes whole minutes; round up so a job never fails sooner than configured
    f += ["--distributed-timeout-minutes", str(max(1, math.ceil(p.collective_timeout_s / 60)))]
    f += ["--transformer-impl", _transformer_impl(run)]
    if _transformer_impl(run) == "local":
        f.append("--no-rope-fusion")  # the fused RoPE kernel is Transformer Engine's
    return f


def tokenizer_flags(run, megatron_lm_version=None) -> list[str]:
    """``megatron_lm_version``: the Megatron-LM (megatron-core) version the flags are for; the
    byte tokenizer's flags differ between tags (``None``: the newest supported tag's)."""
    tok = run.data.tokenizer
    if tok == "byte":
        if run.model.vocab_size is not None and \
                run.model.vocab_size != run.megatron_padded_vocab(BYTE_VOCAB):
            raise ConfigError(
                f"model.vocab_size={run.model.vocab_size}: Megatron-LM pads the byte tokenizer's "
                f"{BYTE_VOCAB} ids to {run.megatron_padded_vocab(BYTE_VOCAB)} (a multiple of "
                "make_vocab_size_divisible_by x tensor_parallel); set model.vocab_size: null or "
                "change model.make_vocab_size_divisible_by.")
        from megatron_mohge.compat.versions import null_tokenizer_counts_eod

        if null_tokenizer_counts_eod(megatron_lm_version):
            return ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(BYTE_VOCAB),
                    "--null-tokenizer-eod-id", str(BYTE_VOCAB - 1)]
        return ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(BYTE_VOCAB - 1)]
    path = Path(tok).expanduser()
    if path.suffix == ".json" and path.name != "tokenizer.json":
        raise ConfigError(
            f"data.tokenizer={tok}: Megatron-LM's HuggingFaceTokenizer loads a folder with "
            "transformers.AutoTokenizer, which reads <folder>/tokenizer.json; copy the file to "
            f"<folder>/tokenizer.json (with a tokenizer_config.json) and set data.tokenizer to "
            "that folder.")
    folder = path if path.suffix != ".json" else path.parent
    return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(folder)]


def data_flags(run, megatron_lm_version=None) -> list[str]:
    d = run.data
    if not d.path:
        raise ConfigError(
            "data.path: Megatron-LM needs prepared datasets; write them with mohge-prepare-data "
            "(--output-prefix PREFIX) and list the prefixes here (or pass --mock-data through "
            "launch.extra_args for a synthetic benchmark).")
    return ["--data-path", *d.path, "--split", str(d.split),
            "--data-cache-path", str(Path(d.cache_dir) / "megatron_index_cache"),
            *tokenizer_flags(run, megatron_lm_version)]


def train_flags(run) -> list[str]:
    t = run.train
    return ["--train-iters", str(t.iters),
            "--micro-batch-size", str(t.micro_batch_size),
            "--global-batch-size", str(t.global_batch_size),
            "--lr", _num(t.lr), "--min-lr", _num(t.min_lr),
            "--lr-decay-style", t.lr_decay_style,
            "--lr-warmup-iters", str(t.lr_warmup_iters),
            "--lr-decay-iters", str(t.lr_decay_iters or t.iters),
            "--weight-decay", _num(t.weight_decay),
            "--adam-beta1", _num(t.adam_beta1), "--adam-beta2", _num(t.adam_beta2),
            "--adam-eps", _num(t.adam_eps),
            "--clip-grad", _num(t.clip_grad),
            "--seed", str(t.seed)]


def eval_flags(run) -> list[str]:
    e = run.eval
    # interval 0 = only at the end: Megatron-LM evaluates on the last step and after training.
    return ["--eval-interval", str(e.interval or run.train.iters), "--eval-iters", str(e.iters)]


def checkpoint_flags(run, optim_fully_reshardable: bool = False) -> list[str]:
    """``optim_fully_reshardable``: Megatron-LM knows :data:`OPTIM_FULLY_RESHARDABLE`."""
    c = run.checkpoint
    f = ["--ckpt-format", "torch_dist"]
    if run.parallel.use_distributed_optimizer and optim_fully_reshardable:
        f.append(OPTIM_FULLY_RESHARDABLE)
    if c.enabled:
        # Megatron-LM needs an interval with --save; 0 (only at the end) = every train.iters.
        f += ["--save", str(run.save_dir), "--save-interval", str(c.interval or run.train.iters)]
    load = c.load or (str(run.save_dir) if c.enabled else None)
    if load:
        f += ["--load", str(load)]  # a folder without a checkpoint starts from scratch
    if c.fully_parallel:
        f.append("--ckpt-fully-parallel-load")  # fully parallel save is Megatron-LM's default
    else:
        f.append("--no-ckpt-fully-parallel-save")
    return f


def logging_flags(run) -> list[str]:
    lg = run.logging
    f = ["--log-interval", str(lg.interval), "--log-throughput"]
    if lg.tensorboard:
        f += ["--tensorboard-dir", str(run.out_dir / "tensorboard"),
              "--log-timers-to-tensorboard", "--log-validation-ppl-to-tensorboard"]
    return f


def megatron_lm_flags(run, mohge_config_path: Optional[Union[str, Path]] = None,
                      megatron_lm_version=_FIND, *, data: bool = True,
                      optim_fully_reshardable: Optional[bool] = None,
                      installed: bool = False) -> list[str]:
    """All Megatron-LM flags of ``run`` (``launch.extra_args`` last).

    ``mohge_config_path``: the file ``--mohge-config`` points at for MoHGE runs (default
    ``<output_dir>/mohge_layer.yaml``, written by :func:`write_mohge_config`).
    ``megatron_lm_version``: the megatron-core version of the Megatron-LM checkout the flags
    are for (default: found from ``launch.megatron_lm_dir`` / ``$MEGATRON_LM_DIR`` / the
    installed megatron-core, ``compat.versions.megatron_lm_version``).
    ``data=False``: no ``--data-path`` (the caller's dataset provider reads ``run.data``
    itself, ``mohge-pretrain``), only the tokenizer flags.
    ``optim_fully_reshardable``: whether that Megatron-LM knows
    :data:`OPTIM_FULLY_RESHARDABLE` (default: found in its source, :func:`defines_arg`).
    ``installed``: the flags are for the installed ``megatron.training`` (``mohge-pretrain``),
    not a checkout.
    """
    if megatron_lm_version is _FIND:
        from megatron_mohge.compat.versions import megatron_lm_version as find

        megatron_lm_version = find(run.launch.megatron_lm_dir)
    if optim_fully_reshardable is None:
        optim_fully_reshardable = defines_arg(OPTIM_FULLY_RESHARDABLE, run.launch.megatron_lm_dir)
    return [*model_flags(run),
            *hybrid_pattern_flags(run, run.launch.megatron_lm_dir, installed=installed),
            *moe_flags(run, mohge_config_path), *parallel_flags(run),
            *(data_flags(run, megatron_lm_version) if data
              else tokenizer_flags(run, megatron_lm_version)), *train_flags(run), *eval_flags(run),
            *checkpoint_flags(run, optim_fully_reshardable), *logging_flags(run),
            *run.launch.extra_args]
