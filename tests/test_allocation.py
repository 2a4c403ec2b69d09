"""All-size Group-decoupling Allocation planner."""

import itertools
import random

import pytest

from megatron_mohge import ConfigError, MoHGEConfig, plan_allocation


def check_plan_invariants(plan, widths, counts):
    E = sum(counts)
    # Every expert placed exactly once.
    assert sorted(plan.slot_to_expert) == [(g, i) for g, n in enumerate(counts) for i in range(n)]
    assert sorted(plan.slot_to_canonical) == list(range(E))
    for s, c in enumerate(plan.slot_to_canonical):
        assert plan.canonical_to_slot[c] == s
    L = E // plan.ep_size
    assert plan.local_size == L
    for r in range(plan.ep_size):
        local = plan.local_experts(r)
        assert len(local) == L
        # Local experts ordered by group: one contiguous run per width.
        groups = [g for g, _ in local]
        assert groups == sorted(groups)
        assert [g for g, _ in plan.local_runs(r)] == sorted(set(groups))
        assert plan.rank_width_sums[r] == sum(widths[g] for g in groups)
    sums = plan.rank_width_sums
    assert plan.imbalance == pytest.approx(max(sums) / (sum(sums) / len(sums)))


@pytest.mark.parametrize("ep", [1, 2, 4, 8, 16, 32])
def test_paper_8x8_layout(ep):
    c = MoHGEConfig.paper_3b()
    plan = plan_allocation(c.widths, c.experts_per_group, ep)
    check_plan_invariants(plan, c.widths, c.experts_per_group)
    assert plan.imbalance == 1.0  # arithmetic widths: exact at every EP size
    if ep <= 8:  # divisible: every group on every rank, contiguous indices per rank
        assert plan.strategy == "all-size"
        for r in range(ep):
            for g, idx in plan.local_runs(r):
                n = 8 // ep
                assert idx == list(range(r * n, (r + 1) * n))
            assert [g for g, _ in plan.local_runs(r)] == list(range(8))
    else:  # EP > N: complementary widths share a rank
        assert plan.strategy == "balanced"
        assert set(plan.rank_width_sums) == {53248 // ep}


def test_divisible_is_exact_for_any_popularity():
    # With every width on every rank in equal numbers, rank FLOPs are equal whatever the
    # group popularity, as long as experts inside a group are balanced.
    c = MoHGEConfig(widths=[64, 192, 448], experts_per_group=[4, 8, 4], group_topk=2, topk=2)
    plan = plan_allocation(c.widths, c.experts_per_group, 4)
    rng = random.Random(0)
    for _ in range(5):
        group_load = [rng.uniform(1, 100) for _ in c.widths]  # tokens per expert of group g
        tokens = [group_load[g] for g in c.expert_group]
        flops = plan.rank_flops(tokens)
        assert max(flops) / (sum(flops) / len(flops)) == pytest.approx(1.0)


def test_naive_contiguous_layout_is_worse():
    c = MoHGEConfig.paper_3b()
    plan = plan_allocation(c.widths, c.experts_per_group, 4)
    tokens = [1.0] * c.num_experts  # balanced experts
    naive = [sum(c.expert_widths[r * 16:(r + 1) * 16]) for r in range(4)]
    # rank 3 holds the two widest groups: 19456 vs a mean of 13312
    assert max(naive) / (sum(naive) / 4) == pytest.approx(19456 / 13312)
    assert max(plan.rank_flops(tokens)) == min(plan.rank_flops(tokens))


def _best_possible_max(widths, counts, ep):
    """Brute force the optimal max rank width sum (tiny cases only)."""
    items = [w for w, n in zip(widths, counts) for _ in range(n)]
    L = len(items) // ep
    best = None
    for perm in set(itertools.permutations(items)):
        m = max(sum(perm[r * L:(r + 1) * L]) for r in range(ep))
        best = m if best is None else min(best, m)
    return best


@pytest.mark.parametrize("widths, counts, ep", [
    ([100, 200, 300], [3, 3, 3], 3),
    ([64, 96, 128, 160, 192], [2, 2, 2, 2, 2], 5),
    ([384, 512, 640, 768], [3, 3, 3, 3], 4),
    ([384, 512, 640, 768], [3, 3, 3, 3], 2),
    ([128, 256, 640], [2, 2, 2], 3),
    ([100, 300, 500], [2, 5, 1], 4),
])
def test_non_divisible_plans_are_balanced(widths, counts, ep):
    plan = plan_allocation(widths, counts, ep, allow_imbalance=True)
    check_plan_invariants(plan, widths, counts)
    if sum(counts) <= 9:
        assert max(plan.rank_width_sums) == _best_possible_max(widths, counts, ep)
    else:
        # within one width step of the optimum; mean is a lower bound
        mean = sum(plan.rank_width_sums) / ep
        assert max(plan.rank_width_sums) - mean < max(widths)


def test_keeps_every_group_on_every_rank_when_it_is_balanced_enough():
    # 3 experts per group over 2 ranks: 1 of each group everywhere plus one remainder each.
    plan = plan_allocation([384, 512, 640, 768], [3, 3, 3, 3], 2)
    assert plan.strategy == "balanced"
    for r in range(2):
        assert {g for g, _ in plan.local_runs(r)} == {0, 1, 2, 3}


def test_refuses_unbalanced_plan_unless_allowed():
    with pytest.raises(ConfigError, match=r"max/mean 1\.6000 > 1\.05"):
        plan_allocation([64, 256], [1, 1], 2)
    plan = plan_allocation([64, 256], [1, 1], 2, allow_imbalance=True)
    assert plan.imbalance == pytest.approx(1.6)
    plan = plan_allocation([64, 256], [1, 1], 2, max_imbalance=1.7)
    assert plan.imbalance == pytest.approx(1.6)


def test_layout_errors():
    with pytest.raises(ConfigError, match="9 experts cannot be laid out over "
                                          "expert_model_parallel_size=2"):
        plan_allocation([1, 2, 3], [3, 3, 3], 2)
    with pytest.raises(ConfigError, match="ep_size must be a positive integer"):
        plan_allocation([1, 2], [2, 2], 0)


def test_table_mentions_every_rank():
    c = MoHGEConfig.paper_3b()
    text = plan_allocation(c.widths, c.experts_per_group, 16).table()
    assert "EP=16" in text and "rank 15" in text and "imbalance=1.0000" in text
