"""MoHGEConfig: YAML round trip, derived sizes, apply_to, and every validation error."""

import dataclasses

import pytest

from megatron_mohge import ConfigError, MoHGEConfig


def small(**kw):
    base = dict(widths=[32, 64, 96, 128], experts_per_group=4, group_topk=2, topk=3)
    base.update(kw)
    return MoHGEConfig(**base)


def test_paper_3b_derived_sizes():
    c = MoHGEConfig.paper_3b()
    assert c.widths == [384, 512, 640, 768, 896, 1024, 1152, 1280]
    assert c.num_experts == 64 and c.num_groups == 8
    mean_width = sum(c.expert_widths) / c.num_experts
    assert mean_width == 832  # 18.75% below the stock 1024
    assert 1 - mean_width / 1024 == pytest.approx(0.1875)
    # the shipped layer keeps the released Delta = 1024: c_g = 1 + (W_g - 384) / 1024
    assert c.group_costs[0] == 1.0
    assert c.group_costs[-1] == pytest.approx(1 + (1280 - 384) / 1024)
    # Delta defaults to the mean width: c_g = 1 + (W_g - 384) / 832.
    assert MoHGEConfig.paper_3b(losses={}).group_costs[-1] == pytest.approx(1 + (1280 - 384) / 832)
    assert c.group_offsets == [0, 8, 16, 24, 32, 40, 48, 56]


def test_paper_3b_layer_file_and_released_routing_agree_with_the_code():
    # one source: paper_3b() reads the shipped layer file; released=True applies the released
    # router and losses on top (issue 21: the two used to disagree)
    from megatron_mohge.config import RELEASED_INTRA_GROUP_COEFF
    from megatron_mohge.resources import config_path

    assert MoHGEConfig.paper_3b() == MoHGEConfig.from_yaml(config_path("paper_3b_layer.yaml"))
    r = MoHGEConfig.paper_3b(released=True)
    assert (r.router.expert_weighting, r.router.group_gradient) == ("paper", "none")
    assert (r.losses.intra_group_mode, r.losses.intra_group_coeff) == ("paper",
                                                                       RELEASED_INTRA_GROUP_COEFF)
    assert (r.losses.group_coeff, r.losses.group_loss_count) == (1e-5, "selections")
    assert r.losses.expert_bias_update_rate == 0 and r.losses.group_balance_coeff == 0
    assert r.widths == MoHGEConfig.paper_3b().widths


def test_yaml_round_trip(tmp_path):
    c = small(num_shared_experts=2, shared_expert_width=64,
              router=dict(expert_weighting="paper", group_score="softmax", z_loss_coeff=1e-3),
              losses=dict(intra_group_mode="per_group", group_cost_delta=1024.0))
    path = tmp_path / "m.yaml"
    c.to_yaml(path)
    back = MoHGEConfig.from_yaml(path)
    assert back == c
    assert MoHGEConfig.from_yaml(c.to_yaml()) == c  # YAML text works too
    assert MoHGEConfig.from_dict({"mohge": c.to_dict()}) == c  # top-level section


def test_experts_per_group_int_broadcasts():
    assert small().experts_per_group == [4, 4, 4, 4]


def test_apply_to_sets_megatron_fields():
    from megatron.core.transformer.transformer_config import TransformerConfig

    c = small(num_shared_experts=2, shared_expert_width=48, router=dict(z_loss_coeff=1e-3))
    tc = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                           moe_aux_loss_coeff=0.01, moe_router_load_balancing_type="aux_loss")
    out = c.apply_to(tc)
    assert out is not tc and tc.num_moe_experts is None
    assert out.num_moe_experts == 16 and out.moe_router_topk == 3
    assert out.moe_ffn_hidden_size == 128
    assert out.moe_shared_expert_intermediate_size == 96
    assert out.moe_router_dtype == "fp32"
    assert out.moe_router_load_balancing_type == "none" and out.moe_aux_loss_coeff == 0.0
    assert out.moe_z_loss_coeff == 1e-3
    c.check_transformer_config(out)


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(widths=[64, 32, 96, 128]), "MoHGEConfig.widths: widths must strictly increase"),
    (dict(widths=[32, 32, 96, 128]), "widths[1]=32 <= widths[0]=32"),
    (dict(widths=[]), "MoHGEConfig.widths: expected a non-empty list"),
    (dict(widths=[32, 64.5, 96, 128]), "MoHGEConfig.widths[1]: expected an integer"),
    (dict(topk=17), "MoHGEConfig.topk: K=17 exceeds the number of experts E=16; set topk <= 16"),
    (dict(group_topk=5), "MoHGEConfig.group_topk: Kg=5 exceeds the number of groups Ng=4"),
    (dict(group_topk=1, topk=5), "experts cannot always be found inside the Kg=1 selected groups"),
    (dict(experts_per_group=[4, 4]), "experts_per_group: has 2 entries but widths has 4 groups"),
    (dict(experts_per_group=0), "MoHGEConfig.experts_per_group: must be >= 1"),
    (dict(num_shared_experts=1), "MoHGEConfig.shared_expert_width: required"),
    (dict(router=dict(expert_weighting="softmax")), "router.expert_weighting: 'softmax' is not one of renorm, paper"),
    (dict(router=dict(group_score="relu")), "router.group_score: 'relu' is not one of sigmoid, softmax"),
    (dict(router=dict(type="switch")), "router.type: 'switch' is not one of"),
    (dict(losses=dict(intra_group_mode="global")), "losses.intra_group_mode: 'global' is not one of paper, per_group"),
    (dict(losses=dict(group_start_fraction=1.5)), "losses.group_start_fraction: a fraction of training in [0, 1]"),
    (dict(losses=dict(group_coeff=-1.0)), "losses.group_coeff: must be >= 0.0"),
    (dict(losses=dict(group_cost_delta=0.0)), "losses.group_cost_delta: must be > 0"),
    (dict(allocation=dict(max_imbalance=0.9)), "allocation.max_imbalance: must be >= 1.0"),
    (dict(router=dict(type="hierarchical_noisy_topk"), topk=3), "topk=3 must be a multiple of group_topk=2"),
    (dict(router=dict(type="noisy_topk"), noisy_gating=dict(noise_epsilon=0.0)),
     "MoHGEConfig.noisy_gating.noise_epsilon: must be > 0"),
])
def test_validation_errors_name_the_field(kwargs, fragment):
    with pytest.raises(ConfigError) as err:
        small(**kwargs)
    assert fragment in str(err.value)


def test_unknown_yaml_keys_are_rejected_with_a_suggestion():
    text = "widths: [32, 64]\nexperts_per_group: 2\ngroup_topk: 1\ntopk: 2\ntopK: 3\n"
    with pytest.raises(ConfigError, match=r"topK: unknown key in MoHGEConfig\. Did you mean 'topk'\?"):
        MoHGEConfig.from_yaml(text)
    nested = "widths: [32, 64]\nexperts_per_group: 2\ngroup_topk: 1\ntopk: 2\nrouter:\n  expert_weigting: paper\n"
    with pytest.raises(ConfigError, match=r"router\.expert_weigting: unknown key in RouterConfig\. "
                                          r"Did you mean 'expert_weighting'\?"):
        MoHGEConfig.from_yaml(nested)


def test_missing_fields_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="missing required field\\(s\\): group_topk, topk"):
        MoHGEConfig.from_dict({"widths": [32], "experts_per_group": 2})
    with pytest.raises(ConfigError, match="file not found"):
        MoHGEConfig.from_yaml(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("widths: [32, 64\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        MoHGEConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match="expected a mapping"):
        MoHGEConfig.from_yaml("- 1\n- 2\n")


def test_parallel_layout_errors():
    from megatron.core.transformer.transformer_config import TransformerConfig

    c = small(widths=[24, 40, 96, 128])
    tc = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4,
                           tensor_model_parallel_size=1, expert_tensor_parallel_size=1)
    c.apply_to(tc)  # fine without expert TP
    with pytest.raises(ConfigError, match=r"widths\[0\]=24 is not divisible by the expert "
                                          r"tensor-parallel size 16"):
        c.check_parallel_layout(ep_size=1, expert_tp_size=16)
    with pytest.raises(ConfigError, match=r"widths\[0\]=24: with FP8 each expert-TP shard of a "
                                          r"width must be a multiple of 16"):
        c.check_parallel_layout(ep_size=1, expert_tp_size=1, fp8=True)
    with pytest.raises(ConfigError, match=r"16 experts cannot be laid out over "
                                          r"expert_model_parallel_size=3"):
        c.check_parallel_layout(ep_size=3)
    uneven = small(widths=[32, 64, 96, 1024], experts_per_group=[2, 2, 2, 2])
    with pytest.raises(ConfigError, match=r"allocation\.max_imbalance: the best layout of 8 experts "
                                          r"over EP=8"):
        uneven.check_parallel_layout(ep_size=8)


def test_apply_to_rejects_conflicting_megatron_options():
    from megatron.core.transformer.transformer_config import TransformerConfig

    c = small()
    base = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4)
    with pytest.raises(ConfigError, match="moe_expert_capacity_factor: MoHGE routing is dropless"):
        c.apply_to(dataclasses.replace(base, num_moe_experts=16, moe_router_topk=3,
                                       moe_expert_capacity_factor=1.0))
    wrong = dataclasses.replace(base, num_moe_experts=8, moe_router_topk=3)
    with pytest.raises(ConfigError, match=r"TransformerConfig\.num_moe_experts=8 but the MoHGE "
                                          r"config implies 16; build the TransformerConfig with "
                                          r"MoHGEConfig\.apply_to"):
        c.check_transformer_config(wrong)


def test_topk_1_applies_to_a_transformer_config():
    # Megatron rejects moe_router_topk=1 with softmax-after-top-k (zero gradient); apply_to
    # must produce a valid config (our routers do not run Megatron's routing).
    from megatron.core.transformer.transformer_config import TransformerConfig

    tc = TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4)
    out = small(topk=1).apply_to(tc)
    assert out.moe_router_topk == 1 and out.moe_router_pre_softmax
    assert small(topk=2).apply_to(tc).moe_router_pre_softmax is False


def test_group_topk_1_warns_that_the_group_gate_learns_only_from_the_group_loss():
    with pytest.warns(UserWarning, match=r"MoHGEConfig\.group_topk=1: the group gate gets no "
                                         r"gradient from the LM loss"):
        small(group_topk=1, router=dict(group_gradient="none"))
