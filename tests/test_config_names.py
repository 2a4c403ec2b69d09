"""Renamed run-file names: ``moe.kind: stock`` (formerly ``moe``) and ``shared_expert_width``
for the stock layer's shared experts (formerly ``shared_expert_hidden_size``, the name the
MoHGE layer never used). The former spellings parse forever, old checkpoints' run.yaml still
resumes, old bench results still identify their bench, and results files keep recording
stock runs as kind "moe"."""

import json
from pathlib import Path

import pytest
import yaml

from megatron_mohge.config import ConfigError
from megatron_mohge.config.run import RunConfig, normalize_run_dict
from megatron_mohge.training import checkpoint as ckpt_lib

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"

NEW = {"kind": "stock", "num_experts": 8, "expert_hidden_size": 16, "topk": 2,
       "num_shared_experts": 1, "shared_expert_width": 24}
OLD = {**{k: v for k, v in NEW.items() if k != "shared_expert_width"}, "kind": "moe",
       "shared_expert_hidden_size": 24}


def test_old_and_new_spellings_parse_to_equal_configs():
    new, old = RunConfig.from_dict({"moe": NEW}), RunConfig.from_dict({"moe": OLD})
    assert old == new and old.moe.kind == "stock" and old.moe.shared_expert_width == 24
    assert RunConfig.from_dict({"moe": {"kind": "moe"}}).moe.kind == "stock"
    assert RunConfig.from_dict({}).moe.kind == "stock"  # the default
    # the canonical spelling is what run.yaml (to_yaml) writes
    assert "kind: stock" in old.to_yaml() and "shared_expert_width: 24" in old.to_yaml()
    assert "shared_expert_hidden_size" not in old.to_yaml()
    with pytest.raises(ConfigError, match=r"^moe\.shared_expert_hidden_size: moe\."
                                          r"shared_expert_width is given too"):
        RunConfig.from_dict({"moe": {**NEW, "shared_expert_hidden_size": 24}})
    with pytest.raises(ConfigError, match=r"^moe\.shared_expert_width: required"):
        RunConfig.from_dict({"moe": {**NEW, "shared_expert_width": None}})


def test_overrides_take_either_spelling():
    from megatron_mohge.config.io import apply_overrides

    for key in ("shared_expert_width", "shared_expert_hidden_size"):
        data = apply_overrides({"moe": dict(NEW, shared_expert_width=None)}, [f"moe.{key}=40"])
        data["moe"] = {k: v for k, v in data["moe"].items() if v is not None or k == "kind"}
        assert RunConfig.from_dict(data).moe.shared_expert_width == 40


@pytest.mark.parametrize("saved_moe, current_moe", [(OLD, NEW), (NEW, OLD)])
def test_checkpoint_with_either_spelling_resumes(tmp_path, saved_moe, current_moe):
    """A checkpoint's run.yaml written before the rename (kind: moe, shared_expert_hidden_size)
    resumes under a config that uses the new names, and the reverse."""
    saved = RunConfig.from_dict({"moe": NEW}).to_dict()
    if saved_moe is OLD:  # run.yaml as the code before the rename wrote it
        saved["moe"] = {("shared_expert_hidden_size" if k == "shared_expert_width" else k): v
                        for k, v in saved["moe"].items()}
        saved["moe"]["kind"] = "moe"
    (tmp_path / ckpt_lib.RUN_FILE).write_text(yaml.safe_dump(saved, sort_keys=False))
    current = RunConfig.from_dict({"moe": current_moe}).to_dict()
    ckpt_lib.check_compatible(tmp_path, current)  # no error
    if saved_moe is OLD:  # the fabricated file really has the old spelling
        text = (tmp_path / ckpt_lib.RUN_FILE).read_text()
        assert "kind: moe" in text and "shared_expert_hidden_size: 24" in text
    wider = RunConfig.from_dict({"moe": {**NEW, "shared_expert_width": 32}}).to_dict()
    with pytest.raises(ConfigError, match=r"moe\.shared_expert_width: 24 -> 32"):
        ckpt_lib.check_compatible(tmp_path, wider)


def test_normalize_run_dict():
    assert normalize_run_dict({"moe": OLD, "model": {"a": 1}}) == {"moe": NEW, "model": {"a": 1}}
    assert normalize_run_dict({"moe": NEW}) == {"moe": NEW}
    assert normalize_run_dict({"moe": {"kind": "mohge"}}) == {"moe": {"kind": "mohge"}}
    assert normalize_run_dict({}) == {} and normalize_run_dict(None) is None


def test_bench_out_dir_accepts_results_recorded_with_either_spelling(tmp_path):
    from megatron_mohge.bench import e2e
    from megatron_mohge.bench.presets import get_preset

    preset = get_preset("default")
    identity = e2e.bench_identity(preset, ["moe", "mohge"], data=None, tokenizer=None,
                                  seeds=[1234], iters=30, layer_bench=False)
    assert identity["runs"]["moe"]["moe"]["kind"] == "moe"  # recorded as before the rename
    renamed = json.loads(json.dumps(identity))
    renamed["runs"]["moe"]["moe"]["kind"] = "stock"
    (tmp_path / "results.json").write_text(json.dumps({"config": renamed}))
    e2e.check_out_dir(tmp_path, identity)  # the same bench: accepted
    renamed["runs"]["moe"]["moe"]["num_experts"] = 8
    (tmp_path / "results.json").write_text(json.dumps({"config": renamed}))
    with pytest.raises(ConfigError, match="run configs differ"):
        e2e.check_out_dir(tmp_path, identity)


def test_results_keep_recording_stock_runs_as_kind_moe(mcore_world1):
    """summary.json / results.json ``kind`` of a stock run stays "moe" (the default bench's
    results are unchanged to the letter); MoHGE and dense runs record their kind. Checked on
    the summary the trainer writes (``training.run_figures.run_summary``)."""
    from megatron_mohge.training.run_figures import run_summary
    from megatron_mohge.training.trainer import TrainState

    counts = {"total_params": 10, "routed_expert_params": 4}
    for moe, kind in ((NEW, "moe"), ({"kind": "moe"}, "moe"), ({"kind": "dense"}, "dense"),
                      ({"kind": "mohge", "mohge": str(CONFIGS / "tiny_mohge.yaml")}, "mohge")):
        run = RunConfig.from_dict({"moe": moe})
        summary = run_summary(run, TrainState(), counts, [], 1.0, [1.0, 1.0], None)
        assert summary["kind"] == kind, moe
