"""The decision-study tooling (issue 22): the paper's layer shape in the study and screen
presets, the named control arms, and the token budget --tokens-per-param."""

import json
import math
import random
import re
from pathlib import Path

import pytest

from megatron_mohge.bench import e2e
from megatron_mohge.bench.arms import (ARMS, SHAPE_TABLE, SHAPES, measured_activated_fraction,
                                       get_shape, near_equal_widths)
from megatron_mohge.bench.budget import budget_iters
from megatron_mohge.bench.presets import STUDY_HIDDEN, get_preset
from megatron_mohge.config import ConfigError, MoHGEConfig
from megatron_mohge.accounting import analytic_param_counts, resolve_vocab
from megatron_mohge.resources import config_path

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = Path(__file__).parent / "data" / "preset_runs_tiny_golden.json"


def _routed(run) -> int:
    return analytic_param_counts(run, resolve_vocab(run)[0]).routed_experts


def _total(run) -> int:
    return analytic_param_counts(run, resolve_vocab(run)[0]).total


def _study_runs(tmp_path, shape, sizes=STUDY_HIDDEN, **kw):
    p = get_preset("study", list(sizes), shape)
    names = [f"{a}_h{h}" for h in sizes for a in ARMS]
    return p, e2e.run_configs(p, tmp_path, names=names, seed=1, **kw)


def test_paper_shape_is_the_paper_layer_scaled_to_hidden(tmp_path):
    paper, tiny = MoHGEConfig.paper_3b(), MoHGEConfig.from_yaml(config_path("tiny_mohge.yaml"))
    p, runs = _study_runs(tmp_path, "paper")
    assert p.shape == "paper" and "paper shape: 8 groups x 8 experts" in p.description
    for h in STUDY_HIDDEN:
        moe, mohge = runs[f"moe_h{h}"], runs[f"mohge_h{h}"]
        m = mohge.moe.mohge
        # 8 x 8 experts, widths 384..1280 step 128 relative to the stock width 1024 = hidden
        assert m.experts_per_group == [8] * 8 and (m.group_topk, m.topk) == (4, 6)
        assert m.widths == [h * k // 8 for k in range(3, 11)]
        assert [w * 1024 // h for w in m.widths] == paper.widths
        assert (m.num_shared_experts, m.shared_expert_width) == (2, h)
        # the routing: the shipped CPU defaults (tiny_mohge.yaml), as in the tiny shape
        assert m.router == tiny.router and m.losses == tiny.losses
        # stock: 64 experts of width hidden, the same K and shared experts
        s = moe.moe
        assert (s.kind, s.num_experts, s.expert_hidden_size, s.topk) == ("stock", 64, h, 6)
        assert (s.num_shared_experts, s.shared_expert_width) == (2, h)
        assert _routed(mohge) / _routed(moe) == 0.8125
        assert moe.model == mohge.model and moe.train == mohge.train
    with pytest.raises(ConfigError, match="hidden 40 must be a multiple of 16"):
        get_preset("study", [40], "paper")


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("ep", [2, 4])
def test_all_size_allocation_is_exact_at_ep2_and_ep4(shape, ep):
    """Every EP rank holds every width in equal numbers: the same routed params and the same
    work whatever the group popularity (tests/test_allocation.py's check)."""
    for h in STUDY_HIDDEN:
        for arm in ("mohge", "mohge_uniform"):
            cfg = MoHGEConfig.from_dict(get_shape(shape).arms(h)[arm]["mohge"])
            cfg.check_parallel_layout(ep)
            plan = cfg.allocation_plan(ep)
            assert plan.strategy == "all-size" and plan.imbalance == 1.0
            params = cfg.routed_params_per_expert(h)
            by_rank = [sum(params[plan.canonical_id(g, i)] for g, i in plan.local_experts(r))
                       for r in range(ep)]
            assert len(set(by_rank)) == 1 and sum(by_rank) == sum(params)
            rng = random.Random(ep * h)
            for _ in range(3):
                load = [rng.uniform(1, 100) for _ in cfg.widths]
                flops = plan.rank_flops([load[g] for g in cfg.expert_group])
                assert max(flops) == pytest.approx(min(flops))


@pytest.mark.parametrize("shape", SHAPES)
def test_control_arms(tmp_path, shape):
    p, runs = _study_runs(tmp_path, shape)
    k = runs[f"moe_h{STUDY_HIDDEN[0]}"].moe.topk
    for h in STUDY_HIDDEN:
        moe, mohge = runs[f"moe_h{h}"], runs[f"mohge_h{h}"]
        m = mohge.moe.mohge
        eq_total, eq_act = runs[f"moe_equal_total_h{h}"], runs[f"moe_equal_activated_h{h}"]
        uniform = runs[f"mohge_uniform_h{h}"].moe.mohge
        # moe_equal_total: MoHGE's routed params exactly (uniform width 0.8125 x hidden)
        assert eq_total.moe.expert_hidden_size == h * 13 // 16
        assert _routed(eq_total) == _routed(mohge)
        # moe_equal_activated: K picks of the measured fraction of the stock width
        w = eq_act.moe.expert_hidden_size
        assert abs(k * w - k * SHAPE_TABLE[shape].activated_fraction * h) <= k / 2
        assert w < eq_total.moe.expert_hidden_size
        for ctl in (eq_total, eq_act):  # only the width differs from stock
            assert ctl.moe.topk == moe.moe.topk and ctl.moe.num_experts == moe.moe.num_experts
            assert ctl.moe.shared_expert_width == moe.moe.shared_expert_width
        # mohge_uniform: the two-level router over near-equal widths at MoHGE's routed params
        g = m.num_groups
        assert uniform.widths == sorted(set(uniform.widths))  # strictly increasing
        assert uniform.widths[-1] - uniform.widths[0] == g  # offsets -g/2..-1, 1..g/2
        assert sum(uniform.expert_widths) == sum(m.expert_widths)
        assert _routed(runs[f"mohge_uniform_h{h}"]) == _routed(mohge)
        for f in ("experts_per_group", "group_topk", "topk", "num_shared_experts",
                  "shared_expert_width", "router", "losses"):
            assert getattr(uniform, f) == getattr(m, f), f
    # every arm is compared with the stock run of its own size
    assert dict(p.comparison_pairs(list(runs))) == {
        f"{a}_h{h}": f"moe_h{h}" for h in STUDY_HIDDEN for a in ARMS if a != "moe"}
    assert set(p.study["kinds"]) == set(ARMS)


def test_arm_names_read_the_same_in_every_preset_and_shape(tmp_path):
    for shape in SHAPES:
        assert set(get_shape(shape).arms(48)) == set(ARMS)
        screen = get_preset("screen", None, shape)
        assert set(ARMS) <= set(screen.runs) | set(screen.optional_runs)
        runs = e2e.run_configs(screen, tmp_path, names=list(ARMS))
        study = _study_runs(tmp_path, shape, sizes=[48])[1]
        for arm in ARMS:  # the screen's arm is the study's arm of the same size
            assert runs[arm].moe == study[f"{arm}_h48"].moe, (shape, arm)
        two = get_preset("screen", [32, 48], shape)
        assert "mohge_uniform_h32" in two.optional_runs
    with pytest.raises(ConfigError, match="no run 'moe_equal_total'.*moe_equal_total_h48"):
        get_preset("study", None, "paper").run_dicts(["moe_equal_total"])


def test_near_equal_widths():
    assert near_equal_widths(39, [4] * 4) == [37, 38, 40, 41]
    assert near_equal_widths(39, [8] * 8) == [35, 36, 37, 38, 40, 41, 42, 43]
    assert near_equal_widths(10, [2] * 3) == [9, 10, 11]
    with pytest.raises(ConfigError, match="equal group sizes"):
        near_equal_widths(39, [4, 8])


@pytest.mark.parametrize("shape", SHAPES)
def test_stored_activated_fraction_is_its_committed_measurement(shape):
    """Each shape's activated_fraction is the mean over its committed sources of MoHGE's
    activated routed params per token / stock's (arm mohge = the shipped defaults)."""
    s = SHAPE_TABLE[shape]
    files = [ROOT / f for f in s.activated_fraction_sources]
    assert round(measured_activated_fraction(files), 3) == s.activated_fraction


def test_measured_activated_fraction_pairs_runs_by_size(tmp_path):
    def run(act):
        return {"activated_routed_params_per_token": act}

    path = tmp_path / "results.json"
    path.write_text(json.dumps({"runs": {"moe_h32": run(100), "mohge_h32": run(80),
                                         "moe_h48": run(200), "mohge_h48": run(150),
                                         "mohge_uniform_h32": run(1), "mohge_h80": run(5)}}))
    assert measured_activated_fraction([path]) == pytest.approx((0.8 + 0.75) / 2)
    path.write_text(json.dumps({"runs": {"moe": run(100)}}))
    with pytest.raises(ConfigError, match="no \\(mohge, moe\\) run pairs"):
        measured_activated_fraction([path])


def test_tiny_shape_leaves_the_presets_as_they_were():
    """--shape tiny (and no --shape) builds the study and screen runs as before issue 22
    (tests/data/preset_runs_tiny_golden.json, written by the code before it), and the
    committed screen's recorded configs."""
    golden = json.loads(GOLDEN.read_text())
    for key, old in golden.items():
        name, _, sizes = key.partition("@")
        sizes = [int(s) for s in sizes.split(",")] if sizes else None
        for shape in (None, "tiny"):
            p = get_preset(name, sizes, shape)
            assert list(p.runs) == list(old["runs"]), key
            assert json.loads(json.dumps(p.run_dicts())) == old["runs"], key
            assert (p.baseline, p.description, p.size_baselines) == (
                old["baseline"], old["description"], old["size_baselines"])
            if old["study"]:
                assert {n: m for n, m in p.study["runs"].items() if n in p.runs} == \
                    old["study"]["runs"]
                assert p.comparison_pairs(list(p.runs)) == [
                    (f"mohge_{s}", f"moe_{s}") for s in old["study"]["sizes"]]
    committed = json.loads((ROOT / "results" / "screen-stdlib" / "results.json").read_text())
    names = list(committed["config"]["runs"])
    assert e2e._comparable({"runs": get_preset("screen", None, "tiny").run_dicts(names)}) == \
        e2e._comparable({"runs": committed["config"]["runs"]})


def test_tokens_per_param_sets_the_steps_from_the_stock_params(tmp_path):
    sizes = [32, 48]
    p, runs = _study_runs(tmp_path, "paper", sizes, tokens_per_param=20,
                          data=["/data/corpus"])
    for h in sizes:
        stock = _total(runs[f"moe_h{h}"])
        want = math.ceil(20 * stock / (16 * 64))  # tokens per step: 16 sequences of 64
        for a in ARMS:
            r = runs[f"{a}_h{h}"]
            assert r.train.iters == want, (a, h)  # every arm of a size: the same tokens
            assert r.train.lr_warmup_iters == round(want / 10)  # the study's 10% warmup
            assert r.data.path == ["/data/corpus"]
    assert runs["moe_h32"].train.iters < runs["moe_h48"].train.iters
    # the tiny study at hidden 48: 20 x 501,168 params / 1,024 tokens a step
    tiny = get_preset("study", [48])
    assert budget_iters(tiny, ["mohge_h48"], 20)["mohge_h48"] == {
        "iters": 9789, "tokens": 9789 * 1024, "budget_params": 501168, "budget_run": "moe_h48"}
    # one size: the screen's arms train on the stock params of the screen's size
    screen = e2e.run_configs(get_preset("screen"), tmp_path, names=["moe", "mohge_uniform"],
                             tokens_per_param=3)
    assert {r.train.iters for r in screen.values()} == {math.ceil(3 * 501168 / 1024)}


def test_the_budget_is_part_of_the_results_identity(tmp_path):
    p = get_preset("study", [48], "paper")
    ident = {x: e2e.bench_identity(p, ["moe_h48"], data=None, tokenizer=None, seeds=[1],
                                   iters=None, layer_bench=False, tokens_per_param=x)
             for x in (20, 10)}
    assert ident[20]["tokens_per_param"] == 20.0 and ident[20]["shape"] == "paper"
    (tmp_path / "results.json").write_text(json.dumps({"config": ident[20]}))
    e2e.check_out_dir(tmp_path, ident[20])
    with pytest.raises(ConfigError, match="tokens_per_param 20.0 -> 10.0"):
        e2e.check_out_dir(tmp_path, ident[10])
    plain = e2e.bench_identity(p, ["moe_h48"], data=None, tokenizer=None, seeds=[1], iters=None,
                               layer_bench=False)  # the same bench without a token budget
    with pytest.raises(ConfigError, match="tokens_per_param 20.0 -> None"):
        e2e.check_out_dir(tmp_path, plain)
    from megatron_mohge.bench.resume import load_sources, reusable_figures

    with pytest.raises(ConfigError, match=r"--resume: .*\(tokens_per_param 20.0 -> None\)"):
        reusable_figures(load_sources(tmp_path, True), plain, e2e._comparable)
    # without the new options the identity has no new keys (earlier results.json stay valid)
    old = e2e.bench_identity(get_preset("study"), None, data=None, tokenizer=None, seeds=[1],
                             iters=None, layer_bench=False)
    assert "tokens_per_param" not in old and "shape" not in old


@pytest.mark.parametrize("argv, match", [
    (["--preset", "study", "--iters", "5", "--tokens-per-param", "20"],
     r"--tokens-per-param 20.0 and --iters 5 both set the steps of every run; give one of them"),
    (["--preset", "study", "--tokens-per-param", "0"],
     r"--tokens-per-param 0.0: give a positive number"),
    (["--preset", "default", "--shape", "paper"],
     r"--shape: preset default has one fixed layer shape; --shape applies to study and screen"),
    (["--preset", "study", "--shape", "paper", "--runs", "mohge"],
     r"--runs: preset study has no run 'mohge'"),
])
def test_option_errors_are_one_line(tmp_path, capsys, argv, match):
    from megatron_mohge.cli.bench import main

    assert main([*argv, "--dry-run", "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mohge-bench: ") and re.search(match, err), err
    assert not (tmp_path / "b").exists()


def test_cli_dry_run_composes_the_options(tmp_path, capsys):
    from megatron_mohge.cli.bench import main

    out = tmp_path / "b"
    assert main(["--preset", "study", "--shape", "paper", "--sizes", "32,48", "--runs",
                 "moe_h32,mohge_uniform_h48", "--tokens-per-param", "2", "--seeds", "1",
                 "--data", "corpus.txt", "--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "# mohge_uniform_h48: " in text and "of moe_h48" in text
    assert {f.name for f in (out / "configs").iterdir()} == {
        "moe_h32.seed1234.yaml", "mohge_uniform_h48.seed1234.yaml"}


def test_study_analysis_reports_the_control_arms():
    from megatron_mohge.bench.aggregate import aggregate_runs
    from megatron_mohge.bench.study import analyze

    p = get_preset("study", [32, 48, 80], "paper")
    per_seed = {}
    for name, m in p.study["runs"].items():
        if m["kind"] not in ("moe", "mohge", "moe_equal_total"):
            continue
        h = int(m["size"][1:])
        n = 52 * h * h * (1.0 if m["kind"] == "moe" else 0.8125)
        per_seed[name] = [{"seed": s, "heldout_loss": 6 - 0.3 * math.log(n) + 0.01 * s,
                           "total_params": n, "activated_params_per_token": n / 8}
                          for s in (1, 2)]
    study = analyze({"seeds": [1, 2], "runs": aggregate_runs(per_seed)}, p.study,
                    bootstrap_samples=50)
    assert list(study["kinds"]) == ["moe", "moe_equal_total", "mohge"]  # untrained: left out
    assert set(study["efficiency"]) == {"mohge_vs_moe", "moe_equal_total_vs_moe"}


def test_report_names_the_shape_and_the_budget():
    from megatron_mohge.bench.report import markdown_report

    head = markdown_report({"preset": "study", "shape": "paper", "runs": {},
                            "config": {"tokens_per_param": 20.0},
                            "budget": {"moe_h32": {"iters": 16566},
                                       "moe_h48": {"iters": 36969}}}).split("\n")[2]
    assert head.startswith("preset `study`, layer shape `paper`, 20 tokens per stock parameter "
                           "(16,566, 36,969 steps)")
    assert "shape" not in markdown_report({"preset": "study", "shape": "tiny", "runs": {}})
