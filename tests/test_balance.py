"""Intra-group balancing: loss-free bias (update rule, selection-only effect, fp32 state,
end-of-step hook), global-batch statistics, and the balance metrics (MaxVio, group CV)."""

import pytest
import torch

from megatron_mohge import MoHGEConfig
from megatron_mohge.config import ConfigError
from megatron_mohge.routing import losses as L
from megatron_mohge.routing.balance import end_of_step, wrap_finalize_model_grads
from megatron_mohge.routing.counters import RoutingCounter, max_violation
from megatron_mohge.routing.functional import GroupIndex, two_level_route

from tests.test_router import cfg_small, make_router

pytestmark = pytest.mark.usefixtures("mcore_world1")



# ---------------------------------------------------------------- the update rule
def test_bias_update_direction_and_size_per_group():
    # groups of 3 and 2 experts; group means 20 and 5
    index = GroupIndex.build([3, 2])
    load = torch.tensor([30.0, 20.0, 10.0, 5.0, 5.0])
    bias = torch.tensor([0.5, 0.0, -0.5, 0.1, 0.2])
    new = L.loss_free_bias_update(bias, load, index, rate=0.01)
    # above its group's mean -> down by u; at the mean -> unchanged; below -> up by u
    assert torch.allclose(new, torch.tensor([0.49, 0.0, -0.49, 0.1, 0.2]))
    # a busier group is not pushed back as a whole: group 1's experts sit at its own mean
    assert torch.equal(new[3:], bias[3:])


def test_selection_bias_moves_load_inside_groups_only():
    torch.manual_seed(0)
    sizes = [3, 3, 2]
    index = GroupIndex.build(sizes)
    u, z = torch.randn(64, 3, dtype=torch.float64), torch.randn(64, 8, dtype=torch.float64)
    plain = two_level_route(u, z, index, 2, 3)
    same = two_level_route(u, z, index, 2, 3, selection_bias_E=torch.zeros(8, dtype=torch.float64))
    assert torch.equal(plain.routing_map_TE, same.routing_map_TE)
    assert torch.allclose(plain.probs_TE, same.probs_TE, atol=1e-15)

    bias = torch.zeros(8, dtype=torch.float64)
    bias[0] = 5.0  # expert 0 of group 0 strongly preferred for selection
    biased = two_level_route(u, z, index, 2, 3, selection_bias_E=bias)
    assert torch.equal(biased.group_mask_TG, plain.group_mask_TG)  # group gate untouched
    in_g0 = plain.group_mask_TG[:, 0]
    assert biased.routing_map_TE[in_g0, 0].all()
    assert biased.routing_map_TE[:, 0].sum() > plain.routing_map_TE[:, 0].sum()
    # combine weights come from the unbiased q of the chosen experts (renorm)
    s = torch.sigmoid(u) * plain.group_mask_TG
    pi = torch.empty_like(z)  # softmax inside each group, written out
    for g in range(index.num_groups):
        m = index.group_of_expert_E == g
        pi[:, m] = torch.softmax(z[:, m], dim=-1)
    q = s[:, index.group_of_expert_E] * pi
    chosen = q * biased.routing_map_TE
    assert torch.allclose(biased.probs_TE, chosen / chosen.sum(-1, keepdim=True), atol=1e-12)
    assert (biased.routing_map_TE.sum(-1) == 3).all()


def test_config_fields_and_errors():
    cfg = cfg_small(losses=dict(expert_bias_update_rate=1e-3, global_batch_stats=True))
    assert MoHGEConfig.from_yaml(cfg.to_yaml()).losses.expert_bias_update_rate == 1e-3
    with pytest.raises(ConfigError, match="losses.expert_bias_update_rate"):
        cfg_small(losses=dict(expert_bias_update_rate=-1.0))
    with pytest.raises(ConfigError, match="losses.global_batch_stats"):
        cfg_small(losses=dict(global_batch_stats="yes"))
    with pytest.raises(ConfigError, match="router.type 'mohge' only"):
        cfg_small(router=dict(type="noisy_topk"), losses=dict(expert_bias_update_rate=1e-2))


# ---------------------------------------------------------------- router state
def _spread(router):
    torch.manual_seed(3)
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
        router.group_weight.normal_(0, 0.5)


def test_router_bias_is_persistent_fp32_and_updated_at_end_of_step():
    cfg = cfg_small(losses=dict(group_start_fraction=0.0, expert_bias_update_rate=0.1))
    router = make_router(cfg)
    assert "balance_bias_E" in router.state_dict()
    assert "balance_bias_E" not in make_router(cfg_small()).state_dict()  # off: as before
    _spread(router)
    router.bfloat16()  # as Float16Module does: the bias must stay fp32
    router.float()
    router.train()
    x = torch.randn(40, 16)
    for _ in range(2):  # two micro-batches of one step
        router(x)
    step = router.counter.step_tokens_per_expert_E.clone()
    assert step.sum() == 2 * 40 * cfg.topk
    end_of_step([router])
    want = L.loss_free_bias_update(torch.zeros(14), step.float(), router.group_index("cpu"), 0.1)
    assert router.balance_bias_E.dtype == torch.float32
    assert torch.equal(router.balance_bias_E, want) and want.abs().sum() > 0
    assert router.counter.step_tokens_per_expert_E.sum() == 0  # next step starts empty
    assert router.counter.maxvio_batch_n == 1
    assert router.counter.maxvio_batch_sum == pytest.approx(float(max_violation(step)))
    router.balance_bias_E.data = router.balance_bias_E.data.bfloat16()
    router(x)  # forward restores fp32 storage
    assert router.balance_bias_E.dtype == torch.float32
    # eval forwards never count towards a step
    router.eval()
    with torch.no_grad():
        router(x)
    assert router.counter.step_tokens_per_expert_E.sum() == 40 * cfg.topk


def test_wrap_finalize_model_grads_runs_end_of_step_once():
    cfg = cfg_small(losses=dict(group_start_fraction=0.0, expert_bias_update_rate=0.1))
    router = make_router(cfg)
    _spread(router)
    router.train()
    router(torch.randn(30, 16))
    calls = []
    wrapped = wrap_finalize_model_grads(lambda model, *a, **k: calls.append((model, a, k)))
    assert wrap_finalize_model_grads(wrapped) is wrapped
    wrapped([router], 7, num_tokens=None)
    assert calls == [([router], (7,), {"num_tokens": None})]
    assert router.balance_bias_E.abs().sum() > 0 and router.counter.step_forwards == 0


def test_global_batch_counts_are_a_running_mean_over_micro_batches():
    acc = L.GlobalBatchCounts()
    a = L.TokenCounts(torch.tensor(4.0), torch.tensor([4.0, 4.0]), torch.tensor([2.0, 6.0]))
    b = L.TokenCounts(torch.tensor(8.0), torch.tensor([8.0, 8.0]), torch.tensor([10.0, 6.0]))
    assert torch.equal(acc.add(a).tokens_per_expert_E, a.tokens_per_expert_E)
    m = acc.add(b)
    assert m.num_tokens == 6.0 and torch.equal(m.tokens_per_expert_E, torch.tensor([6.0, 6.0]))
    acc.reset()
    assert torch.equal(acc.add(b).tokens_per_expert_E, b.tokens_per_expert_E)
    # the per-group "used" counts travel only when a loss needs them (no zero padding packed
    # into every all-reduce), and survive the running mean when they do
    assert a.pack().numel() == 1 + 2 + 2 and acc.add(a).tokens_using_group_G is None
    acc.reset()
    u = L.TokenCounts(a.num_tokens, a.tokens_per_group_G, a.tokens_per_expert_E,
                      torch.tensor([3.0, 1.0]))
    assert u.pack().numel() == 1 + 2 + 2 + 2
    assert torch.equal(acc.add(u).tokens_using_group_G, torch.tensor([3.0, 1.0]))


def test_global_batch_stats_on_one_rank_equal_micro_batch_stats_for_one_micro_batch():
    # one rank, one micro-batch: the global batch is the micro-batch, so the losses agree
    base = dict(group_start_fraction=0.0, group_coeff=1e-2, intra_group_coeff=5e-3)
    x = torch.randn(5, 4, 16)
    grads = []
    for gbs in (False, True):
        router = make_router(cfg_small(losses=dict(base, global_batch_stats=gbs)))
        _spread(router)
        router.train()
        probs, _ = router(x)
        (probs * torch.arange(14.0)).sum().backward()
        grads.append((router.weight.grad.clone(), router.group_weight.grad.clone()))
    assert torch.allclose(grads[0][0], grads[1][0]) and torch.allclose(grads[0][1], grads[1][1])


# ---------------------------------------------------------------- metrics
def test_counter_maxvio_and_group_cv():
    c = RoutingCounter(4, 2)
    rm = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    c.record(rm, torch.tensor([[True, False]] * 3), None, training=True)
    # loads [3, 1, 1, 1]: max/mean - 1 = 3 / 1.5 - 1
    assert float(c.maxvio_micro_sum / c.maxvio_micro_n) == pytest.approx(1.0)
    c.record(rm, torch.tensor([[True, False]] * 3), torch.tensor([[1.0], [0.0], [0.0]]),
             training=False)
    assert c.tokens_seen == 4 and c.step_forwards == 1
    c.bfloat16()  # counts stay float64 (bf16 counts are exact only to 256)
    assert c.tokens_per_expert_E.dtype == torch.float64
    assert c.tokens_per_expert_E.tolist() == [4.0, 2.0, 1.0, 1.0]


def test_layer_routing_reports_balance_figures():
    from megatron_mohge.metrics import layer_routing

    router = make_router(cfg_small())
    rm = torch.zeros(6, 14, dtype=torch.bool)
    rm[:, 0] = True
    rm[:3, 4] = True
    rm[3:, 5] = True
    router.counter.record(rm, torch.ones(6, 4, dtype=torch.bool), None, training=False)
    d = layer_routing(router)
    # group 0 (experts 0..2): loads [6, 0, 0] -> CV sqrt(2); group 1 (3..6): [0, 3, 3, 0] -> 1
    assert d.group_load_cv[0] == pytest.approx(2 ** 0.5)
    assert d.group_load_cv[1] == pytest.approx(1.0)
    assert d.group_load_cv[2] == 0.0 and d.group_load_cv[3] == 0.0  # nothing routed
    assert d.maxvio_micro == pytest.approx(6 / (12 / 14) - 1)
    assert d.maxvio_batch is None  # no optimizer step counted


# ---------------------------------------------------------------- data-parallel ranks
@pytest.mark.parametrize("ep", [1, 2])
def test_loss_free_bias_identical_on_data_parallel_ranks(ep):
    from tests._launch import run_workers

    res = run_workers("balance_worker.py", 2, "--mode", "bias", "--ep", str(ep), "--steps", "4")
    b0, b1 = res["biases_per_rank"]
    assert b0 == b1  # the ranks saw different tokens: only global counts make this equal
    assert all(any(abs(v) > 0 for v in layer) for layer in b0)
    for layer in b0:  # 4 steps of +-0.05 (or 0 at a tie)
        assert all(abs(v) <= 4 * 0.05 + 1e-6 for v in layer)
    v0, v1 = res["maxvio_batch_per_rank"]
    assert v0 == v1 and all(v > 0 for v in v0)
    assert res["steps_counted"] == [4.0] * 3 and res["step_forwards"] == [0] * 3


def test_global_batch_stats_on_two_ranks_equal_one_rank_with_the_whole_batch():
    from tests._launch import run_workers

    res = run_workers("balance_worker.py", 2, "--mode", "gbs")
    for mode, d in res.items():
        assert d["gbs_max_abs_diff"] <= 1e-6 * d["ref_max_abs"] + 1e-9, (mode, d)
        assert d["local_max_abs_diff"] > 1e-3 * d["ref_max_abs"], (mode, d)  # option matters


def test_stock_router_counters_count_training_steps_not_evaluation():
    # regression: the stock counting hook ran under no_grad, so training forwards looked like
    # evaluation and the stock baseline never reported a global-batch MaxVio
    from megatron_mohge.metrics import routers
    from megatron_mohge.specs import get_stock_decoder_block_spec
    from tests.workers import common as C

    C.init_layout(1, 1, 1)
    try:
        tc = C.tiny_gpt_config()
        model = C.wrap_ddp(C.build_gpt(tc, get_stock_decoder_block_spec(tc, use_te=False)), tc)
        opt = C.build_optimizer(model)
        assert len(routers(C.model_chunks(model))) == 4
        C.train(model, opt, tc, 2)
        for r in routers(C.model_chunks(model)):
            assert float(r.counter.maxvio_batch_n) == 2 and r.counter.step_forwards == 0
            assert float(r.counter.step_tokens_per_expert_E.sum()) == 0
        C.eval_loss(model, C.synthetic_batches(0))
        assert all(r.counter.step_forwards == 0 for r in routers(C.model_chunks(model)))
    finally:
        C.destroy_layout()


def test_warns_once_when_the_bias_is_never_updated():
    from megatron_mohge.routing import mohge_router

    router = make_router(cfg_small(losses=dict(expert_bias_update_rate=0.1)))
    router.train()
    router.counter.step_forwards = mohge_router._STEP_FORWARDS_WARN
    from megatron_mohge.routing import base

    base._WARNED.discard("bias")
    with pytest.warns(UserWarning, match="wrap_finalize_model_grads"):
        router(torch.randn(4, 16))
    import megatron_mohge

    assert megatron_mohge.wrap_finalize_model_grads is wrap_finalize_model_grads


def test_warns_once_when_global_batch_stats_are_never_reset():
    """Issue 25.8: with global_batch_stats and no loss-free bias, a loop without end_of_step
    accumulated the aux-loss statistics over the whole run, silently."""
    from megatron_mohge.routing import base, mohge_router

    router = make_router(cfg_small(losses=dict(global_batch_stats=True, group_start_fraction=0)))
    assert router.balance_bias_E is None
    router.train()
    router.counter.step_forwards = mohge_router._STEP_FORWARDS_WARN
    base._WARNED.discard("global_stats")
    with pytest.warns(UserWarning, match="global_batch_stats.*end_of_step"):
        router(torch.randn(4, 16))


def test_bench_targets_report_balance_against_stock():
    from megatron_mohge.bench.figures import target_checks

    def run(cv, group_cv, flops):
        return {"routed_expert_params": 100, "heldout_loss": 2.0,
                "activated_routed_params_per_token": 10, "activated_params_per_token": 50,
                "expert_load_cv": cv, "group_load_cv": group_cv, "rank_flops_by_ep": flops}

    res = {"baseline": "moe", "runs": {
        "moe": run(0.3, 0.3, {"2": {"contiguous_max_over_mean": 1.1}}),
        "mohge": run(0.5, 0.1, {"2": {"all_size_max_over_mean": 1.02,
                                      "contiguous_max_over_mean": 1.2},
                                "4": {"all_size_max_over_mean": 1.3,
                                      "contiguous_max_over_mean": 1.25}})}}
    met = target_checks(res)["met"]
    assert met["rank_flops_all_size_ep2<=1.05"] and met["rank_flops_all_size_ep2<contiguous"]
    assert not met["rank_flops_all_size_ep4<=1.05"]
    assert not met["rank_flops_all_size_ep4<contiguous"]
    assert not met["expert_load_cv<=stock_load_cv"] and met["group_load_cv<=stock_load_cv"]
