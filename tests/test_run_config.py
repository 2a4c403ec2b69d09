"""RunConfig: YAML in/out, overrides, and validation errors that name the field."""

import pytest

from megatron_mohge.config import ConfigError
from megatron_mohge.config.io import apply_overrides
from megatron_mohge.config.run import RunConfig

CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "examples" / "configs"


def test_example_configs_load_and_round_trip(tmp_path):
    run = RunConfig.from_yaml(CONFIGS / "cpu_tiny_mohge.yaml")
    assert run.moe.kind == "mohge" and run.moe.mohge.widths[0] == 28  # path resolved
    path = tmp_path / "run.yaml"
    run.to_yaml(path)
    again = RunConfig.from_yaml(path)
    assert again.to_dict() == run.to_dict()
    base = RunConfig.from_yaml(CONFIGS / "cpu_tiny_moe.yaml")
    assert base.moe.kind == "stock" and base.model == run.model and base.train == run.train


def test_overrides_are_parsed_as_yaml_and_validated():
    run = RunConfig.from_yaml(CONFIGS / "cpu_tiny_mohge.yaml",
                              ["train.iters=50", "parallel.expert_parallel=2",
                               "moe.mohge.router.expert_weighting=paper", "data.path=[a, b]"])
    assert run.train.iters == 50 and run.parallel.expert_parallel == 2
    assert run.moe.mohge.router.expert_weighting == "paper" and run.data.path == ["a", "b"]
    assert apply_overrides({"a": {"b": 1}}, ["a.c=x"]) == {"a": {"b": 1, "c": "x"}}
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["train.iters"])


@pytest.mark.parametrize("data, match", [
    ({"trian": {}}, r"trian: unknown key in RunConfig\. Did you mean 'train'"),
    ({"train": {"lr": -1}}, r"train\.lr"),
    ({"train": {"global_batch_size": 10, "micro_batch_size": 4}}, r"train\.global_batch_size"),
    ({"train": {"min_lr": 1.0}}, r"train\.min_lr"),
    ({"train": {"iters": 10, "lr_warmup_iters": 10}}, r"train\.lr_warmup_iters"),
    ({"model": {"hidden_size": 60, "num_attention_heads": 8}}, r"model\.num_attention_heads"),
    ({"model": {"moe_layer_freq": [1, 0]}}, r"model\.moe_layer_freq"),
    ({"moe": {"kind": "mohge"}}, r"moe\.mohge: required"),
    ({"moe": {"kind": "sparse"}}, r"moe\.kind"),
    ({"moe": {"num_experts": 6}, "parallel": {"expert_parallel": 4}}, r"parallel\.expert_parallel"),
    ({"parallel": {"tensor_parallel": 2, "sequence_parallel": False}}, r"sequence_parallel"),
    ({"data": {"split": "100,0,0"}}, r"data\.split"),
    ({"model": {"add_bias_linear": True},
      "moe": {"num_shared_experts": 1, "shared_expert_hidden_size": 8}}, r"model\.add_bias_linear"),
    ({"moe": {"noisy_gating": {"nois": True}}},
     r"moe\.noisy_gating\.nois: unknown key in NoisyGatingConfig"),
    ({"moe": {"kind": "mohge", "mohge": {"widths": [8, 16], "experts_per_group": 3,
                                          "group_topk": 1, "topk": 2}},
      "parallel": {"expert_parallel": 2}}, r"moe\.mohge / parallel"),
    ({"moe": {"kind": "mohge", "mohge": "no/such/file.yaml"}}, r"moe\.mohge: MoHGE config file"),
])
def test_bad_input_names_the_field(data, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_dict(data)



@pytest.mark.parametrize("split, ok", [
    ("95,5,0", True), ("95,5", True), ("949, 50, 1", True), ("1", False), ("0,5,0", False),
    ("95,0,5", False), ("a,b", False), ("1,2,3,4", False), ("-1,2,3", False), ("", False),
])
def test_one_split_rule_for_run_file_and_datasets(split, ok):
    """The run file and the dataset builder accept and refuse the same splits (one parser)."""
    from megatron_mohge.config.errors import parse_split

    outcomes = []
    for check in (lambda: RunConfig.from_dict({"data": {"split": split}}),
                  lambda: parse_split(split)):
        try:
            check()
            outcomes.append(True)
        except ConfigError as exc:
            assert split.strip() == "" or repr(split) in str(exc)
            outcomes.append(False)
    assert outcomes == [ok, ok]
    if ok:
        weights = parse_split(split)
        assert len(weights) == 3 and sum(weights) == pytest.approx(1.0)

def test_world_size_checks():
    run = RunConfig.from_dict({"parallel": {"tensor_parallel": 2, "expert_parallel": 2},
                               "train": {"global_batch_size": 8, "micro_batch_size": 2}})
    assert run.check_world_size(4) == 2
    with pytest.raises(ConfigError, match="does not divide the world size 3"):
        run.check_world_size(3)
    with pytest.raises(ConfigError, match="global_batch_size"):
        RunConfig.from_dict({"train": {"global_batch_size": 6, "micro_batch_size": 2}}
                            ).check_world_size(2)


def test_padded_vocab_and_derived_fields():
    run = RunConfig.from_dict({"parallel": {"tensor_parallel": 2}, "model": {"ffn_hidden_size": 128}})
    assert run.padded_vocab_size(257) == 512  # a multiple of 128 * TP, as Megatron-LM pads
    assert run.sequence_parallel and run.expert_tensor_parallel == 2
    assert run.dispatcher() == "allgather"
    assert RunConfig.from_dict({"model": {"num_layers": 4, "moe_layer_freq": 2}}
                               ).moe_layer_pattern == [1, 0, 1, 0]
    with pytest.raises(ConfigError, match="model.vocab_size"):
        RunConfig.from_dict({"model": {"vocab_size": 100}}).padded_vocab_size(257)


def test_expert_backend_is_set_through_the_mohge_section():
    run = RunConfig.from_yaml(CONFIGS / "cpu_tiny_mohge.yaml", ["moe.mohge.expert_backend=torch"])
    assert run.moe.mohge.expert_backend == "torch"
    with pytest.raises(ConfigError, match="expert_backend"):
        RunConfig.from_yaml(CONFIGS / "cpu_tiny_mohge.yaml", ["moe.mohge.expert_backend=cuda"])
    with pytest.raises(ConfigError, match="moe.use_te is false"):
        RunConfig.from_yaml(CONFIGS / "cpu_tiny_mohge.yaml",
                            ["moe.mohge.expert_backend=te", "moe.use_te=false"])
