"""mohge-check-config: analytic counts (vs a real GPTModel on CPU), widths, memory, CLI."""

import json
from pathlib import Path

import pytest
import torch

from megatron_mohge.cli import check_config as CC
from megatron_mohge.config import MoHGEConfig
from megatron_mohge import accounting as A
from megatron_mohge.config.run import RunConfig

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
VOCAB = 128

MOHGE = {"widths": [16, 24, 32, 48], "experts_per_group": [2, 2, 4, 2], "group_topk": 2,
         "topk": 2, "num_shared_experts": 2, "shared_expert_width": 16}


def tiny_run(moe, **model):
    m = dict(num_layers=4, hidden_size=32, num_attention_heads=4, ffn_hidden_size=48,
             seq_length=16, vocab_size=VOCAB, moe_layer_freq=[0, 1, 1, 1])
    m.update(model)
    return RunConfig.from_dict({"model": m, "moe": moe})


def build_gpt(run):
    """The GPTModel mohge-train builds for ``run`` (``training.model_builder``: local layers, CPU)."""
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_mohge.training.model_builder import build_gpt_model

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0, force_reset_rng=True)
    return build_gpt_model(run, VOCAB)


CASES = {
    "mohge_swiglu_gqa_untied": (
        {"kind": "mohge", "mohge": MOHGE},
        dict(num_query_groups=2, untie_embeddings_and_output_weights=True)),
    "mohge_bias_layernorm_absolute_noisy": (
        {"kind": "mohge", "mohge": {**MOHGE, "num_shared_experts": 0,
                                    "router": {"type": "noisy_topk"}}},
        dict(add_bias_linear=True, normalization="LayerNorm",
             position_embedding_type="learned_absolute", swiglu=False)),
    "mohge_hierarchical_no_shared": (
        {"kind": "mohge", "mohge": {**MOHGE, "num_shared_experts": 0,
                                    "experts_per_group": 2, "router":
                                        {"type": "hierarchical_noisy_topk"}}},
        dict(moe_layer_freq=1)),
    "stock_moe_shared_gqa": (
        {"kind": "moe", "num_experts": 8, "expert_hidden_size": 24, "topk": 2,
         "num_shared_experts": 1, "shared_expert_hidden_size": 32},
        dict(num_query_groups=1)),
    "stock_moe_bias": (
        {"kind": "moe", "num_experts": 8, "expert_hidden_size": 24, "topk": 2},
        dict(add_bias_linear=True)),
    "stock_noisy": (
        {"kind": "moe", "num_experts": 4, "expert_hidden_size": 16, "topk": 2,
         "router": "noisy_topk"}, {}),
    "dense": ({"kind": "dense"}, dict(untie_embeddings_and_output_weights=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_analytic_params_match_real_gpt_model(mcore_world1, case):
    moe, model = CASES[case]
    run = tiny_run(moe, **model)
    gpt = build_gpt(run)
    counts = A.analytic_param_counts(run, VOCAB)
    real = sum(p.numel() for p in gpt.parameters())
    assert counts.total == real, (counts.to_dict(), real)
    # the trainer's measured counts (training.model_builder) are the same two figures
    from megatron_mohge.training.model_builder import measured_param_counts

    assert measured_param_counts(gpt) == dict(total_params=counts.total,
                                              routed_expert_params=counts.routed_experts)
    routed = sum(p.numel() for n, p in gpt.named_parameters()
                 if ".experts." in n and "shared_experts" not in n)
    assert counts.routed_experts == routed
    router = sum(p.numel() for n, p in gpt.named_parameters() if ".router." in n)
    assert counts.routers == router
    # The measured-routing figures use the same per-expert sizes (biases included), so the
    # trainer's activated params agree with mohge-check-config's with add_bias_linear too.
    from megatron_mohge.metrics import routers

    found = routers(gpt)  # every MoE layer's router counts, the stock one included
    assert len(found) == counts.num_moe_layers
    h, gated, bias = run.model.hidden_size, run.model.swiglu, run.model.add_bias_linear
    for r in found:
        assert list(r.routed_layout().params_per_expert) == counts.per_expert
    if run.moe.kind == "mohge":
        assert run.moe.mohge.routed_params_per_expert(h, gated, bias) == counts.per_expert


def test_activated_widths():
    paper = MoHGEConfig.paper_3b()
    w = A.activated_widths(paper)
    assert (w.min, w.uniform, w.max) == (6 * 384, 6 * 832, 6 * 1280)
    # unequal groups: brute force over group subsets and expert draws
    cfg = MoHGEConfig(**{k: v for k, v in MOHGE.items()})
    w = A.activated_widths(cfg)
    assert (w.min, w.max) == (16 + 16, 48 + 48)
    import itertools

    sizes, widths = cfg.experts_per_group, cfg.widths
    exp = []
    for subset in itertools.combinations(range(4), 2):
        union = [widths[g] for g in subset for _ in range(sizes[g])]
        draws = list(itertools.combinations(union, 2))
        exp.append(sum(map(sum, draws)) / len(draws))
    assert w.uniform == pytest.approx(sum(exp) / len(exp))
    flat = MoHGEConfig(**{**MOHGE, "router": {"type": "noisy_topk"}})
    assert A.activated_widths(flat).max == 96 and A.activated_widths(flat).min == 32
    hier = MoHGEConfig(**{**MOHGE, "experts_per_group": 2,
                          "router": {"type": "hierarchical_noisy_topk"}})
    assert (A.activated_widths(hier).min, A.activated_widths(hier).max) == (16 + 24, 32 + 48)


def test_memory_per_rank():
    run = RunConfig.from_yaml(CONFIGS / "paper_3b_mohge.yaml")
    mem = A.expert_memory_per_rank(run, world_size=32)
    assert mem["expert_data_parallel"] == 4 and mem["moe_layers_per_stage"] == 15
    r0 = mem["ranks"][0]
    assert r0["params"] == 15 * 3 * 1024 * 6656  # one expert of every width, 15 layers
    assert r0["bytes"] == r0["params"] * (2 + 4 + 12 / 4)


def test_cli_text_and_json(capsys):
    assert CC.main([str(CONFIGS / "paper_3b_mohge.yaml")]) == 0
    out = capsys.readouterr().out
    assert "EP=8 strategy=all-size imbalance=1.0000" in out and "routed_experts" in out
    assert CC.main([str(CONFIGS / "paper_3b_mohge.yaml"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["activated_per_token"]["routed_width_per_moe_layer"] == \
        {"min": 2304.0, "uniform": 4992.0, "max": 7680.0}
    assert r["params"]["routed_experts"] == 15 * 64 * 3 * 1024 * 832
    assert r["allocation"]["imbalance"] == 1.0 and len(r["allocation"]["rank_width_sums"]) == 8
    assert r["parallel"]["data_parallel"] == 32
    assert CC.main([str(CONFIGS / "paper_3b_moe.yaml"), "--json"]) == 0
    moe = json.loads(capsys.readouterr().out)
    assert moe["params"]["routed_experts"] / r["params"]["routed_experts"] == pytest.approx(1024 / 832)


def test_cli_bare_layer_and_warnings(capsys):
    tiny = str(CONFIGS / "tiny_mohge.yaml")
    assert CC.main([tiny]) == 2
    assert "--hidden-size" in capsys.readouterr().err
    assert CC.main([tiny, "--hidden-size", "64", "--num-layers", "4", "--ep", "4", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["model"]["padded_vocab_size"] == 384  # byte tokenizer default (257), padded
    assert r["allocation"]["ep_size"] == 4
    text = "\n".join(r["warnings"])
    assert "not a multiple of 128" in text  # widths 28..76
    assert "FP8 would be refused: each expert-TP shard of a width must be a multiple of 16 " \
           "(32 for MXFP8): " in text  # 28 % 16 != 0 (FP8_ALIGN)
    assert "not every group size divides" not in text  # 4 experts per group: all-size at EP=4
    assert "group-wise loss switches on" not in text  # no training schedule for a bare layer
    assert CC.main([tiny, "--hidden-size", "64", "--num-layers", "4", "--ep", "8", "--json"]) == 0
    assert "not every group size divides EP=8" in "\n".join(
        json.loads(capsys.readouterr().out)["warnings"])
    assert CC.main([tiny, "--hidden-size", "64", "--num-layers", "4", "--ep", "4",
                    "--vocab-size", "1000", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"]["padded_vocab_size"] == 1024
    assert CC.main([tiny, "--hidden-size", "64", "--num-layers", "4", "--ep", "3"]) == 2
    assert "expert_model_parallel_size=3" in capsys.readouterr().err


def test_hf_tokenizer_warnings(tmp_path, capsys):
    folder = tmp_path / "tok"
    folder.mkdir()
    (folder / "tokenizer.json").write_text("{}")
    run = str(CONFIGS / "paper_3b_mohge.yaml")
    assert CC.main([run, f"data.tokenizer={folder}/tokenizer.json", "--json"]) == 0
    warns = "\n".join(json.loads(capsys.readouterr().out)["warnings"])
    assert "no tokenizer_config.json" in warns
    (folder / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    assert CC.main([run, f"data.tokenizer={folder}", "--json"]) == 0
    assert "tokenizer_config" not in "\n".join(json.loads(capsys.readouterr().out)["warnings"])


def test_world_size_without_launch_section(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: {num_layers: 2, hidden_size: 32, num_attention_heads: 4}\n"
                   "moe: {kind: moe, num_experts: 4, expert_hidden_size: 32, topk: 2}\n"
                   "parallel: {expert_parallel: 2}\n"
                   "train: {micro_batch_size: 8, global_batch_size: 16}\n")
    assert CC.main([str(cfg), "--json"]) == 0  # mohge-train style: smallest world (EP 2)
    assert json.loads(capsys.readouterr().out)["parallel"]["world_size"] == 2
    assert CC.main([str(cfg), "launch.gpus_per_node=8"]) == 2  # 8 ranks: 16 % (8 x 8) != 0
    assert "world size 8" in capsys.readouterr().err
    assert CC.main([str(cfg), "--world-size", "4", "--json"]) == 2


def test_cli_bad_configs(capsys, tmp_path):
    run = str(CONFIGS / "small_mohge_1node.yaml")
    assert CC.main([run, "moe.mohge.topk=40"]) == 2
    assert "topk" in capsys.readouterr().err
    assert CC.main([run, "launch.gpus_per_node=3"]) == 2
    assert "world size 3" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("widths: [64, 32]\nexperts_per_group: 2\ngroup_topk: 1\ntopk: 1\n")
    assert CC.main([str(bad), "--hidden-size", "64", "--num-layers", "2"]) == 2
    assert "strictly increase" in capsys.readouterr().err
    assert CC.main([str(tmp_path / "missing.yaml")]) == 2
    capsys.readouterr()
    assert CC.main([run, "model.add_bias_linear=true"]) == 2  # Megatron's shared experts: no bias
    assert "shared experts" in capsys.readouterr().err


def test_run_and_layer_keys_are_disjoint_and_shipped_files_are_classified():
    from megatron_mohge.config import read_yaml_file
    from megatron_mohge.config.run import LAYER_FIELDS, RUN_FIELDS, config_kind

    assert RUN_FIELDS.isdisjoint(LAYER_FIELDS)
    shipped = sorted(CONFIGS.glob("*.yaml")) + sorted(
        (ROOT / "megatron_mohge" / "resources" / "configs").glob("*.yaml"))
    assert shipped
    for path in shipped:
        layer = path.name in ("tiny_mohge.yaml", "paper_3b_layer.yaml")
        assert config_kind(read_yaml_file(path, "config"), str(path)) == \
            ("layer" if layer else "run"), path
    with pytest.raises(Exception, match="neither a run file"):
        config_kind({"nonsense": 1}, "x.yaml")


def test_run_file_with_every_section_is_a_run_file(tmp_path, capsys):
    """Regression: the hand-written run-key list missed ``health``, so a run file with a
    ``health:`` section (or a misspelt section) was taken for a layer file."""
    cfg = tmp_path / "run.yaml"
    body = ("model: {num_layers: 2, hidden_size: 32, num_attention_heads: 4}\n"
            "moe: {kind: moe, num_experts: 4, expert_hidden_size: 32, topk: 2}\n")
    cfg.write_text(body + "health: {}\n")
    assert CC.main([str(cfg), "--json"]) == 0
    capsys.readouterr()
    cfg.write_text(body + "trian: {iters: 3}\n")
    assert CC.main([str(cfg)]) == 2
    assert "trian: unknown key" in capsys.readouterr().err
