"""GPTModel with the MoHGE spec on CPU: builds, trains (loss falls); stock MoE alongside."""

import pytest
import torch

from megatron_mohge import MoHGEConfig
from tests.workers import common as C

STEPS = 12


@pytest.fixture
def world1():
    C.init_distributed()  # 1-rank gloo group + CPU mode
    C.init_layout(1, 1, 1)
    yield
    C.destroy_layout()


def mohge_cfg(**kw):
    base = dict(widths=[16, 32, 48, 64], experts_per_group=2, group_topk=2, topk=2,
                losses=dict(group_start_fraction=0.0))
    base.update(kw)
    return MoHGEConfig(**base)


def falls(losses, factor=0.9):
    """Mean of the last 3 losses below ``factor`` x mean of the first 3."""
    return sum(losses[-3:]) / 3 < factor * sum(losses[:3]) / 3


def train_losses(tc, spec):
    model = C.wrap_ddp(C.build_gpt(tc, spec), tc)
    opt = C.build_optimizer(model, lr=1e-2)
    return model, C.train(model, opt, tc, STEPS)


def test_mohge_gpt_trains_and_stock_moe_baseline_runs(world1):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron_mohge.compat.mcore import metric_entries

    from megatron_mohge import get_mohge_decoder_block_spec

    mc = mohge_cfg()
    tc = mc.apply_to(C.tiny_gpt_config())
    model, mohge = train_losses(tc, get_mohge_decoder_block_spec(tc, mc, use_te=False))
    assert falls(mohge), mohge
    tracker = metric_entries()
    assert {"mohge_group_loss", "mohge_group_balance_loss"} <= set(tracker)

    torch.manual_seed(C.SEED)
    stock_tc = C.tiny_gpt_config(num_moe_experts=8, moe_ffn_hidden_size=40)  # same total width
    _, stock = train_losses(stock_tc, get_gpt_decoder_block_spec(stock_tc, use_transformer_engine=False))
    assert falls(stock), stock
    # Same backbone and data: both start from the same loss regime.
    assert mohge[0] == pytest.approx(stock[0], rel=0.05)
    routed = sum(p.numel() for n, p in C.unwrap(model).named_parameters() if "experts.width" in n)
    assert routed == 4 * sum(mc.routed_params_per_expert(32))  # 4 MoE layers


def test_layer_spec_works_as_gpt_transformer_layer_spec(world1):
    from megatron_mohge import get_mohge_layer_spec

    mc = mohge_cfg(router=dict(expert_weighting="paper"), num_shared_experts=1,
                   shared_expert_width=16)
    tc = mc.apply_to(C.tiny_gpt_config(num_layers=2))
    _, losses = train_losses(tc, get_mohge_layer_spec(mc, use_te=False, normalization="RMSNorm"))
    assert falls(losses), losses


def test_decoder_block_spec_interleaves_and_slices_for_pipeline(world1):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_mohge import get_mohge_decoder_block_spec
    from megatron_mohge.experts import HeterogeneousExperts

    from megatron_mohge.compat.mcore import builder_parts

    mc = mohge_cfg()
    tc = mc.apply_to(C.tiny_gpt_config(moe_layer_freq=[0, 1, 0, 1]))
    block = get_mohge_decoder_block_spec(tc, mc, use_te=False)
    kinds = [builder_parts(spec.submodules.mlp).module for spec in block.layer_specs]
    assert kinds[0] is not MoELayer and kinds[1] is MoELayer and kinds[3] is MoELayer
    moe = builder_parts(block.layer_specs[1].submodules.mlp)
    assert builder_parts(moe.submodules.experts).module is HeterogeneousExperts
    # Same builder shape as Megatron's own spec on the installed release (ModuleSpec / partial).
    stock = get_gpt_decoder_block_spec(tc, use_transformer_engine=False)
    assert type(block.layer_specs[1].submodules.mlp) is type(stock.layer_specs[1].submodules.mlp)
    tc_pp = mc.apply_to(C.tiny_gpt_config(moe_layer_freq=[0, 1, 0, 1],
                                          pipeline_model_parallel_size=2))
    first = get_mohge_decoder_block_spec(tc_pp, mc, use_te=False, pp_rank=0)
    last = get_mohge_decoder_block_spec(tc_pp, mc, use_te=False, pp_rank=1)
    assert len(first.layer_specs) == len(last.layer_specs) == 2
    assert [builder_parts(s.submodules.mlp).module is MoELayer
            for s in first.layer_specs + last.layer_specs] == [False, True, False, True]


def test_spec_errors_are_clear(world1, monkeypatch):
    from megatron_mohge import ConfigError, get_mohge_decoder_block_spec, get_mohge_layer_spec

    mc = mohge_cfg()
    with pytest.raises(ConfigError, match=r"num_moe_experts=6 but the MoHGE config implies 8; "
                                          r"build the TransformerConfig with MoHGEConfig\.apply_to"):
        get_mohge_decoder_block_spec(C.tiny_gpt_config(num_moe_experts=6), mc, use_te=False)
    with pytest.raises(ConfigError, match="moe_router_load_balancing_type='aux_loss' with a "
                                          "non-zero moe_aux_loss_coeff"):
        get_mohge_decoder_block_spec(C.tiny_gpt_config(), mc, use_te=False)
    from megatron_mohge import specs

    monkeypatch.setattr(specs, "te_available", lambda: False)  # on every machine
    with pytest.raises(ImportError, match="use_te=True but Transformer Engine is not usable"):
        get_mohge_layer_spec(mc, use_te=True)


@pytest.mark.parametrize("hierarchical", [False, True])
def test_noisy_topk_router_trains_with_stock_uniform_experts(world1, hierarchical):
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron_mohge import NoisyGatingConfig
    from megatron_mohge.specs import get_noisy_topk_decoder_block_spec

    tc = C.tiny_gpt_config(moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                           moe_router_dtype="fp32", moe_router_topk=2)
    kwargs = dict(gating=NoisyGatingConfig(importance_coeff=0.1, load_coeff=0.1))
    if hierarchical:
        kwargs.update(group_sizes=[4, 4], group_topk=2, hierarchical=True)
    block = get_noisy_topk_decoder_block_spec(tc, use_te=False, **kwargs)
    from megatron_mohge.compat.mcore import builder_parts

    moe = builder_parts(block.layer_specs[0].submodules.mlp)
    assert builder_parts(moe.submodules.experts).module is SequentialMLP
    model, losses = train_losses(tc, block)
    assert falls(losses, 0.95), losses  # zero-init noisy gates learn a bit slower
    from megatron_mohge.compat.mcore import metric_entries

    assert {"noisy_importance_loss", "noisy_load_loss"} <= set(metric_entries())
