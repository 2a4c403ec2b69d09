"""Benchmark presets: named sets of runs sharing one backbone, data, seed and token budget.

A preset is a base run mapping (RunConfig fields) plus per-run overrides of ``moe``, the
world size the runs launch with, and the layer-microbenchmark shape. ``moe`` is the stock
Megatron baseline in every comparison preset.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megatron_mohge.config import ConfigError, MoHGEConfig

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"


@dataclass
class Preset:
    name: str
    description: str
    base: dict  # RunConfig fields shared by all runs (model, train, eval, data, parallel)
    runs: dict  # run name -> {"moe": {...}} (and optionally other overrides)
    nproc: int = 1  # ranks per run (torchrun when > 1)
    needs_gpu: bool = False
    baseline: str = "moe"
    layer_bench: Optional[dict] = None  # run_layer_bench keyword arguments (no mohge config)
    # A representative layer shape (hidden >= 256, >= 4096 tokens) timed once per expert
    # backend: layer_bench keywords plus width_scale (MoHGE widths x it) and backends.
    layer_bench_representative: Optional[dict] = None
    kind: str = "comparison"  # comparison | ablation
    optional_runs: dict = field(default_factory=dict)  # added on request (e.g. --with-dense)

    def run_dicts(self, names: Optional[list[str]] = None) -> dict[str, dict]:
        """Full RunConfig mappings of the selected runs (base + run overrides)."""
        table = {**self.runs, **self.optional_runs}
        names = names or list(self.runs)
        out = {}
        for name in names:
            if name not in table:
                raise ConfigError(f"--runs: preset {self.name} has no run {name!r}; choose from "
                                  f"{', '.join(table)}")
            d = copy.deepcopy(self.base)
            for section, values in table[name].items():
                if isinstance(values, dict):
                    d.setdefault(section, {}).update(copy.deepcopy(values))
                else:
                    d[section] = values
            d["name"] = name
            out[name] = d
        return out


def _tiny_mohge(weighting: str) -> dict:
    cfg = MoHGEConfig.from_yaml(CONFIGS / "tiny_mohge.yaml").to_dict()
    cfg["router"]["expert_weighting"] = weighting
    return cfg


def _default() -> Preset:
    # The CPU-sized comparison: the paper's MoHGE-3B layer shape scaled down 16x (see
    # tiny_mohge.yaml): 8 groups x 2 experts of widths 24..80 vs 16 stock experts of width 64,
    # both top-2, 18.75% fewer routed parameters. Two ranks, EP=2 (gloo on CPU), so the
    # all-size allocation runs for real.
    base = dict(
        model=dict(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=64),
        parallel=dict(expert_parallel=2),
        data=dict(tokenizer="byte"),
        train=dict(iters=300, micro_batch_size=8, global_batch_size=16, lr=3e-3, min_lr=3e-4,
                   lr_warmup_iters=30),
        eval=dict(interval=100, iters=8),
        logging=dict(interval=25, progress_bar=False),
        checkpoint=dict(enabled=False),
    )
    stock = dict(kind="moe", num_experts=16, expert_hidden_size=64, topk=2, aux_loss_coeff=1e-2)
    return Preset(
        name="default",
        description="tiny GPT (4 layers, hidden 64) on the Python stdlib corpus, 300 steps, "
                    "2 ranks with EP=2: stock MoE vs MoHGE (renorm and paper weighting)",
        base=base,
        runs={"moe": {"moe": stock},
              "mohge": {"moe": dict(kind="mohge", mohge=_tiny_mohge("renorm"))},
              "mohge_paper": {"moe": dict(kind="mohge", mohge=_tiny_mohge("paper"))}},
        optional_runs={"dense": {"moe": dict(kind="dense"), "parallel": dict(expert_parallel=1),
                                 "model": dict(ffn_hidden_size=128)}},
        nproc=2,
        layer_bench=dict(hidden_size=64, tokens=1024, stock_num_experts=16, stock_width=64,
                         stock_topk=2, repeats=20, warmup=3),
        # The same layer 4x wider (hidden 256, widths 96..320 vs stock 256, as the paper's
        # 1024-hidden layer scaled 4x down), where GEMMs rather than per-call costs dominate.
        layer_bench_representative=dict(hidden_size=256, tokens=4096, stock_num_experts=16,
                                        stock_width=256, stock_topk=2, width_scale=4,
                                        repeats=10, warmup=2, backends=["local", "torch"]),
    )


def _paper_3b() -> Preset:
    # The paper's MoHGE-3B setting and its stock baseline (15 layers, hidden 1024, 64 experts,
    # Kg=4, K=6, widths 384..1280 vs 1024, 2 shared experts). For GPU clusters.
    layer = MoHGEConfig.from_yaml(CONFIGS / "paper_3b_layer.yaml").to_dict()
    renorm = copy.deepcopy(layer)
    renorm["router"]["expert_weighting"] = "renorm"
    base = dict(
        model=dict(num_layers=15, hidden_size=1024, num_attention_heads=16, seq_length=4096,
                   ffn_hidden_size=4096, precision="bf16", make_vocab_size_divisible_by=128),
        parallel=dict(expert_parallel=8),
        data=dict(tokenizer="byte"),
        train=dict(iters=20000, micro_batch_size=1, global_batch_size=512, lr=4.2e-4,
                   min_lr=4.2e-5, lr_warmup_iters=2000, weight_decay=0.1),
        eval=dict(interval=1000, iters=20),
        logging=dict(interval=50, progress_bar=False),
        checkpoint=dict(enabled=True, interval=2000),
    )
    stock = dict(kind="moe", num_experts=64, expert_hidden_size=1024, topk=6,
                 num_shared_experts=2, shared_expert_hidden_size=1024, aux_loss_coeff=1e-2)
    return Preset(
        name="paper-3b", description="the paper's MoHGE-3B vs its stock MoE baseline (GPUs)",
        base=base,
        runs={"moe": {"moe": stock},
              "mohge": {"moe": dict(kind="mohge", mohge=layer)},
              "mohge_renorm": {"moe": dict(kind="mohge", mohge=renorm)}},
        nproc=8, needs_gpu=True,
        layer_bench=dict(hidden_size=1024, tokens=8192, stock_num_experts=64, stock_width=1024,
                         stock_topk=6, repeats=20, warmup=5),
    )


def _ablation() -> Preset:
    # Shazeer et al. 2017, Table 6 in miniature: the noisy top-k router over 16 uniform
    # experts with no balancing loss, importance only, load only, both.
    base = copy.deepcopy(_default().base)
    base["parallel"] = dict(expert_parallel=1)
    base["train"]["iters"] = 200

    def noisy(w_imp: float, w_load: float) -> dict:
        return {"moe": dict(kind="moe", num_experts=16, expert_hidden_size=64, topk=2,
                            router="noisy_topk",
                            noisy_gating=dict(noise=True, importance_coeff=w_imp,
                                              load_coeff=w_load))}

    return Preset(
        name="load-balance-ablation",
        description="noisy top-k gating (16 experts, top-2): no loss / importance / load / both",
        base=base,
        runs={"no_loss": noisy(0.0, 0.0), "importance": noisy(0.1, 0.0),
              "load": noisy(0.0, 0.1), "both": noisy(0.1, 0.1)},
        nproc=1, baseline="no_loss", kind="ablation",
    )


PRESETS = {"default": _default, "paper-3b": _paper_3b, "load-balance-ablation": _ablation}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]()
