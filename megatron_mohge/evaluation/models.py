"""What ``mohge-eval`` scores: ``Scorer(tokenize, prefix, logits_fn, max_length, what)``.

* a Megatron checkpoint (any ``CHECKPOINT`` form ``mohge-export-hf`` takes): the plugin's own
  ``GPTModel`` of the run file on one CPU / GPU rank (TP = EP = PP = 1; dist-ckpt reshards
  whatever layout saved it), the run's tokenizer;
* an exported Hugging Face folder (``config.json`` of ``model_type: mohge``): its
  ``AutoModelForCausalLM`` (``trust_remote_code``) and ``AutoTokenizer``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from megatron_mohge.config import ConfigError


@dataclass
class Scorer:
    tokenize: Callable[[str], list]
    prefix: int  # the end-of-document id every document is conditioned on
    logits_fn: Callable[[torch.Tensor], torch.Tensor]
    max_length: int
    what: str


def is_hf_export(path) -> bool:
    return (Path(path) / "config.json").is_file()


def hf_scorer(path, max_length: Optional[int] = None) -> Scorer:
    path = Path(path)
    try:
        cfg = json.loads((path / "config.json").read_text())
    except ValueError as exc:
        raise ConfigError(f"{path / 'config.json'}: not valid JSON ({exc})") from exc
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ConfigError("scoring a Hugging Face folder needs transformers: pip install "
                          "'megatron-mohge[hf]'") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=True).eval()
        tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ConfigError(f"{path}: cannot load the Hugging Face model ({first})") from exc
    if tok.eos_token_id is None:
        raise ConfigError(f"{path}: the tokenizer has no eos token to condition documents on")
    length = max_length or cfg.get("max_position_embeddings") or 2048

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        return model(ids.to(model.device)).logits.float().cpu()

    return Scorer(lambda text: tok(text, add_special_tokens=False, verbose=False).input_ids,
                  int(tok.eos_token_id), logits_fn, int(length), f"Hugging Face model {path}")


def checkpoint_scorer(checkpoint, *, iteration=None, run_file=None, tokenizer=None,
                      max_length: Optional[int] = None) -> Scorer:
    """The plugin's model of ``checkpoint`` on this process (a 1-rank group)."""
    import warnings

    # megatron-core warns at import that Apex / Transformer Engine are absent (expected on CPU)
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_mohge.data.tokenizers import load_tokenizer
    from megatron_mohge.export import source
    from megatron_mohge.training import checkpoint as ckpt_lib
    from megatron_mohge.training import mcore_plumbing as M
    from megatron_mohge.training.model_builder import build_gpt_model

    src = source.open_source(checkpoint, iteration=iteration, run_file=run_file)
    run = src.run
    tok = load_tokenizer(tokenizer or run.data.tokenizer)
    meta = FileSystemReader(str(src.ckpt)).read_metadata().state_dict_metadata
    if "embedding.word_embeddings.weight" not in meta:
        raise ConfigError(f"{src.ckpt}: no embedding.word_embeddings.weight")
    vocab = int(meta["embedding.word_embeddings.weight"].size[0])  # padded as trained
    # one rank: the layout the checkpoint was saved at is resharded by dist-ckpt
    p = run.parallel
    p.tensor_parallel = p.pipeline_parallel = p.expert_parallel = 1
    p.expert_tensor_parallel, p.sequence_parallel = None, False
    M.init_distributed()
    M.init_layout(1, 1, 1, seed=run.train.seed)
    model = build_gpt_model(run, vocab)
    try:
        state = ckpt_lib.dist_load({"model": model.sharded_state_dict()}, src.ckpt)
    except Exception as exc:  # noqa: BLE001 - a damaged checkpoint: named, not a traceback
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise ConfigError(f"{src.ckpt}: loading the model failed ({type(exc).__name__}: "
                          f"{first})") from exc
    model.load_state_dict(state["model"], strict=True)
    model.eval()

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(M.device())
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0)
        return model(ids, pos, None).float().cpu()

    return Scorer(tok.tokenize, int(tok.eod), logits_fn,
                  int(max_length or run.model.seq_length), f"Megatron checkpoint {src.ckpt}")
