"""Run names mean one thing in every bench preset (docs/results-json.md, "Run names"):
``mohge`` is the shipped layer's routing (the package defaults), ``mohge_paper`` the same
with only the released expert weighting, ``mohge_released`` the released router and losses,
``moe`` Megatron's stock layer."""

from __future__ import annotations

import re

import pytest

from megatron_mohge.bench.presets import get_preset
from megatron_mohge.config import MoHGEConfig
from megatron_mohge.config.layer import RELEASED_ROUTING
from megatron_mohge.resources import config_path

ROUTING = ("router", "losses")


def _shipped(name: str) -> dict:
    return MoHGEConfig.from_yaml(config_path(name)).to_dict()


def _mohge_runs(preset) -> dict:
    return {n: r["moe"]["mohge"] for n, r in preset.runs.items()
            if n == "mohge" or re.fullmatch(r"mohge_h\d+", n)}


@pytest.mark.parametrize("name,layer", [("default", "tiny_mohge.yaml"), ("hybrid", "tiny_mohge.yaml"),
                                        ("study", "tiny_mohge.yaml"), ("screen", "tiny_mohge.yaml"),
                                        ("paper-3b", "paper_3b_layer.yaml")])
def test_mohge_is_the_shipped_routing(name, layer):
    runs = _mohge_runs(get_preset(name))
    assert runs, f"preset {name} has no mohge run"
    shipped = _shipped(layer)
    for run, cfg in runs.items():
        for section in ROUTING:
            assert cfg[section] == shipped[section], (name, run, section)
        assert cfg["router"]["expert_weighting"] == "renorm"


def test_mohge_paper_differs_from_mohge_only_in_the_weighting():
    p = get_preset("default")
    ours, paper = p.runs["mohge"]["moe"]["mohge"], p.optional_runs["mohge_paper"]["moe"]["mohge"]
    assert paper["router"].pop("expert_weighting") == "paper"
    assert ours["router"].pop("expert_weighting") == "renorm"
    assert paper == ours


def test_mohge_released_is_the_released_routing():
    cfg = get_preset("paper-3b").runs["mohge_released"]["moe"]["mohge"]
    for section, values in RELEASED_ROUTING.items():
        assert {k: cfg[section][k] for k in values} == values, section
    assert cfg["router"]["expert_weighting"] == "paper"


@pytest.mark.parametrize("name", ["default", "hybrid", "study", "screen", "balance", "paper-3b"])
def test_moe_is_the_stock_layer(name):
    p = get_preset(name)
    stock = {n: r["moe"] for n, r in p.runs.items() if n == "moe" or re.fullmatch(r"moe_h\d+", n)}
    assert stock and all(m["kind"] in ("moe", "stock") for m in stock.values())
