"""All-size Group-decoupling Allocation: which expert lives in which global slot.

Megatron gives EP rank ``r`` the contiguous global expert ids ``[r*L, (r+1)*L)``. We keep
that contract and instead choose *which* expert sits in each slot (rank-major numbering);
the router permutes its columns into slot order, so Megatron's dispatchers run unchanged.

* When every group's size is divisible by EP, rank ``r`` takes experts
  ``[r*n_g, (r+1)*n_g)`` of every group ``g`` (``n_g = N_g / EP``): every width on every
  rank, so per-rank FLOPs are equal whatever the group popularity.
* Otherwise each rank still takes ``floor(N_g / EP)`` of every group, and the remainders
  are spread (at most one remainder expert of a group per rank where possible) so that
  per-rank width sums are balanced: longest-processing-time placement followed by
  pairwise swaps. The plan reports its predicted worst-case imbalance and is refused above
  a tolerance unless explicitly allowed.

Within a rank, local experts are ordered by group, so each width is one contiguous run
(one expert module / grouped GEMM per width).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from megatron_mohge.config.errors import ConfigError
from megatron_mohge.sizes import group_offsets


@dataclass(frozen=True)
class AllocationPlan:
    """Placement of ``E`` experts on ``ep_size`` ranks (``L = E / ep_size`` slots each)."""

    widths: tuple[int, ...]  # width of each group
    experts_per_group: tuple[int, ...]  # N_g
    ep_size: int
    slot_to_expert: tuple[tuple[int, int], ...]  # (group, index-in-group) held by each slot
    strategy: str  # "all-size" (exact), "balanced" (all-size base + balanced rest), "balanced-free"

    @property
    def num_experts(self) -> int:
        return len(self.slot_to_expert)

    @property
    def local_size(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def group_offsets(self) -> list[int]:
        return group_offsets(self.experts_per_group)

    def canonical_id(self, group: int, index: int) -> int:
        """Group-major id of expert (group, index): the router's column order."""
        return self.group_offsets[group] + index

    @property
    def slot_to_canonical(self) -> list[int]:
        """Canonical expert id at each global slot; ``probs_slot = probs[:, slot_to_canonical]``."""
        return [self.canonical_id(g, i) for g, i in self.slot_to_expert]

    @property
    def canonical_to_slot(self) -> list[int]:
        inv = [0] * self.num_experts
        for slot, cid in enumerate(self.slot_to_canonical):
            inv[cid] = slot
        return inv

    def local_experts(self, rank: int) -> list[tuple[int, int]]:
        """(group, index) of the experts EP rank ``rank`` holds, in local slot order."""
        lo = rank * self.local_size
        return list(self.slot_to_expert[lo: lo + self.local_size])

    def local_runs(self, rank: int) -> list[tuple[int, list[int]]]:
        """Contiguous runs of one group on ``rank``: ``[(group, [indices...]), ...]``."""
        runs: list[tuple[int, list[int]]] = []
        for g, i in self.local_experts(rank):
            if runs and runs[-1][0] == g:
                runs[-1][1].append(i)
            else:
                runs.append((g, [i]))
        return runs

    def local_widths(self, rank: int) -> list[int]:
        """Width of each expert EP rank ``rank`` holds, in local slot order."""
        return [self.widths[g] for g, _ in self.local_experts(rank)]

    @property
    def rank_width_sums(self) -> list[int]:
        """Sum of expert widths per EP rank (per-token FLOPs of a balanced rank ~ this)."""
        return [sum(self.local_widths(r)) for r in range(self.ep_size)]

    @property
    def imbalance(self) -> float:
        """max/mean of ``rank_width_sums`` (1.0 is perfect)."""
        sums = self.rank_width_sums
        return max(sums) / (sum(sums) / len(sums))

    def rank_flops(self, tokens_per_expert: Sequence[float], canonical: bool = True) -> list[float]:
        """Per-rank expert work ``sum_e n_e * W_e`` for measured token counts."""
        widths = [self.widths[g] for g, n in enumerate(self.experts_per_group) for _ in range(n)]
        order = self.slot_to_canonical if canonical else list(range(self.num_experts))
        per_slot = [tokens_per_expert[c] * widths[c] for c in order]
        L = self.local_size
        return [float(sum(per_slot[r * L:(r + 1) * L])) for r in range(self.ep_size)]

    def table(self) -> str:
        """Human-readable allocation table, one line per EP rank."""
        lines = [f"EP={self.ep_size} strategy={self.strategy} imbalance={self.imbalance:.4f}"]
        for r in range(self.ep_size):
            runs = ", ".join(f"g{g}(W={self.widths[g]})x{len(ix)}" for g, ix in self.local_runs(r))
            lines.append(f"  rank {r}: width_sum={self.rank_width_sums[r]}  {runs}")
        return "\n".join(lines)


def plan_allocation(widths: Sequence[int], experts_per_group, ep_size: int, *,
                    max_imbalance: float = 1.05, allow_imbalance: bool = False) -> AllocationPlan:
    """Plan the rank-major slot layout of a MoHGE layer over ``ep_size`` expert-parallel ranks.

    Raises ``ConfigError`` when the experts cannot be laid out (``E % ep_size != 0``) or when
    the best plan found exceeds ``max_imbalance`` and ``allow_imbalance`` is False.
    """
    widths = tuple(int(w) for w in widths)
    if isinstance(experts_per_group, int):
        experts_per_group = [experts_per_group] * len(widths)
    counts = tuple(int(n) for n in experts_per_group)
    if len(counts) != len(widths):
        raise ConfigError(f"plan_allocation: experts_per_group has {len(counts)} entries but "
                          f"widths has {len(widths)}")
    if not isinstance(ep_size, int) or ep_size < 1:
        raise ConfigError(f"plan_allocation: ep_size must be a positive integer, got {ep_size!r}")
    total = sum(counts)
    if total % ep_size:
        raise ConfigError(
            f"MoHGEConfig.experts_per_group: {total} experts cannot be laid out over "
            f"expert_model_parallel_size={ep_size} (Megatron gives every EP rank the same number "
            f"of experts). Use an EP size that divides {total}, or change experts_per_group.")

    if all(n % ep_size == 0 for n in counts):
        per_rank = [[] for _ in range(ep_size)]
        for g, n in enumerate(counts):
            k = n // ep_size
            for r in range(ep_size):
                per_rank[r].extend((g, i) for i in range(r * k, (r + 1) * k))
        plan = AllocationPlan(widths, counts, ep_size, _flatten(per_rank), "all-size")
    else:
        # Prefer keeping floor(N_g/EP) of every group on every rank (robust to uneven group
        # popularity); fall back to a free placement only if that one misses the tolerance.
        plan = AllocationPlan(widths, counts, ep_size,
                              _flatten(_balanced(widths, counts, ep_size, keep_base=True)),
                              "balanced")
        if plan.imbalance > max_imbalance + 1e-12:
            free = AllocationPlan(widths, counts, ep_size,
                                  _flatten(_balanced(widths, counts, ep_size, keep_base=False)),
                                  "balanced-free")
            if free.imbalance < plan.imbalance - 1e-12:
                plan = free

    if plan.imbalance > max_imbalance + 1e-12 and not allow_imbalance:
        sums = plan.rank_width_sums
        shown = sums if len(sums) <= 8 else f"from {min(sums)} to {max(sums)}"
        raise ConfigError(
            f"MoHGEConfig.allocation.max_imbalance: the best layout of {total} experts over "
            f"EP={ep_size} has per-rank width sums {shown} (max/mean "
            f"{plan.imbalance:.4f} > {max_imbalance}). Pick an EP size that divides every group "
            "size, raise allocation.max_imbalance, or set allocation.allow_imbalance: true.")
    return plan


def _flatten(per_rank: list[list[tuple[int, int]]]) -> tuple[tuple[int, int], ...]:
    # Order each rank's experts by (group, index): one contiguous run per width.
    return tuple(e for rank in per_rank for e in sorted(rank))


def _balanced(widths, counts, ep_size, keep_base: bool) -> list[list[tuple[int, int]]]:
    """General plan: [floor(N_g/EP) of every group everywhere,] the rest balanced by width."""
    per_rank: list[list[tuple[int, int]]] = [[] for _ in range(ep_size)]
    next_index = [0] * len(counts)
    for g, n in enumerate(counts):
        k = n // ep_size if keep_base else 0
        for r in range(ep_size):
            per_rank[r].extend((g, next_index[g] + j) for j in range(k))
            next_index[g] += k
    capacity = sum(counts) // ep_size
    # Remainder experts, widest first (LPT): each goes to the least-loaded rank that has room,
    # preferring ranks that do not hold a remainder expert of the same group yet.
    items = [(g, i) for g, n in enumerate(counts) for i in range(next_index[g], n)]
    items.sort(key=lambda e: (-widths[e[0]], e))
    load = [sum(widths[g] for g, _ in rank) for rank in per_rank]
    extra_groups: list[set[int]] = [set() for _ in range(ep_size)]
    for g, i in items:
        open_ranks = [r for r in range(ep_size) if len(per_rank[r]) < capacity]
        best = min(open_ranks, key=lambda r: (g in extra_groups[r], load[r], r))
        per_rank[best].append((g, i))
        extra_groups[best].add(g)
        load[best] += widths[g]
    _improve_by_swaps(per_rank, load, widths, movable=set(items))
    return per_rank


def _improve_by_swaps(per_rank, load, widths, movable, max_rounds: int = 1000) -> None:
    """Swap remainder experts between the most-loaded rank and others while its load drops.

    Only remainder experts move, so the all-size part (every group on every rank) stays.
    Each swap strictly lowers the maximum of the two ranks involved, so this terminates.
    """
    for _ in range(max_rounds):
        hi = max(range(len(load)), key=lambda r: (load[r], -r))
        best = None  # (new_max_pair, lo, a_idx, b_idx)
        for lo in range(len(load)):
            if lo == hi:
                continue
            for ai, ea in enumerate(per_rank[hi]):
                for bi, eb in enumerate(per_rank[lo]):
                    if ea not in movable or eb not in movable:
                        continue
                    d = widths[ea[0]] - widths[eb[0]]
                    if d <= 0:
                        continue
                    pair_max = max(load[hi] - d, load[lo] + d)
                    if pair_max < load[hi] and (best is None or pair_max < best[0]):
                        best = (pair_max, lo, ai, bi)
        if best is None:
            return
        _, lo, ai, bi = best
        a, b = per_rank[hi][ai], per_rank[lo][bi]
        per_rank[hi][ai], per_rank[lo][bi] = b, a
        d = widths[a[0]] - widths[b[0]]
        load[hi] -= d
        load[lo] += d
