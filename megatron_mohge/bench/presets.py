"""Benchmark presets: named sets of runs sharing one backbone, data, seed and token budget.

A preset is a base run mapping (RunConfig fields) plus per-run overrides of ``moe``, the
world size the runs launch with, and the layer-microbenchmark shape. ``moe`` is the stock
Megatron baseline in every comparison preset.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Optional

from megatron_mohge.bench.arms import CONTROL_ARMS, DEFAULT_SHAPE, Shape, get_shape
from megatron_mohge.config import RELEASED_INTRA_GROUP_COEFF, ConfigError, MoHGEConfig
from megatron_mohge.resources import config_path


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
    seeds: tuple = (1234,)  # every run is trained once per seed (paired across runs)
    jobs: int = 1  # runs trained at once (single-rank runs on separate cores)
    # scaling study: run name -> {"kind": model kind, "size": size label}; None otherwise
    study: Optional[dict] = None
    # runs at several sizes without a study (screen --sizes): run name -> size label; each
    # run is compared with the baseline arm of its own size (``size_baselines``)
    size_of: dict = field(default_factory=dict)
    size_baselines: dict = field(default_factory=dict)  # size label -> baseline run name
    shape: str = DEFAULT_SHAPE  # layer shape of the sized presets (bench.arms.SHAPES)

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


    def baseline_of(self, name: str) -> str:
        """The run ``name`` is compared with, whose params also set its token budget
        (``bench.budget``): in a study the baseline kind's run of its size, in a screen at
        several sizes its size's baseline, else ``baseline``."""
        if self.study:
            members, base_kind = self.study["runs"], self.study["baseline_kind"]
            size = members[name]["size"]
            return next(n for n, m in members.items()
                        if m["kind"] == base_kind and m["size"] == size)
        if self.size_of:
            return self.size_baselines[self.size_of[name]]
        return self.baseline

    def comparison_pairs(self, names: list[str]) -> list[tuple[str, str]]:
        """(run, baseline_of(run)) pairs compared seed by seed, for the runs of ``names``
        whose baseline is among them too (a study's pairs in its member order); a preset of
        one size pairs every run with ``baseline``."""
        if not (self.study or self.size_of):
            return [(n, self.baseline) for n in names if n != self.baseline]
        order = [n for n in self.study["runs"] if n in names] if self.study else names
        pairs = [(n, self.baseline_of(n)) for n in order]
        return [(n, b) for n, b in pairs if n != b and b in names]


def _tiny_mohge(weighting: str) -> dict:
    cfg = MoHGEConfig.from_yaml(config_path("tiny_mohge.yaml")).to_dict()
    cfg["router"]["expert_weighting"] = weighting
    return cfg


# The default comparison's budget: 3 seeds x 2 runs x DEFAULT_ITERS steps plus the layer
# microbenchmark. Its trainings cost 570-580 CPU-s (results/default-*, 78-112 CPU-s a run), so
# about 5 min of 2 idle cores plus start-up; the recorded wall times, 22-23 min, were on a
# loaded machine.
DEFAULT_SEEDS = (1234, 1235, 1236)
DEFAULT_ITERS = 300


def _default() -> Preset:
    # The CPU-sized comparison: the paper's MoHGE-3B layer shape scaled down 16x (see
    # tiny_mohge.yaml): 4 groups x 4 experts of widths 28..76 vs 16 stock experts of width 64,
    # both top-2, 18.75% fewer routed parameters. Two ranks, EP=2 (gloo on CPU), so the
    # all-size allocation runs for real. MoHGE with the paper's expert weighting is optional
    # (--runs moe,mohge,mohge_paper): three seeds of two runs is what fits the budget.
    base = dict(
        model=dict(num_layers=4, hidden_size=64, num_attention_heads=4, seq_length=64),
        parallel=dict(expert_parallel=2),
        data=dict(tokenizer="byte"),
        train=dict(iters=DEFAULT_ITERS, micro_batch_size=8, global_batch_size=16, lr=3e-3,
                   min_lr=3e-4, lr_warmup_iters=30),
        # periodic evaluations on 8 batches (the curve); the reported held-out loss on 64
        # batches = 65,536 tokens, the same samples for every seed (data.valid_seed)
        eval=dict(interval=100, iters=8, final_iters=64),
        logging=dict(interval=25, progress_bar=False),
        checkpoint=dict(enabled=False),
    )
    # The presets spell stock runs as they always did (kind "moe", shared_expert_hidden_size:
    # aliases of kind "stock" / shared_expert_width). results.json records these dicts
    # verbatim ("config"), so the records of earlier benches stay identical.
    stock = dict(kind="moe", num_experts=16, expert_hidden_size=64, topk=2, aux_loss_coeff=1e-2)
    return Preset(
        name="default",
        description=f"tiny GPT (4 layers, hidden 64) on the Python stdlib corpus, "
                    f"{DEFAULT_ITERS} steps, 2 ranks with EP=2, {len(DEFAULT_SEEDS)} seeds: "
                    f"stock MoE vs MoHGE",
        base=base,
        runs={"moe": {"moe": stock},
              "mohge": {"moe": dict(kind="mohge", mohge=_tiny_mohge("renorm"))}},
        optional_runs={"mohge_paper": {"moe": dict(kind="mohge", mohge=_tiny_mohge("paper"))},
                       "dense": {"moe": dict(kind="dense"), "parallel": dict(expert_parallel=1),
                                 "model": dict(ffn_hidden_size=128)}},
        nproc=2, seeds=DEFAULT_SEEDS,
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
    layer = MoHGEConfig.paper_3b().to_dict()
    released = MoHGEConfig.paper_3b(released=True).to_dict()
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
              "mohge_released": {"moe": dict(kind="mohge", mohge=released)}},
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


def _hybrid() -> Preset:
    # The default comparison on Megatron's HybridModel (the class megatron-core 0.19 points
    # GPTModel users to): "*E*E*E*E" is the default GPT's 4 attention and 4 MoE blocks as 8
    # hybrid layers; same runs, data, budget and seeds (the layer bench does not depend on it).
    d = _default()
    base = copy.deepcopy(d.base)
    base["model"].update(kind="hybrid", hybrid_layer_pattern="*E*E*E*E", num_layers=8)
    return Preset(name="hybrid", description="the default comparison (stock MoE vs MoHGE, 2 "
                  "ranks with EP=2) as a HybridModel, pattern *E*E*E*E",
                  base=base, runs=d.runs, nproc=d.nproc, seeds=d.seeds)


def _balance() -> Preset:
    # Issue "balanced experts": the default comparison's backbone and budget, with every
    # intra-group balancing method of MoHGEConfig.losses side by side against the stock MoE
    # (Megatron's aux loss 1e-2): the paper's intra-group aux loss in both modes at the
    # reference coefficient and 10x / 100x, global-batch statistics, and loss-free balancing.
    d = _default()

    def mohge(**losses) -> dict:
        cfg = _tiny_mohge("renorm")
        cfg["losses"].update(losses)
        return {"moe": dict(kind="mohge", mohge=cfg)}

    a_e = RELEASED_INTRA_GROUP_COEFF  # multiples of the released a_E
    runs = {"moe": d.runs["moe"]}
    for mode, tag in (("paper", "aux"), ("per_group", "pg")):
        for mult, suffix in ((1, ""), (10, "_x10"), (100, "_x100")):
            runs[f"mohge_{tag}{suffix}"] = mohge(intra_group_mode=mode,
                                                 intra_group_coeff=a_e * mult)
    runs["mohge_aux_global"] = mohge(intra_group_mode="paper", intra_group_coeff=a_e,
                                     global_batch_stats=True)
    runs["mohge_pg_x10_global"] = mohge(intra_group_mode="per_group", intra_group_coeff=a_e * 10,
                                        global_batch_stats=True)
    runs["mohge_lossfree"] = mohge(intra_group_coeff=0.0, expert_bias_update_rate=1e-2)
    runs["mohge_lossfree_pg_x10"] = mohge(intra_group_mode="per_group",
                                          intra_group_coeff=a_e * 10,
                                          expert_bias_update_rate=1e-2)
    return Preset(
        name="balance",
        description="balancing methods inside groups (paper aux loss in both modes at 1x/10x/"
                    "100x, global-batch statistics, loss-free bias) vs stock MoE; default "
                    "preset's backbone and budget, 2 ranks with EP=2",
        base=d.base, runs=runs, nproc=d.nproc)



STUDY_HIDDEN = (32, 48, 80)
SCREEN_HIDDEN = (48,)
# Steps of every study run: 18 runs, two at a time, fit ~40 minutes on 2 idle cores (CPU
# seconds per step measured at each size); the last 20% of the steps move the train loss by
# a few percent (reported as the plateau figure).
STUDY_ITERS = 1500  # head dim 8 .. 20; total params in the study report


def _long_base() -> dict:
    """The default backbone recipe (4 layers, seq 64, 4 heads, same optimizer and data) for
    STUDY_ITERS steps on one rank (EP=1: the loss does not depend on EP)."""
    base = copy.deepcopy(_default().base)
    base["parallel"] = dict(expert_parallel=1)
    base["train"].update(iters=STUDY_ITERS, lr_warmup_iters=STUDY_ITERS // 10)
    base["eval"] = dict(interval=0, iters=8, final_iters=64)
    base["logging"]["interval"] = 50
    return base


def _screen_base() -> dict:
    """The study's recipe with one micro-batch per step (the same 16 x 64 tokens a step; the
    aux-loss statistics see the whole step): a third less CPU time per step on 2 cores."""
    base = _long_base()
    base["train"]["micro_batch_size"] = base["train"]["global_batch_size"]
    return base


def _check_sizes(sizes) -> tuple:
    sizes = tuple(sizes)
    if not sizes or any(not isinstance(h, int) or isinstance(h, bool) or h < 16 for h in sizes):
        raise ConfigError(f"--sizes: give hidden sizes (integers >= 16), got {list(sizes)}")
    if len(set(sizes)) != len(sizes):
        raise ConfigError(f"--sizes: sizes repeat in {list(sizes)}")
    return sizes


def _shape_note(shape: Shape) -> str:
    """Description suffix of a non-default shape (the tiny descriptions stay as they were)."""
    if shape.name == DEFAULT_SHAPE:
        return ""
    lay = shape.layout
    return (f"; {shape.name} shape: {len(lay['widths'])} groups x {lay['experts_per_group'][0]} "
            f"experts, Kg={lay['group_topk']}, K={lay['topk']}, "
            f"{lay['num_shared_experts']} shared experts")


def _study(sizes=STUDY_HIDDEN, shape=None) -> Preset:
    # Stock MoE (as many experts as MoHGE, width = hidden) vs MoHGE with the shape's widths
    # scaled to hidden (0.8125x the stock routed params at every size), at three widths; the
    # control arms (bench.arms) on request (--runs moe_equal_total_h48,...). Two runs at a
    # time on two cores. Long enough that the last 20% of the steps move the train loss by
    # only a few percent (reported).
    shape = get_shape(shape)
    sizes = _check_sizes(sizes)
    base = _long_base()
    runs, optional, members = {}, {}, {}
    for h in sizes:
        model = dict(hidden_size=h)
        for arm, moe in shape.arms(h).items():
            name = f"{arm}_h{h}"
            (optional if arm in CONTROL_ARMS else runs)[name] = {"moe": moe, "model": model}
            members[name] = {"kind": arm, "size": f"h{h}"}
    kinds = list(dict.fromkeys(m["kind"] for m in members.values()))
    return Preset(
        name="study",
        description=f"scaling study: stock MoE vs MoHGE (0.81x routed params) at hidden "
                    f"{'/'.join(map(str, sizes))}, {STUDY_ITERS} steps, 3 seeds"
                    + _shape_note(shape),
        base=base, runs=runs, optional_runs=optional, nproc=1, jobs=2,
        seeds=(1234, 1235, 1236),
        study={"runs": members, "kinds": kinds, "baseline_kind": "moe",
               "sizes": [f"h{h}" for h in sizes]},
        baseline=f"moe_h{48 if 48 in sizes else sizes[0]}", shape=shape.name,
    )


def _screen(sizes=SCREEN_HIDDEN, shape=None) -> Preset:
    # Issue "MoHGE routing that learns": which router mechanism closes the quality gap? The
    # study's recipe at one size; every mohge_* arm is the pre-screen MoHGE (tiny_mohge.yaml
    # with PRE_SCREEN_ROUTING) with one mechanism switched, the proposed defaults, and two
    # stock controls: moe_equal_total (16 experts of width 0.8125 x hidden: MoHGE's routed
    # params) and moe_strong_balance (Megatron's aux loss at 0.5, as strong as today's
    # per_group intra-group loss: the cost of regularisation alone).
    # The other two control arms (moe_equal_activated, mohge_uniform: bench.arms) on request.
    shape = get_shape(shape)
    sizes = _check_sizes(sizes)
    base = _screen_base()
    runs, optional, size_of, baselines = {}, {}, {}, {}
    for h in sizes:
        arms = _screen_arms(h, shape)
        for arm, moe in arms.items():
            name = arm if len(sizes) == 1 else f"{arm}_h{h}"
            table = optional if arm in SCREEN_OPTIONAL_ARMS else runs
            table[name] = {"moe": moe, "model": dict(hidden_size=h)}
            size_of[name] = f"h{h}"
        baselines[f"h{h}"] = "moe" if len(sizes) == 1 else f"moe_h{h}"
    return Preset(
        name="screen",
        description=f"router-mechanism screen: stock MoE, today's MoHGE, each mechanism alone, "
                    f"the proposed defaults and two stock controls at hidden "
                    f"{'/'.join(map(str, sizes))}, {STUDY_ITERS} steps, 3 seeds"
                    + _shape_note(shape),
        base=base, runs=runs, optional_runs=optional, nproc=1, jobs=2,
        seeds=(1234, 1235, 1236), baseline=baselines[f"h{sizes[0]}"], kind="screen",
        size_of=size_of, size_baselines=baselines, shape=shape.name)


# The pre-screen MoHGE layer (arm mohge_today): tiny_mohge.yaml's routing before the screen
# chose new defaults (the released a_G start schedule counting selections, the per_group
# intra-group loss at 0.5, renorm weights without a group-gradient path).
PRE_SCREEN_ROUTING = dict(
    router=dict(expert_weighting="renorm", group_gradient="none"),
    losses=dict(group_coeff=0.01, group_start_fraction=0.5, group_loss_count="selections",
                group_balance_coeff=0.0, intra_group_coeff=0.5, intra_group_mode="per_group",
                expert_bias_update_rate=0.0))


# One-at-a-time sweeps around the chosen defaults (issue item 2c: coefficients swept):
# arm -> (losses field, value); the defaults are expert_bias_update_rate 1e-2 and
# group_balance_coeff 1e-2, so each field is tried 10x lower and 10x higher.
SCREEN_SWEEPS = {
    "mohge_bias_1e-3": ("expert_bias_update_rate", 1e-3),
    "mohge_bias_1e-1": ("expert_bias_update_rate", 1e-1),
    "mohge_gbal_1e-3": ("group_balance_coeff", 1e-3),
    "mohge_gbal_1e-1": ("group_balance_coeff", 1e-1),
}
# Arms added after the committed screens (the controls, the sweeps): trained on request
# (--runs), so the screen's default runs (and the identity of its results) stay as they were.
SCREEN_OPTIONAL_ARMS = ("moe_equal_activated", "mohge_uniform", *SCREEN_SWEEPS)


def _screen_arms(hidden: int, shape: Shape) -> dict:
    """``moe`` section of every screen arm at ``hidden`` (width multiple of 16)."""
    def mohge(router=None, **losses) -> dict:
        cfg = shape.mohge(hidden)
        for section, values in PRE_SCREEN_ROUTING.items():
            cfg[section].update(copy.deepcopy(values))
        cfg["router"].update(router or {})
        cfg["losses"].update(losses)
        return dict(kind="mohge", mohge=cfg)

    def swept(field: str, value: float) -> dict:
        cfg = shape.mohge(hidden)  # the shipped defaults with one loss field changed
        cfg["losses"][field] = value
        return dict(kind="mohge", mohge=cfg)

    arms = shape.arms(hidden)
    return {
        "moe": arms["moe"],
        "mohge_today": mohge(),
        # a. group balance on use from step 0 (cost steering unchanged)
        "mohge_group_balance": mohge(group_balance_coeff=1e-2),
        # b. a gradient path for the group gate when the K picks share a group
        "mohge_unnormalized": mohge(router=dict(expert_weighting="unnormalized")),
        "mohge_straight_through": mohge(router=dict(group_gradient="straight_through")),
        # c. intra-group balancing that does not flatten the expert gate
        "mohge_lossfree": mohge(intra_group_coeff=0.0, expert_bias_update_rate=1e-2),
        "mohge_pg_used": mohge(intra_group_mode="per_group_used", intra_group_coeff=1e-2),
        # d. the group (cost) loss counting assignments
        "mohge_assignments": mohge(group_loss_count="assignments"),
        "mohge": arms["mohge"],  # the shipped defaults (tiny_mohge.yaml's routing)
        "moe_equal_total": arms["moe_equal_total"],
        "moe_strong_balance": shape.stock(hidden, aux=0.5),
        "moe_equal_activated": arms["moe_equal_activated"],
        "mohge_uniform": arms["mohge_uniform"],
        **{arm: swept(*change) for arm, change in SCREEN_SWEEPS.items()},
    }


PRESETS = {"default": _default, "study": _study, "screen": _screen, "balance": _balance,
           "paper-3b": _paper_3b, "load-balance-ablation": _ablation, "hybrid": _hybrid}
SIZED_PRESETS = ("study", "screen")  # presets whose sizes --sizes and shape --shape choose


def get_preset(name: str, sizes: Optional[list[int]] = None,
               shape: Optional[str] = None) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    kwargs: dict = {}
    for option, value, key in (("--sizes", sizes, "sizes"), ("--shape", shape, "shape")):
        if value is None:
            continue
        if name not in SIZED_PRESETS:
            what = "one fixed size" if key == "sizes" else "one fixed layer shape"
            raise ConfigError(f"{option}: preset {name} has {what}; {option} applies to "
                              f"{' and '.join(SIZED_PRESETS)}")
        kwargs[key] = value
    return PRESETS[name](**kwargs)

