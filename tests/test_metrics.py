"""Routing metrics measured from real routing."""

import pytest
import torch

from megatron_mohge import MoHGEConfig, plan_allocation
from megatron_mohge.metrics import reset_routing_counts, routing_metrics

pytestmark = pytest.mark.usefixtures("mcore_world1")


def test_metrics_match_the_routing_map():
    from tests.test_router import make_router

    cfg = MoHGEConfig(widths=[8, 16, 32], experts_per_group=[2, 2, 2], group_topk=2, topk=2,
                      losses=dict(group_coeff=0.0, intra_group_coeff=0.0))
    router = make_router(cfg, hidden=16, gated_linear_unit=True)  # SwiGLU experts
    x = torch.randn(12, 2, 16)
    _, rmap = router(x)
    m = routing_metrics(router)
    layer = m.layers[0]
    n_e = rmap.float().sum(0)  # EP=1: slot order == canonical order
    widths = torch.tensor(cfg.expert_widths, dtype=torch.float)
    assert layer.tokens == 24 and layer.tokens_per_expert == n_e.tolist()
    # SwiGLU expert: 3 * hidden * width weights; every token activates exactly K experts.
    expected = float((n_e * 3 * 16 * widths).sum() / 24)
    assert layer.activated_routed_params_per_token == pytest.approx(expected)
    assert 2 * 3 * 16 * 8 <= layer.activated_routed_params_per_token <= 2 * 3 * 16 * 32
    assert sum(layer.group_token_share) == pytest.approx(1.0)
    assert layer.mean_chosen_width == pytest.approx(float((n_e * widths).sum() / 48))
    assert layer.expert_load_max_over_mean == pytest.approx(float(n_e.max() / n_e.mean()))
    assert layer.rank_flops_max_over_mean is None  # EP=1
    assert m.activated_routed_params_per_token == layer.activated_routed_params_per_token
    reset_routing_counts(router)
    assert routing_metrics(router).layers[0].tokens == 0


def test_group_share_is_the_share_of_group_selections():
    """With K = Kg x N every chosen group contributes all its experts, so the group choices
    can be read off the routing map and the share checked against them (not only its sum)."""
    from tests.test_router import make_router

    cfg = MoHGEConfig(widths=[8, 16, 32], experts_per_group=[2, 2, 2], group_topk=2, topk=4,
                      losses=dict(group_coeff=0.0, intra_group_coeff=0.0))
    router = make_router(cfg, hidden=16)
    _, rmap = router(torch.randn(20, 2, 16))
    chosen_TG = rmap.reshape(40, 3, 2).all(-1)  # EP=1: canonical, group-major columns
    assert bool((rmap.reshape(40, 3, 2).any(-1) == chosen_TG).all())  # whole groups only
    n_g = chosen_TG.sum(0).double()
    layer = routing_metrics(router).layers[0]
    assert layer.group_token_share == pytest.approx((n_g / (40 * 2)).tolist())


def test_rank_flops_of_the_plan():
    cfg = MoHGEConfig.paper_3b()
    plan = plan_allocation(cfg.widths, cfg.experts_per_group, 4)
    # Cheap groups twice as popular: all-size layout keeps ranks equal anyway.
    tokens = [2.0 if g < 4 else 1.0 for g in cfg.expert_group]
    flops = plan.rank_flops(tokens)
    assert max(flops) == pytest.approx(min(flops))
    assert sum(flops) == pytest.approx(sum(t * w for t, w in zip(tokens, cfg.expert_widths)))
