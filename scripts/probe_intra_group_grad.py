"""Why the paper's intra-group loss balances poorly: gradient reaching an overloaded expert.

Routes T tokens through the earlier tiny bench layer (8 groups x 2 experts, Kg=4, K=2) where,
inside every group, expert 0's logit leads expert 1's by ``delta`` (so in-group softmax
pi_0 = sigmoid(delta)): expert 0 is overloaded. Prints, per ``delta``, the gradient of each
balancing objective (coefficient 1) w.r.t. the overloaded experts' logits z_0 and the
load fraction, next to Megatron's stock switch loss on a 16-expert top-2 router with the
same logit gap (dense softmax over all experts, as Megatron's ``aux_loss``). Pure routing
math, no Megatron needed:

    python scripts/probe_intra_group_grad.py
"""

from __future__ import annotations

import torch

from megatron_mohge.routing import losses as L
from megatron_mohge.routing.functional import GroupIndex, two_level_route

T, G, N, KG, K = 4096, 8, 2, 4, 2


def main() -> None:
    torch.manual_seed(0)
    index = GroupIndex.build([N] * G)
    u = torch.randn(T, G, dtype=torch.float64)
    noise = 0.3 * torch.randn(T, G * N, dtype=torch.float64)
    print("| delta | pi_0 | load share of expert 0 | d paper / d z0 | d per_group / d z0 "
          "| d stock switch / d z0 |")
    print("|---|---|---|---|---|---|")
    for delta in (0.0, 1.0, 2.0, 4.0, 8.0):
        lead = torch.tensor([delta, 0.0] * G, dtype=torch.float64)
        z = (noise + lead).requires_grad_(True)
        r = two_level_route(u, z, index, KG, K)
        counts = L.count_tokens(r.group_mask_TG, r.routing_map_TE, None, None)
        paper = L.intra_group_loss_paper(r.probs_TE, counts, K, KG, N, 1.0, None)
        g_paper, = torch.autograd.grad(paper, z, retain_graph=True)
        pg = L.intra_group_loss_per_group(r.in_group_probs_TE, r.group_mask_TG, counts, index,
                                          [N] * G, 1.0, None)
        g_pg, = torch.autograd.grad(pg, z)
        # stock: 16 experts, dense softmax, top-2, Megatron's E * sum f_e P_e
        zs = (noise + lead).requires_grad_(True)
        p = torch.softmax(zs, -1)
        top = torch.topk(p, K, -1).indices
        n_e = torch.zeros(G * N, dtype=torch.float64).index_add_(
            0, top.reshape(-1), torch.ones(T * K, dtype=torch.float64))
        stock = G * N * torch.sum(n_e / (T * K) * p.mean(0))
        g_st, = torch.autograd.grad(stock, zs)
        share0 = float(r.routing_map_TE[:, 0::2].sum() / r.routing_map_TE.sum())
        col = slice(0, None, 2)
        print(f"| {delta:g} | {torch.sigmoid(torch.tensor(delta)):.3f} | {share0:.3f} | "
              f"{g_paper[:, col].sum(0).mean():.2e} | {g_pg[:, col].sum(0).mean():.2e} | "
              f"{g_st[:, col].sum(0).mean():.2e} |")


if __name__ == "__main__":
    main()
