"""The router-mechanism screen preset (issue 21): its arms, the controls, --sizes, --order."""

import pytest

from megatron_mohge.bench import e2e
from megatron_mohge.bench.presets import PRE_SCREEN_ROUTING, SCREEN_SWEEPS, get_preset
from megatron_mohge.cli.bench import parse_sizes
from megatron_mohge.config import ConfigError, MoHGEConfig
from megatron_mohge.resources import config_path


def test_screen_arms_and_controls(tmp_path):
    p = get_preset("screen")
    runs = e2e.run_configs(p, tmp_path, seed=1234)
    assert {"moe", "mohge", "mohge_today", "moe_equal_total", "moe_strong_balance",
            "mohge_group_balance", "mohge_straight_through", "mohge_unnormalized",
            "mohge_lossfree", "mohge_pg_used", "mohge_assignments"} == set(runs)
    assert all(r.model.hidden_size == 48 and r.train.iters >= 1500 for r in runs.values())
    assert p.seeds == (1234, 1235, 1236) and p.jobs == 2
    # the controls: MoHGE's routed params in uniform experts; a balance loss as strong as
    # the pre-screen per_group 0.5
    eq, mohge = runs["moe_equal_total"], runs["mohge"]
    assert eq.moe.num_experts * eq.moe.expert_hidden_size == sum(mohge.moe.mohge.expert_widths)
    assert runs["moe_strong_balance"].moe.aux_loss_coeff == 0.5
    # mohge = the shipped defaults (tiny_mohge.yaml scaled to hidden 48)
    tiny = MoHGEConfig.from_yaml(config_path("tiny_mohge.yaml"))
    assert mohge.moe.mohge.router == tiny.router and mohge.moe.mohge.losses == tiny.losses
    assert mohge.moe.mohge.widths == [w * 48 // 64 for w in tiny.widths]
    # every mechanism arm is the pre-screen layer with exactly one thing switched
    today = runs["mohge_today"].moe.mohge
    for section, values in PRE_SCREEN_ROUTING.items():
        assert {k: getattr(getattr(today, section), k) for k in values} == values
    one_change = {"mohge_group_balance": ("losses", "group_balance_coeff"),
                  "mohge_straight_through": ("router", "group_gradient"),
                  "mohge_unnormalized": ("router", "expert_weighting"),
                  "mohge_assignments": ("losses", "group_loss_count")}
    for name, (section, field) in one_change.items():
        arm = runs[name].moe.mohge
        diff = [(s, f) for s in ("router", "losses") for f in vars(getattr(today, s))
                if getattr(getattr(arm, s), f) != getattr(getattr(today, s), f)]
        assert diff == [(section, field)], name
    assert p.comparison_pairs(list(runs)) == [(n, "moe") for n in runs if n != "moe"]


def test_sweep_arms_change_one_default_each(tmp_path):
    # the coefficient sweeps are the shipped defaults with one loss field 10x lower / higher,
    # trained only on request (the screen's default run list stays as committed)
    p = get_preset("screen")
    assert not set(SCREEN_SWEEPS) & set(p.runs)
    runs = e2e.run_configs(p, tmp_path, names=["mohge", *SCREEN_SWEEPS], seed=1234)
    ref = runs["mohge"].moe.mohge
    for name, (field, value) in SCREEN_SWEEPS.items():
        arm = runs[name].moe.mohge
        assert arm.router == ref.router and arm.widths == ref.widths, name
        diff = {f: getattr(arm.losses, f) for f in vars(ref.losses)
                if getattr(arm.losses, f) != getattr(ref.losses, f)}
        assert diff == {field: value}, name
        assert value in (getattr(ref.losses, field) / 10, getattr(ref.losses, field) * 10)


def test_sizes_choose_the_screen_and_study_sizes():
    two = get_preset("screen", [32, 48])
    assert "moe_h32" in two.runs and "mohge_h48" in two.runs and "moe" not in two.runs
    pairs = dict(two.comparison_pairs(["moe_h32", "mohge_h32", "moe_h48", "mohge_h48",
                                       "moe_equal_total_h48"]))
    assert pairs == {"mohge_h32": "moe_h32", "mohge_h48": "moe_h48",
                     "moe_equal_total_h48": "moe_h48"}
    study = get_preset("study", [32, 64])
    assert set(study.study["sizes"]) == {"h32", "h64"} and "moe_h64" in study.runs
    with pytest.raises(ConfigError, match="--sizes: preset default has one fixed size"):
        get_preset("default", [48])
    with pytest.raises(ConfigError, match="multiple of 16"):
        get_preset("screen", [40])
    with pytest.raises(ConfigError, match="--sizes"):
        parse_sizes("48,x")
    assert parse_sizes("32,48") == [32, 48] and parse_sizes(None) is None


def test_order_run_trains_each_arm_s_seeds_together():
    by_seed = {s: {n: f"{n}{s}" for n in ("a", "b")} for s in (1, 2)}
    assert [q[:2] for q in e2e.training_queue(by_seed, ["a", "b"], [1, 2], "seed")] == [
        (1, "a"), (1, "b"), (2, "a"), (2, "b")]
    assert [q[:2] for q in e2e.training_queue(by_seed, ["a", "b"], [1, 2], "run")] == [
        (1, "a"), (2, "a"), (1, "b"), (2, "b")]
    with pytest.raises(ConfigError, match="--order"):
        e2e.training_queue(by_seed, ["a"], [1], "size")
