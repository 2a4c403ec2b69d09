"""Issue "MoHGE routing that learns": the group gate's LM gradient when the K picks share a
group (straight-through factor, unnormalized weights), group balance on use, the group loss
counting assignments, the intra-group loss over the tokens that use a group, fractional
global-batch loads, and the routing diagnostics (per call, per window, per run)."""

import math

import pytest
import torch

from megatron_mohge.config import ConfigError
from megatron_mohge.routing import losses as L
from megatron_mohge.routing.functional import GroupIndex, routing_diagnostics, two_level_route
from megatron_mohge.training import diagnostics as D

from tests.test_router import cfg_small, make_router, ref_route

pytestmark = pytest.mark.usefixtures("mcore_world1")


def _one_group_tokens(T=16, sizes=(3, 3, 2), seed=0):
    """Logits where every token's K=2 picks fall in group 0 (its in-group logits dominate)."""
    torch.manual_seed(seed)
    G, E = len(sizes), sum(sizes)
    u = torch.randn(T, G, dtype=torch.float64)
    u[:, 0] += 6.0  # s_0 ~ 1: group 0 always selected ...
    u[:, 1:] -= 6.0  # ... and its experts outweigh the other selected group's in q
    z = torch.randn(T, E, dtype=torch.float64) * 0.1
    return u.requires_grad_(True), z.requires_grad_(True), GroupIndex.build(list(sizes))


def _lm_grad_to_group_gate(weighting, group_gradient):
    u, z, index = _one_group_tokens()
    r = two_level_route(u, z, index, 2, 2, "sigmoid", weighting, group_gradient=group_gradient)
    assert (index.group_of_expert_E[r.expert_idx_TK] == 0).all()  # the one-group case
    y_TE = torch.randn_like(r.probs_TE)  # stand-in for the experts' outputs . dL/dy
    (r.probs_TE * y_TE).sum().backward()
    return r, u.grad


def test_renorm_gives_the_group_gate_no_lm_gradient_when_picks_share_a_group():
    _, g = _lm_grad_to_group_gate("renorm", "none")
    assert g.abs().max() < 1e-15  # s_g cancels (up to rounding): the audit's finding, pinned


@pytest.mark.parametrize("weighting,group_gradient", [("renorm", "straight_through"),
                                                      ("paper", "straight_through"),
                                                      ("unnormalized", "none")])
def test_group_gate_gets_lm_gradient_in_the_one_group_case(weighting, group_gradient):
    r, g = _lm_grad_to_group_gate(weighting, group_gradient)
    assert (g.abs().sum(-1) > 1e-6).all()  # every token's group logits get a gradient


def test_straight_through_keeps_the_forward_values():
    u, z, index = _one_group_tokens(seed=1)
    for w in ("renorm", "paper"):
        plain = two_level_route(u, z, index, 2, 2, "sigmoid", w)
        st = two_level_route(u, z, index, 2, 2, "sigmoid", w, group_gradient="straight_through")
        assert torch.equal(st.probs_TE, plain.probs_TE)
        assert torch.equal(st.routing_map_TE, plain.routing_map_TE)
    # d out / d log s_g = the group's part of the output (here all of it)
    r = two_level_route(u, z, index, 2, 2, "sigmoid", "renorm", group_gradient="straight_through")
    y_TE = torch.randn_like(r.probs_TE)
    (r.probs_TE * y_TE).sum().backward()
    out_T = (r.probs_TE * y_TE).sum(-1).detach()
    s0 = torch.sigmoid(u[:, 0].detach())
    assert torch.allclose(u.grad[:, 0], out_T * (1 - s0), atol=1e-12)


@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
def test_unnormalized_weights_are_q_of_the_chosen_experts(score):
    torch.manual_seed(3)
    sizes = [2, 4, 3, 5]
    u, z = torch.randn(19, 4, dtype=torch.float64), torch.randn(19, 14, dtype=torch.float64)
    r = two_level_route(u, z, GroupIndex.build(sizes), 2, 4, score, "unnormalized")
    w_renorm, picked, _ = ref_route(u, z, sizes, 2, 4, score, "renorm")
    # q over all experts of the selected groups sums to 1; the chosen part is kept as it is
    s = torch.sigmoid(u) if score == "sigmoid" else torch.softmax(u, -1)
    q = torch.zeros_like(z)
    for t in range(19):
        S = torch.topk(s[t], 2).indices.tolist()
        off = 0
        for g, n in enumerate(sizes):
            if g in S:
                q[t, off:off + n] = s[t, g] * torch.softmax(z[t, off:off + n], -1)
            off += n
    q = q / q.sum(-1, keepdim=True)
    assert torch.equal(r.routing_map_TE, picked)
    assert torch.allclose(r.probs_TE, q * picked, atol=1e-12)
    assert (r.probs_TE.sum(-1) < 1).all()


def test_config_options_and_errors():
    cfg = cfg_small(router=dict(group_gradient="straight_through", expert_weighting="unnormalized"),
                    losses=dict(group_loss_count="assignments", group_balance_coeff=1e-2,
                                intra_group_mode="per_group_used"))
    from megatron_mohge import MoHGEConfig

    again = MoHGEConfig.from_yaml(cfg.to_yaml())
    assert again.router.group_gradient == "straight_through"
    assert again.losses.group_loss_count == "assignments"
    for kw, msg in ((dict(router=dict(group_gradient="st")), "router.group_gradient"),
                    (dict(losses=dict(group_loss_count="tokens")), "losses.group_loss_count"),
                    (dict(losses=dict(group_balance_coeff=-1.0)), "losses.group_balance_coeff"),
                    (dict(router=dict(type="noisy_topk"), losses=dict(group_balance_coeff=0.5)),
                     "losses.group_balance_coeff: implemented for router.type 'mohge' only")):
        with pytest.raises(ConfigError, match=msg):
            cfg_small(**kw)
    # a noisy router keeps its own losses: the two-level router's defaults are switched off
    noisy = MoHGEConfig(widths=[32, 64], experts_per_group=4, group_topk=1, topk=2,
                        router=dict(type="noisy_topk"))
    assert (noisy.router.group_gradient, noisy.losses.group_balance_coeff,
            noisy.losses.expert_bias_update_rate) == ("none", 0.0, 0.0)


def test_group_topk_one_warns_only_without_a_gradient_path():
    with pytest.warns(UserWarning, match="group_topk=1"):
        cfg_small(group_topk=1, topk=2)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cfg_small(group_topk=1, topk=2, router=dict(group_gradient="straight_through"))


# ---------------------------------------------------------------- losses
def _counts(tokens, per_group, per_expert, using=None):
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    return L.TokenCounts(t(tokens), t(per_group), t(per_expert),
                         None if using is None else t(using))


def test_group_balance_loss_is_one_at_balance_and_matches_its_formula():
    index = GroupIndex.build([2, 2])
    u = torch.zeros(4, 2, dtype=torch.float64, requires_grad=True)  # P = (1/2, 1/2)
    bal = _counts(4.0, [4.0, 4.0], [2.0, 2.0, 2.0, 2.0])  # K=2: 8 assignments, half per group
    assert L.group_balance_loss(u, bal, index, [2, 2], 2, 1.0, None).item() == pytest.approx(1.0)
    skew = _counts(4.0, [4.0, 4.0], [3.0, 3.0, 1.0, 1.0])  # group 0 does 6 of 8
    torch.manual_seed(0)
    u2 = torch.randn(4, 2, dtype=torch.float64)
    P = torch.softmax(u2, -1).mean(0)
    want = 0.5 * ((6 / 8) * P[0] / 0.5 + (2 / 8) * P[1] / 0.5)
    got = L.group_balance_loss(u2, skew, index, [2, 2], 2, 0.5, None)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    # unequal group sizes: the target share is N_g / E
    idx3 = GroupIndex.build([1, 3])
    even = _counts(4.0, [4.0, 4.0], [2.0, 2.0, 2.0, 2.0])  # 1/4 and 3/4 of assignments
    u3 = torch.log(torch.tensor([[1.0, 3.0]] * 4, dtype=torch.float64))  # P = (1/4, 3/4)
    assert L.group_balance_loss(u3, even, idx3, [1, 3], 2, 1.0, None).item() == pytest.approx(1.0)


def test_group_loss_counts_assignments_or_selections():
    index = GroupIndex.build([2, 2])
    torch.manual_seed(1)
    u = torch.randn(5, 2, dtype=torch.float64)
    P = torch.softmax(u, -1).mean(0)
    c = torch.tensor([1.0, 2.0], dtype=torch.float64)
    # 5 tokens, Kg=2 (every token selects both groups), K=2: 7 of 10 assignments in group 0
    counts = _counts(5.0, [5.0, 5.0], [4.0, 3.0, 2.0, 1.0])
    sel = L.group_aux_loss(u, counts, c, 2, 1.0, None)
    asg = L.group_aux_loss(u, counts, c, 2, 1.0, None, count="assignments", topk=2, index=index)
    assert sel.item() == pytest.approx((2 * (c * torch.tensor([0.5, 0.5]) * P).sum()).item())
    assert asg.item() == pytest.approx((2 * (c * torch.tensor([0.7, 0.3]) * P).sum()).item())


def test_per_group_used_averages_p_over_the_tokens_with_a_pick_in_the_group():
    cfg = cfg_small()
    index = GroupIndex.build(cfg.experts_per_group)
    torch.manual_seed(4)
    T = 30
    u, z = torch.randn(T, 4, dtype=torch.float64), torch.randn(T, 14, dtype=torch.float64)
    r = two_level_route(u, z, index, 2, 3)
    counts = L.count_tokens(r.group_mask_TG, r.routing_map_TE, None, None, index)
    got = L.intra_group_loss_per_group(r.in_group_probs_TE, r.group_mask_TG, counts, index,
                                       cfg.experts_per_group, 1.0, None,
                                       routing_map_TE=r.routing_map_TE)
    # reference: per-token loop
    want, users_total, off = 0.0, 0.0, cfg.group_offsets
    users = [[t for t in range(T) if r.routing_map_TE[t, off[g]:off[g] + n].any()]
             for g, n in enumerate(cfg.experts_per_group)]
    users_total = sum(len(x) for x in users)
    for g, n in enumerate(cfg.experts_per_group):
        if not users[g]:
            continue
        picks = r.routing_map_TE[:, off[g]:off[g] + n].double().sum(0)
        pi = torch.stack([torch.softmax(z[t, off[g]:off[g] + n], -1) for t in users[g]])
        want += (len(users[g]) / users_total) * n * float((picks / picks.sum() * pi.mean(0)).sum())
    assert got.item() == pytest.approx(want, rel=1e-6)
    # some tokens selected a group without using it: the released per_group form differs
    assert (counts.tokens_using_group_G < counts.tokens_per_group_G).any()
    sel = L.intra_group_loss_per_group(r.in_group_probs_TE, r.group_mask_TG, counts, index,
                                       cfg.experts_per_group, 1.0, None)
    assert sel.item() != pytest.approx(got.item(), rel=1e-6)


def test_fractional_global_batch_load_is_not_clamped():
    # Regression (issue 21, item 5): a group with under one assignment per micro-batch on
    # average had its in-group load fractions divided by clamp_min(A, 1) instead of A.
    index = GroupIndex.build([2, 2])
    pi = torch.full((4, 4), 0.5, dtype=torch.float64)
    pi[:, 0], pi[:, 1] = 0.8, 0.2
    gm = torch.ones(4, 2, dtype=torch.bool)
    counts = _counts(4.0, [4.0, 4.0], [3.0, 1.0, 2.0, 2.0])
    load = _counts(4.0, [4.0, 4.0], [0.375, 0.125, 3.75, 3.75])  # group 0: A = 0.5 < 1
    got = L.intra_group_loss_per_group(pi, gm, counts, index, [2, 2], 1.0, None, load)
    f0 = torch.tensor([0.75, 0.25])
    want = 0.5 * 2 * float((f0 * torch.tensor([0.8, 0.2])).sum()) + 0.5 * 2 * 0.5
    assert got.item() == pytest.approx(want, rel=1e-6)
    clamped = 0.5 * 2 * float((f0 * 0.5 * torch.tensor([0.8, 0.2])).sum()) + 0.5
    assert got.item() != pytest.approx(clamped, rel=1e-3)  # what the clamp gave


# ---------------------------------------------------------------- diagnostics
def test_routing_diagnostics_per_call():
    index = GroupIndex.build([2, 2])
    u = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)
    z = torch.tensor([[3.0, 0.0, 0.0, 0.0],  # token 0: group 0 peaked
                      [0.0, 0.0, 0.0, 0.1]], dtype=torch.float64)
    r = two_level_route(u, z, index, 2, 2)
    tokens, same, inmax, gap = routing_diagnostics(r, index, None).tolist()
    assert tokens == 2
    g = index.group_of_expert_E[r.expert_idx_TK]
    assert same == float((g == g[:, :1]).all(-1).sum())
    pi = r.in_group_probs_TE
    want_inmax = ((max(pi[0, :2]) + max(pi[0, 2:])) / 2 + (max(pi[1, :2]) + max(pi[1, 2:])) / 2)
    assert inmax == pytest.approx(float(want_inmax))
    w = r.weights_TK
    assert gap == pytest.approx(float((w.max(-1).values - w.min(-1).values).sum()))
    keep = torch.tensor([[1.0], [0.0]], dtype=torch.float64)  # padding is not counted
    assert routing_diagnostics(r, index, keep)[0].item() == 1.0


def test_router_reports_diagnostics_and_gate_gradient_norms():
    cfg = cfg_small(router=dict(group_gradient="straight_through"))
    router = make_router(cfg)
    torch.manual_seed(5)
    with torch.no_grad():
        router.weight.normal_(0, 0.5)
        router.group_weight.normal_(0, 0.5)
    router.train()
    grads = {"g": [], "e": []}
    for _ in range(2):  # two backward passes: the figure is their mean norm
        router.weight.grad = router.group_weight.grad = None
        probs, _ = router(torch.randn(6, 2, 16))
        (probs * torch.randn_like(probs)).sum().backward()
        grads["g"].append(router.group_weight.grad.norm().item())
        grads["e"].append(router.weight.grad.norm().item())
    fig = router.routing_figures()
    assert fig.group_gate_grad_norm == pytest.approx(sum(grads["g"]) / 2, rel=1e-6)
    assert fig.expert_gate_grad_norm == pytest.approx(sum(grads["e"]) / 2, rel=1e-6)
    assert 0 <= fig.same_group_fraction <= 1 and fig.weight_gap > 0
    assert 1 / 4 <= fig.ingroup_max_prob <= 1
    assert sum(fig.group_assignment_share) == pytest.approx(1.0)
    assert fig.max_group_share == max(fig.group_assignment_share)
    router.counter.reset()
    assert router.routing_figures().group_gate_grad_norm is None  # a new window


def test_stock_router_reports_weight_gap_and_expert_gate_norm():
    from megatron_mohge.routing.stock import CountedTopKRouter

    from tests.test_routing_counter import pgs, stock_tc

    r = CountedTopKRouter(config=stock_tc(num_moe_experts=8), pg_collection=pgs())
    r.set_layer_number(1)
    r.train()
    probs, rmap = r(torch.randn(5, 2, 16))
    (probs * torch.randn_like(probs)).sum().backward()
    fig = r.routing_figures()
    w = probs.reshape(-1, 8)
    m = rmap.reshape(-1, 8)
    gap = (w.masked_fill(~m, -1).max(-1).values - w.masked_fill(~m, 2).min(-1).values).mean()
    assert fig.weight_gap == pytest.approx(gap.item(), rel=1e-6)
    assert fig.expert_gate_grad_norm == pytest.approx(r.weight.grad.norm().item(), rel=1e-6)
    assert fig.same_group_fraction is None and fig.group_gate_grad_norm is None
    assert fig.group_assignment_share == [] and fig.max_group_share is None


def test_run_diagnostics_from_log_windows():
    def layer(cv, same, g, e):
        return dict(expert_load_cv=cv, same_group_fraction=same, group_gate_grad_norm=g,
                    expert_gate_grad_norm=e, group_token_share=[0.5, 0.5],
                    group_assignment_share=[0.75, 0.25], max_group_share=0.75)

    history = [{"iteration": it, "diagnostics": D.window_record([layer(cv, s, 1.0, 4.0),
                                                                 layer(2 * cv, s, 3.0, 4.0)])}
               for it, cv, s in ((25, 1.0, 0.9), (50, 0.5, 0.8), (75, 0.2, 0.6),
                                 (100, 0.1, 0.4))]
    d = D.run_diagnostics(history, iters=100)
    l0, l1 = d["layers"]
    assert l0["expert_load_cv_first_half"] == pytest.approx(0.75)  # windows 25, 50
    assert l0["expert_load_cv_second_half"] == pytest.approx(0.15)
    assert l1["expert_load_cv_first_half"] == pytest.approx(1.5)
    assert l0["same_group_fraction"] == pytest.approx(0.4)  # last quarter: window 100
    assert l0["gate_grad_ratio"] == pytest.approx(0.25) and l1["gate_grad_ratio"] == 0.75
    assert d["mean"]["gate_grad_ratio"] == pytest.approx(0.5)
    assert d["mean"]["group_assignment_share"] == [0.75, 0.25]
    assert d["mean"]["group_selection_share"] == [0.5, 0.5]
    assert D.run_diagnostics([{"iteration": 1}], 10) is None
    assert "same-group 0.40" in D.log_text(history[-1]["diagnostics"])
    assert math.isclose(history[-1]["diagnostics"]["group_gate_grad_norm"], 2.0)


def test_checkpoint_saved_before_the_new_fields_resumes_only_with_their_old_values(tmp_path):
    # A run.yaml written before issue 21 has no group_gradient / group_loss_count /
    # group_balance_coeff: it trained as "none" / "selections" / 0. Resuming it under today's
    # defaults would change the model mid-run, so the changed fields are named; restoring
    # them resumes.
    import yaml

    from megatron_mohge.resources import config_path
    from megatron_mohge.config.run import RunConfig
    from megatron_mohge.training import checkpoint as ckpt_lib

    run = RunConfig.from_yaml(config_path("cpu_tiny_mohge.yaml"))
    saved = run.to_dict()
    del saved["moe"]["mohge"]["router"]["group_gradient"]
    for k in ("group_loss_count", "group_balance_coeff"):
        del saved["moe"]["mohge"]["losses"][k]
    (tmp_path / ckpt_lib.RUN_FILE).write_text(yaml.safe_dump(saved))
    saved["moe"]["mohge"]["losses"]["expert_bias_update_rate"] = 0.0
    (tmp_path / ckpt_lib.RUN_FILE).write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError) as err:
        ckpt_lib.check_compatible(tmp_path, run.to_dict())
    assert "moe.mohge.router.group_gradient: 'none' -> 'straight_through'" in str(err.value)
    # switching the loss-free bias on adds checkpointed state: named too (other loss
    # settings may change on resume)
    assert "expert_bias_update_rate: 0.0 -> 0.01 (adds or removes" in str(err.value)
    old = RunConfig.from_yaml(config_path("cpu_tiny_mohge.yaml"), [
        "moe.mohge.router.group_gradient=none", "moe.mohge.losses.expert_bias_update_rate=0"])
    ckpt_lib.check_compatible(tmp_path, old.to_dict())  # the old model: resumes
