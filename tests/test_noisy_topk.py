"""Sparsely-gated (noisy top-k) routers against per-token loops over Shazeer et al. 2017."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal

from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from megatron_mohge import ConfigError, MoHGEConfig, NoisyGatingConfig, plan_allocation
from megatron_mohge.compat.mcore import clear_metrics, metric_entries
from megatron_mohge.routing import noisy_topk as nt
from megatron_mohge.routing.noisy_topk import (
    IMPORTANCE_LOSS_NAME,
    LOAD_LOSS_NAME,
    NoisyTopKRouter,
    cv_squared,
    kth_excluding,
    prob_in_topk,
)

pytestmark = pytest.mark.usefixtures("mcore_world1")
D = 16
EPS = 1e-2  # NoisyGatingConfig.noise_epsilon


def tcfg(E, K, **kw):
    base = dict(num_layers=2, hidden_size=D, num_attention_heads=2, num_moe_experts=E,
                moe_router_topk=K, use_cpu_initialization=True, moe_router_dtype="fp32",
                moe_router_load_balancing_type="none")
    return TransformerConfig(**{**base, **kw})


def router(E, K, tc_kw=None, **kw):
    r = NoisyTopKRouter(tcfg(E, K, **(tc_kw or {})), **kw)
    r.set_layer_number(1)
    return r


def randomize(r, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in r.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def logged(name):
    return metric_entries()[name].values[0].item()


@pytest.fixture(autouse=True)
def _clean_tracker():
    clear_metrics()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    yield


# ---------------------------------------------------------------- independent references
def ref_gate(h, k):
    """softmax(KeepTopK(h, k)) of one token: (chosen ids, their gates)."""
    idx = torch.sort(h, descending=True).indices[:k]
    return idx, torch.exp(h[idx]) / torch.exp(h[idx]).sum()


def ref_prob(clean, h, sd, k):
    """P(x, i) of one token by the definition: k-th greatest of h excluding h_i."""
    out = []
    for i in range(h.shape[0]):
        others = torch.sort(torch.cat([h[:i], h[i + 1:]]), descending=True).values
        if others.numel() < k:
            out.append(torch.ones(()))
        else:
            out.append(Normal(0.0, 1.0).cdf((clean[i] - others[k - 1]) / sd[i]))
    return torch.stack(out)


def cv2_ref(v):
    m = v.mean()
    return ((v - m) ** 2).mean() / m ** 2


def ref_flat(x, W, b, Wn, noise, k, keep):
    z = x @ W.T + b
    sd = F.softplus(x @ Wn.T) + EPS
    h = z + noise * sd
    E = z.shape[1]
    rows, loads = [], []
    for t in range(x.shape[0]):
        idx, g = ref_gate(h[t], k)
        rows.append(torch.zeros(E).index_put((idx,), g))
        loads.append(ref_prob(z[t], h[t], sd[t], k) * keep[t])
    probs = torch.stack(rows)
    return probs, (probs * keep[:, None]).sum(0), torch.stack(loads).sum(0)


def ref_hier(x, Wp, Wpn, W, b, Wn, nG, nE, sizes, kg, kin, keep):
    """Appendix B per token: primary gate over groups, secondary gate inside chosen groups."""
    off = [sum(sizes[:g]) for g in range(len(sizes))]
    E = sum(sizes)
    u, sdu = x @ Wp.T, F.softplus(x @ Wpn.T) + EPS
    z, sd = x @ W.T + b, F.softplus(x @ Wn.T) + EPS
    hu, h = u + nG * sdu, z + nE * sd
    rows, load_p, load_s, count = [], 0.0, 0.0, torch.zeros(len(sizes))
    for t in range(x.shape[0]):
        gsel, gp = ref_gate(hu[t], kg)
        load_p = load_p + keep[t] * ref_prob(u[t], hu[t], sdu[t], kg)
        row, ls = torch.zeros(E), torch.zeros(E)
        for a, g in enumerate(gsel.tolist()):
            lo, n = off[g], sizes[g]
            sel, gs = ref_gate(h[t, lo:lo + n], kin)
            row = row + torch.zeros(E).index_put((sel + lo,), gp[a] * gs)
            seg = ref_prob(z[t, lo:lo + n], h[t, lo:lo + n], sd[t, lo:lo + n], kin)
            ls = ls + F.pad(seg, (lo, E - lo - n))
            count[g] += keep[t]
        rows.append(row)
        load_s = load_s + keep[t] * ls
    probs = torch.stack(rows)
    g_of = torch.tensor([g for g, n in enumerate(sizes) for _ in range(n)])
    load_h = load_p[g_of] * load_s / count[g_of].clamp_min(1.0)
    return probs, (probs * keep[:, None]).sum(0), load_h


# ---------------------------------------------------------------- pure functions
def test_cv_squared_hand():
    # mean 3, population variance (4+1+0+9)/4 = 3.5 -> 3.5/9; one-hot over E experts -> E-1.
    assert cv_squared(torch.tensor([1.0, 2.0, 3.0, 6.0])).item() == pytest.approx(3.5 / 9)
    assert cv_squared(torch.tensor([0.0, 0.0, 5.0, 0.0])).item() == pytest.approx(3.0)


@pytest.mark.parametrize("k", [1, 2, 5, 6])
def test_kth_excluding_and_smooth_load_against_loop(k):
    g = torch.Generator().manual_seed(k)
    clean = torch.randn(5, 6, generator=g, requires_grad=True)
    h = clean + torch.randn(5, 6, generator=g)
    sd = torch.rand(5, 6, generator=g) + 0.1
    chosen = torch.zeros(5, 6, dtype=torch.bool).scatter(1, torch.topk(h, k).indices, True)
    thr = kth_excluding(h, k, chosen)
    p = prob_in_topk(clean, h, sd, chosen, k)
    for t in range(5):
        for i in range(6):
            others = torch.sort(torch.cat([h[t, :i], h[t, i + 1:]]), descending=True).values
            want = others[k - 1] if k <= 5 else torch.tensor(float("-inf"))
            assert thr[t, i].item() == pytest.approx(want.item())
        assert torch.allclose(p[t], ref_prob(clean[t], h[t], sd[t], k), atol=1e-6)
    p.sum().backward()  # k = E: every threshold is -inf; the backward must stay finite
    assert torch.isfinite(clean.grad).all()


# ---------------------------------------------------------------- flat router
def test_zero_init_and_params():
    r = router(8, 2)
    assert r.noise_weight is not None and r.bias is not None
    for p in r.parameters():
        assert p.abs().sum() == 0
    h = router(8, 2, hierarchical=True, group_sizes=[4, 4], group_topk=2)
    names = {n for n, _ in h.named_parameters()}
    assert names == {"weight", "bias", "noise_weight", "group_weight", "group_noise_weight"}
    assert all(p.abs().sum() == 0 for p in h.parameters())
    assert h.group_weight.shape == (2, D)
    assert router(8, 2, gating=NoisyGatingConfig(noise=False)).noise_weight is None


def test_eval_gates_hand():
    # x_t = e_t, so (x W_g^T)_t = W_g[:, t]. Token 0 logits [1, 3, 2, 0] -> experts 1, 2 with
    # softmax([3, 2]) = [e/(e+1), 1/(e+1)]; token 1 logits [0, 0, 5, 4] -> 2, 3.
    r = router(4, 2)
    r.eval()
    with torch.no_grad():
        r.weight[:, 0] = torch.tensor([1.0, 3.0, 2.0, 0.0])
        r.weight[:, 1] = torch.tensor([0.0, 0.0, 5.0, 4.0])
        r.noise_weight.fill_(3.0)  # no noise in eval whatever W_noise is
    x = torch.eye(D)[:2].view(2, 1, D)
    e = math.e
    want = torch.tensor([[0, e / (e + 1), 1 / (e + 1), 0], [0, 0, e / (e + 1), 1 / (e + 1)]])
    for _ in range(2):
        probs, rmap = r(x)
        assert torch.allclose(probs, want, atol=1e-6)
        assert rmap.tolist() == (want > 0).tolist()


def test_noise_only_in_training_matches_formula():
    r = router(6, 2)
    randomize(r)
    x = torch.randn(4, 2, D)
    r.train()
    torch.manual_seed(3)
    probs, rmap = r(x)
    torch.manual_seed(3)
    noise = torch.randn(8, 6)
    with torch.no_grad():
        want, _, _ = ref_flat(x.view(8, D), r.weight, r.bias, r.noise_weight, noise, 2,
                              torch.ones(8))
    assert torch.allclose(probs, want, atol=1e-6)
    assert (rmap.sum(1) == 2).all()
    torch.manual_seed(4)
    assert not torch.equal(r(x)[0], probs)  # fresh noise each step
    r.eval()
    a, b = r(x)[0], r(x)[0]
    assert torch.equal(a, b)
    with torch.no_grad():
        clean, _, _ = ref_flat(x.view(8, D), r.weight, r.bias, r.noise_weight,
                               torch.zeros(8, 6), 2, torch.ones(8))
    assert torch.allclose(a, clean, atol=1e-6)
    r_off = router(6, 2, gating=NoisyGatingConfig(noise=False))
    randomize(r_off)
    assert torch.equal(r_off(x)[0], r_off(x)[0])  # training but noise disabled


@pytest.mark.parametrize("padded", [False, True])
def test_flat_losses_and_grads_against_loop(padded):
    r = router(6, 2, gating=NoisyGatingConfig(importance_coeff=0.3, load_coeff=0.7))
    randomize(r)
    x = torch.randn(3, 2, D)
    pad = torch.tensor([[False, False], [False, True], [True, False]]) if padded else None
    keep = torch.ones(6) if pad is None else (~pad).reshape(-1).float()
    R = torch.randn(6, 6)
    torch.manual_seed(7)
    probs, rmap = r(x, padding_mask=pad)
    (probs * R).sum().backward()
    torch.manual_seed(7)
    noise = torch.randn(6, 6)
    leaves = [r.weight.detach().clone().requires_grad_(), r.bias.detach().clone().requires_grad_(),
              r.noise_weight.detach().clone().requires_grad_()]
    p_ref, imp, load = ref_flat(x.view(6, D), leaves[0], leaves[1], leaves[2], noise, 2, keep)
    assert torch.allclose(probs, p_ref, atol=1e-6) and (rmap.sum(1) == 2).all()
    assert logged(IMPORTANCE_LOSS_NAME) == pytest.approx(cv2_ref(imp).item(), rel=1e-5)
    assert logged(LOAD_LOSS_NAME) == pytest.approx(cv2_ref(load).item(), rel=1e-5)
    ((p_ref * R).sum() + 0.3 * cv2_ref(imp) + 0.7 * cv2_ref(load)).backward()
    for mine, ref in zip((r.weight, r.bias, r.noise_weight), leaves):
        assert torch.allclose(mine.grad, ref.grad, atol=1e-5), (mine.grad, ref.grad)
    assert torch.allclose(r.importance_E, imp.detach().double(), atol=1e-6)
    assert torch.equal(r.tokens_per_expert_E, (rmap.float() * keep[:, None]).sum(0))


def test_load_loss_alone_reaches_both_gate_weights():
    r = router(8, 2, gating=NoisyGatingConfig(importance_coeff=0.0, load_coeff=1.0))
    randomize(r, 0.3)
    probs, _ = r(torch.randn(16, 1, D))
    (probs * 0).sum().backward()  # zero task gradient: only the attached load loss remains
    assert r.weight.grad.abs().sum() > 0 and r.noise_weight.grad.abs().sum() > 0
    with torch.no_grad():
        probs, _ = r(torch.randn(16, 1, D))
    assert probs.grad_fn is None  # no losses without grad


def test_no_noise_load_is_hard_counts_logged_only():
    # Logits [2,1,0,0] for tokens 0-2, [0,0,1,2] for token 3 -> counts [3,3,1,1] (cv^2 = 1/4);
    # gates softmax([2,1]) = [a, 1-a] -> importance [3a, 3(1-a), 1-a, a].
    r = router(4, 2, gating=NoisyGatingConfig(noise=False, importance_coeff=0.0, load_coeff=1.0))
    with torch.no_grad():
        r.weight[:, 0] = torch.tensor([2.0, 1.0, 0.0, 0.0])
        r.weight[:, 1] = torch.tensor([0.0, 0.0, 1.0, 2.0])
    x = torch.zeros(4, 1, D)
    x[:3, 0, 0] = 1.0
    x[3, 0, 1] = 1.0
    probs, _ = r(x)
    assert logged(LOAD_LOSS_NAME) == pytest.approx(0.25)
    (probs * 0).sum().backward()
    assert r.weight.grad.abs().sum() == 0  # hard counts carry no gradient; nothing attached
    r2 = router(4, 2, gating=NoisyGatingConfig(noise=False, importance_coeff=1.0, load_coeff=0.0))
    r2.load_state_dict(r.state_dict())
    r2(x)
    a = 1 / (1 + math.exp(-1))
    assert logged(IMPORTANCE_LOSS_NAME) == pytest.approx(
        cv2_ref(torch.tensor([3 * a, 3 * (1 - a), 1 - a, a])).item(), rel=1e-6)


def test_per_token_loss_scales_by_valid_tokens():
    grads = []
    for per_token in (False, True):
        r = router(6, 2, tc_kw=dict(calculate_per_token_loss=per_token))
        randomize(r)
        torch.manual_seed(0)
        probs, _ = r(torch.randn(4, 2, D), padding_mask=torch.tensor([[False, True]] * 4))
        (probs * 0).sum().backward()
        grads.append(r.weight.grad.clone())
    assert torch.allclose(grads[1], 4 * grads[0], atol=1e-6)


class _FakeGroup:
    def __init__(self, n):
        self.n = n

    def size(self):
        return self.n


def test_losses_use_global_sums_and_log_once(monkeypatch):
    """Stand-in for a second SP/CP rank: the reduce adds its per-expert sums (no grad back)."""
    other = torch.tensor([5.0, 0.0, 1.0, 0.0, 2.0, 0.0, 3.0, 1.0, 0.0, 2.0, 0.0, 4.0])

    class _AddOther(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, group):
            assert group is r.tp_cp_group
            return x + other

        @staticmethod
        def backward(ctx, g):
            return g, None

    monkeypatch.setattr(nt, "reduce_from_tensor_model_parallel_region", _AddOther.apply)
    r = router(6, 2)
    randomize(r)
    r.tp_cp_group = _FakeGroup(2)
    x = torch.randn(5, 1, D)
    torch.manual_seed(1)
    probs, _ = r(x)
    (probs * 0).sum().backward()
    torch.manual_seed(1)
    noise = torch.randn(5, 6)
    leaves = [r.weight.detach().clone().requires_grad_(), r.bias.detach().clone().requires_grad_(),
              r.noise_weight.detach().clone().requires_grad_()]
    _, imp, load = ref_flat(x.view(5, D), *leaves, noise, 2, torch.ones(5))
    imp, load = imp + other[:6], load + other[6:]
    # Each of the 2 ranks logs half, so the tracker's sum over tp_cp shows the loss once.
    assert logged(IMPORTANCE_LOSS_NAME) == pytest.approx(cv2_ref(imp).item() / 2, rel=1e-5)
    assert logged(LOAD_LOSS_NAME) == pytest.approx(cv2_ref(load).item() / 2, rel=1e-5)
    (0.1 * cv2_ref(imp) + 0.1 * cv2_ref(load)).backward()
    for mine, ref in zip((r.weight, r.bias, r.noise_weight), leaves):
        assert torch.allclose(mine.grad, ref.grad, atol=1e-6)


def test_exactly_k_and_slot_order_with_ep2():
    mc = MoHGEConfig(widths=[32, 64, 96, 128], experts_per_group=4, group_topk=2, topk=4,
                     router={"type": "noisy_topk"})
    tc = mc.apply_to(tcfg(16, 4))
    pgc = copy.copy(moe_utils.get_default_pg_collection())
    pgc.ep = _FakeGroup(2)
    r1 = NoisyTopKRouter.for_mohge(tc, mohge_config=mc)
    r2 = NoisyTopKRouter.for_mohge(tc, pgc, mohge_config=mc)
    want = plan_allocation(mc.widths, mc.experts_per_group, 2).slot_to_canonical
    assert r1.slot_to_canonical.tolist() == plan_allocation(mc.widths, 4, 1).slot_to_canonical
    assert r1.identity_layout and r2.slot_to_canonical.tolist() == want
    assert want != list(range(16))
    randomize(r1)
    r2.load_state_dict(r1.state_dict())
    r1.eval(), r2.eval()
    x = torch.randn(7, 2, D)
    p1, m1 = r1(x)
    p2, m2 = r2(x)
    assert torch.equal(p2, p1[:, want]) and torch.equal(m2, m1[:, want])
    assert (m1.sum(1) == 4).all()
    # Metrics stay canonical whatever the slot order.
    assert torch.equal(r2.tokens_per_expert_E, m1.float().sum(0))
    assert torch.allclose(r2.importance_E, p1.sum(0).double())
    r2.counter.reset()
    assert r2.importance_E.abs().sum() == 0 and r2.tokens_seen == 0



def test_importance_is_a_window_count_reset_and_restored_with_the_others():
    """Regression: Importance lived in its own float32 buffer that the trainer's
    reset_routing_counts / snapshot / restore skipped, so the reported importance CV spanned
    every forward since the model was built (evaluations included), and Float16Module's
    cast made it bf16."""
    from megatron_mohge.metrics import (reset_routing_counts, restore_routing_counts,
                                        snapshot_routing_counts)

    r = router(6, 2, gating=NoisyGatingConfig(importance_coeff=0.3, load_coeff=0.7))
    randomize(r)
    x = torch.randn(5, 2, D)
    p_train, _ = r(x)
    train_imp = r.importance_E.clone()
    assert train_imp.dtype == torch.float64 and train_imp.sum() > 0
    saved = snapshot_routing_counts([r])  # what Trainer.evaluate does around evaluation
    reset_routing_counts([r])
    assert r.importance_E.abs().sum() == 0
    r.eval()
    p_eval, _ = r(x)
    assert torch.allclose(r.importance_E, p_eval.detach().sum(0).double())
    restore_routing_counts(saved)
    assert torch.equal(r.importance_E, train_imp)
    r.bfloat16()  # what Float16Module does to its submodules
    assert r.importance_E.dtype == torch.float64 and torch.equal(r.importance_E, train_imp)

# ---------------------------------------------------------------- hierarchical router
def hier(sizes, kg, K, **kw):
    return router(sum(sizes), K, hierarchical=True, group_sizes=sizes, group_topk=kg, **kw)


@pytest.mark.parametrize("sizes", [[2, 3, 4], [3, 3, 3]])
def test_hierarchical_routing_losses_and_grads_against_loop(sizes):
    # K = Kg * k_in = 2 * 2: groups of 2 always keep both experts (kth_excluding is -inf there).
    r = hier(sizes, 2, 4, gating=NoisyGatingConfig(importance_coeff=0.4, load_coeff=0.6))
    randomize(r)
    T, E, G = 8, sum(sizes), len(sizes)
    x = torch.randn(4, 2, D)
    pad = torch.zeros(4, 2, dtype=torch.bool)
    pad[3, 1] = True
    keep = (~pad).reshape(-1).float()
    R = torch.randn(T, E)
    torch.manual_seed(11)
    probs, rmap = r(x, padding_mask=pad)
    (probs * R).sum().backward()
    torch.manual_seed(11)
    nE, nG = torch.randn(T, E), torch.randn(T, G)  # the router draws expert noise first
    names = ("group_weight", "group_noise_weight", "weight", "bias", "noise_weight")
    leaves = {n: getattr(r, n).detach().clone().requires_grad_() for n in names}
    p_ref, imp, load = ref_hier(x.view(T, D), leaves["group_weight"],
                                leaves["group_noise_weight"], leaves["weight"], leaves["bias"],
                                leaves["noise_weight"], nG, nE, sizes, 2, 2, keep)
    assert torch.allclose(probs, p_ref, atol=1e-6)
    assert (rmap.sum(1) == 4).all() and torch.equal(rmap, p_ref > 0)
    assert logged(IMPORTANCE_LOSS_NAME) == pytest.approx(cv2_ref(imp).item(), rel=1e-5)
    assert logged(LOAD_LOSS_NAME) == pytest.approx(cv2_ref(load).item(), rel=1e-5)
    ((p_ref * R).sum() + 0.4 * cv2_ref(imp) + 0.6 * cv2_ref(load)).backward()
    for n in names:
        assert torch.allclose(getattr(r, n).grad, leaves[n].grad, atol=1e-5), n


def test_hierarchical_eval_structure():
    sizes = [4, 4, 4, 4]
    r = hier(sizes, 2, 4)
    randomize(r)
    r.eval()
    x = torch.randn(32, 1, D)
    probs, rmap = r(x)
    u = x.view(32, D) @ r.group_weight.T
    gsel = torch.topk(u, 2).indices
    gp = torch.softmax(torch.gather(u, 1, gsel), -1)
    z = (x.view(32, D) @ r.weight.T + r.bias).view(32, 4, 4)
    for t in range(32):
        groups = set(torch.nonzero(rmap[t]).flatten().div(4, rounding_mode="floor").tolist())
        assert groups == set(gsel[t].tolist())  # chosen experts lie in the chosen groups
        for a, g in enumerate(gsel[t].tolist()):
            w = probs[t, 4 * g:4 * g + 4]
            assert (w > 0).sum() == 2  # K / Kg experts per chosen group
            top = torch.topk(z[t, g], 2)
            want = gp[t, a] * torch.softmax(top.values, -1)  # primary * secondary
            assert torch.allclose(w[top.indices], want, atol=1e-6)
    want_G = torch.zeros(4).index_add_(0, gsel.flatten(), torch.ones(64))
    assert torch.equal(r.tokens_per_group_G, want_G)


def test_hierarchical_losses_hand():
    # 2 groups x 2 experts, Kg=2, K=2 (one expert per group), no noise. Group logits
    # [0, ln 3] -> G_primary = [1/4, 3/4]; tokens 0, 2: u=[0, ln3], z=[1,0 | 0,2] -> experts 0, 3;
    # token 1: u=[ln3, 0], z=[0,1 | 5,0] -> experts 1 (3/4), 2 (1/4).
    # Importance_H = [1/2, 3/4, 1/4, 3/2]: mean 3/4, var 7/32 -> CV^2 = 7/18.
    # Load_H = Load_primary_i * Load_i / |X^(i)| = counts [2, 1, 1, 2] -> CV^2 = 1/9.
    r = hier([2, 2], 2, 2, gating=NoisyGatingConfig(noise=False))
    ln3 = math.log(3.0)
    with torch.no_grad():
        r.group_weight[:, 0] = torch.tensor([0.0, ln3])
        r.group_weight[:, 1] = torch.tensor([ln3, 0.0])
        r.weight[:, 0] = torch.tensor([1.0, 0.0, 0.0, 2.0])
        r.weight[:, 1] = torch.tensor([0.0, 1.0, 5.0, 0.0])
    x = torch.eye(D)[[0, 1, 0]].view(3, 1, D)
    probs, _ = r(x)
    assert torch.allclose(probs, torch.tensor([[0.25, 0, 0, 0.75], [0, 0.75, 0.25, 0],
                                               [0.25, 0, 0, 0.75]]))
    assert logged(IMPORTANCE_LOSS_NAME) == pytest.approx(7 / 18, rel=1e-6)
    assert logged(LOAD_LOSS_NAME) == pytest.approx(1 / 9, rel=1e-6)


def test_z_loss_is_attached_flat_and_hierarchical():
    off = NoisyGatingConfig(importance_coeff=0.0, load_coeff=0.0)
    for r in (router(8, 2, tc_kw=dict(moe_z_loss_coeff=1e-2), gating=off),
              hier([4, 4], 2, 2, tc_kw=dict(moe_z_loss_coeff=1e-2), gating=off)):
        randomize(r)
        clear_metrics()
        x = torch.randn(6, 1, D)
        probs, _ = r(x)
        (probs * 0).sum().backward()  # only the z-loss is left
        assert r.weight.grad.abs().sum() > 0
        # the value: mean over tokens of logsumexp^2 of the clean logits (flat, Megatron's
        # z_loss_func), or of the group logits plus the mean over groups of the in-group
        # ones (two-level, as the MoHGE router)
        x_TD = x.view(6, D)
        z = x_TD @ r.weight.detach().T + (0 if r.bias is None else r.bias.detach())
        if r.hierarchical:
            u = x_TD @ r.group_weight.detach().T
            want = (torch.logsumexp(u, -1) ** 2).mean() + sum(
                (torch.logsumexp(z[:, g * 4:(g + 1) * 4], -1) ** 2).mean() for g in range(2)) / 2
        else:
            want = (torch.logsumexp(z, -1) ** 2).mean()
        assert logged("z_loss") == pytest.approx(want.item(), rel=1e-5)


# ---------------------------------------------------------------- configuration
@pytest.mark.parametrize("rtype", ["noisy_topk", "hierarchical_noisy_topk"])
def test_mohge_config_builds(rtype):
    mc = MoHGEConfig(widths=[32, 64, 96, 128], experts_per_group=4, group_topk=2, topk=4,
                     router={"type": rtype}, noisy_gating={"importance_coeff": 0.2})
    r = NoisyTopKRouter.for_mohge(mc.apply_to(tcfg(16, 4)), mohge_config=mc)
    assert r.hierarchical == (rtype == "hierarchical_noisy_topk")
    assert r.gating.importance_coeff == 0.2 and r.topk == 4 and r.group_sizes == [4] * 4
    assert r.slot_to_canonical.tolist() == plan_allocation(mc.widths, 4, 1).slot_to_canonical
    if r.hierarchical:
        assert r.group_topk == 2 and r.topk_in_group == 2
    probs, rmap = r(torch.randn(5, 2, D))
    assert (rmap.sum(1) == 4).all() and torch.allclose(probs.sum(1), torch.ones(10))


def test_invalid_setups_raise():
    with pytest.raises(ValueError, match="group_sizes"):
        router(8, 2, hierarchical=True)
    with pytest.raises(ValueError, match="multiple"):
        router(8, 3, hierarchical=True, group_sizes=[4, 4], group_topk=2)
    with pytest.raises(ValueError, match="smallest group"):
        router(8, 4, hierarchical=True, group_sizes=[1, 7], group_topk=2)
    with pytest.raises(ValueError, match="group_topk"):
        router(8, 3, hierarchical=True, group_sizes=[4, 4], group_topk=3)
    with pytest.raises(ValueError, match="load_balancing_type"):
        NoisyTopKRouter(tcfg(8, 2, moe_router_load_balancing_type="aux_loss",
                             moe_aux_loss_coeff=1e-2))
    mc = MoHGEConfig(widths=[32, 64], experts_per_group=4, group_topk=1, topk=2)  # type mohge
    with pytest.raises(ValueError, match="MoHGERouter"):
        NoisyTopKRouter.for_mohge(mc.apply_to(tcfg(8, 2)), mohge_config=mc)
    mc.router.type = "noisy_topk"
    with pytest.raises(TypeError, match="group_topk"):  # it comes from the MoHGE config
        NoisyTopKRouter.for_mohge(mc.apply_to(tcfg(8, 2)), mohge_config=mc, group_topk=1)


# ---------------------------------------------------------------- balancing works
def _train_router(coeff, steps=100, E=8, K=2, T=64, seed=0):
    """Train the gate alone with a task that prefers expert 0; return CV(load) after training."""
    torch.manual_seed(seed)
    r = router(E, K, gating=NoisyGatingConfig(importance_coeff=coeff, load_coeff=coeff))
    opt = torch.optim.Adam(r.parameters(), lr=0.05)
    for _ in range(steps):
        probs, _ = r(torch.randn(T, 1, D))
        opt.zero_grad()
        (-probs[:, 0].mean()).backward()
        opt.step()
    r.eval()
    r.counter.reset()
    with torch.no_grad():
        r(torch.randn(1024, 1, D))
    fig = r.routing_figures()  # the counter's figures (one CV formula for every router)
    return {"cv_load": fig.expert_load_cv, "max_mean_load": fig.expert_load_max_over_mean}


def test_balancing_losses_balance_the_load():
    free, balanced = _train_router(0.0), _train_router(1.0)
    assert free["cv_load"] > 1.0 and free["max_mean_load"] > 3.0  # collapsed onto expert 0
    assert balanced["cv_load"] < 0.25 * free["cv_load"]
    assert balanced["cv_load"] < 0.3 and balanced["max_mean_load"] < 1.6


# ---------------------------------------------------------------- robustness (issue 9, part 3)
def test_input_jitter_only_while_training():
    # Same rule as the MoHGE router (GroupedExpertRouter.jitter): Megatron's TopKRouter also
    # jitters in evaluation; ours do not.
    r = router(8, 2, tc_kw=dict(moe_input_jitter_eps=0.5), gating=NoisyGatingConfig(noise=False))
    randomize(r, scale=1.0)
    x = torch.randn(64, 1, D)
    r.eval()
    p1, _ = r(x)
    p2, _ = r(x)
    assert torch.equal(p1, p2)
    r.train()
    t1, _ = r(x)
    assert not torch.allclose(t1, p1)  # inputs scaled by U(0.5, 1.5) change the gates


def test_noise_epsilon_must_be_positive():
    with pytest.raises(ConfigError, match=r"^NoisyGatingConfig\.noise_epsilon: must be > 0"):
        router(8, 2, gating=NoisyGatingConfig(noise_epsilon=0.0))


@pytest.mark.parametrize("hierarchical", [False, True])
def test_noise_std_floor_keeps_gradients_finite_when_softplus_underflows(hierarchical):
    # Inputs x1e4 drive x W_noise far below -104, where fp32 softplus is exactly 0. Even with
    # eps = 0 (rejected by validation; forced here) the std floor keeps the smooth load
    # estimator's gradients finite.
    kw = dict(hierarchical=True, group_sizes=[4, 4], group_topk=2) if hierarchical else {}
    r = router(8, 4 if hierarchical else 2, **kw)
    randomize(r, seed=3)
    with torch.no_grad():
        for name in ("noise_weight", "group_noise_weight"):
            if getattr(r, name, None) is not None:
                getattr(r, name).copy_(-getattr(r, name).abs())
    r.gating.noise_epsilon = 0.0
    x = torch.rand(16, 1, D) * 1e4
    probs, _ = r(x)
    (probs * torch.randn_like(probs)).sum().backward()
    for p in r.parameters():
        assert p.grad is None or torch.isfinite(p.grad).all()
    sd = nt.noise_stddev(torch.tensor([-1e5, -200.0, 0.0]), 0.0)
    assert (sd > 0).all() and sd[2] == pytest.approx(math.log(2.0))


def test_noise_toggle_changes_the_parameters_so_resume_refuses_it(tmp_path):
    """Regression: RESUMABLE_CHANGES let ``noisy_gating.noise`` change on resume, but it adds
    or removes W_noise, so the load then failed inside dist-ckpt blaming the checkpoint."""
    import yaml

    from megatron_mohge.config.run import RunConfig
    from megatron_mohge.training import checkpoint as ckpt_lib

    def keys(**gating):
        return set(router(8, 2, gating=NoisyGatingConfig(**gating)).state_dict())

    assert keys(noise=True) != keys(noise=False)
    # the noisy-gating entries that stay resumable leave the parameters alone
    resumable = [p.rsplit(".", 1)[1] for p in ckpt_lib.RESUMABLE_CHANGES
                 if p.startswith("moe.noisy_gating.")]
    assert resumable == ["importance_coeff", "load_coeff"]
    for name in resumable:
        assert keys(**{name: 0.5}) == keys(**{name: 0.0})

    for moe in ({"router": "noisy_topk"},
                {"kind": "mohge", "mohge": {"widths": [8, 16], "experts_per_group": 2,
                                            "group_topk": 1, "topk": 1,
                                            "router": {"type": "noisy_topk"}}}):
        saved = RunConfig.from_dict({"moe": moe}).to_dict()
        prefix = "moe.noisy_gating" if "kind" not in moe else "moe.mohge.noisy_gating"
        section = saved["moe"] if "kind" not in moe else saved["moe"]["mohge"]
        flipped = copy.deepcopy(saved)
        (flipped["moe"] if "kind" not in moe else flipped["moe"]["mohge"])["noisy_gating"][
            "noise"] = not section["noisy_gating"]["noise"]
        (tmp_path / ckpt_lib.RUN_FILE).write_text(yaml.safe_dump(saved))
        with pytest.raises(ConfigError, match=rf"{prefix}\.noise: True -> False"):
            ckpt_lib.check_compatible(tmp_path, flipped)
