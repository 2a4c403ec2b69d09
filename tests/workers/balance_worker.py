"""Balancing across data-parallel ranks (2 ranks, DP=2, EP=1 or 2).

* ``--mode bias``: a tiny MoHGE GPT with loss-free balancing trains a few steps through
  Megatron's schedule (``finalize_model_grads`` wrapped by our end-of-step hook); each rank
  reports its bias vectors and its step counters, so the test can check that the bias moved,
  is identical on every rank and was computed from the global batch.
* ``--mode gbs``: one MoHGE router, the same weights on both ranks, each rank routing half of
  a batch. Gradients of the aux losses (averaged over DP, as Megatron's DDP does) are compared
  with one rank routing the whole batch: equal with ``global_batch_stats``, different
  without.
"""

from __future__ import annotations

import os
import sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import common as C  # noqa: E402


def bias_mode(args) -> dict:
    from megatron_mohge import MoHGEConfig, get_mohge_decoder_block_spec
    from megatron_mohge.metrics import routers

    C.init_layout(tp=1, ep=args.ep, pp=1)
    mc = MoHGEConfig(widths=[16, 32, 48, 64], experts_per_group=2, group_topk=2, topk=2,
                     losses=dict(group_coeff=1e-2, group_start_fraction=0.0,
                                 intra_group_coeff=0.0, expert_bias_update_rate=0.05))
    tc = mc.apply_to(C.tiny_gpt_config(moe_layer_freq=[1, 0, 1, 1], moe_aux_loss_coeff=0.0,
                                       moe_router_load_balancing_type="none"))
    model = C.wrap_ddp(C.build_gpt(tc, get_mohge_decoder_block_spec(tc, mc, use_te=False)), tc)
    gen = torch.Generator().manual_seed(7)  # spread the gates: uneven load to correct
    for name, p in C.unwrap(model).named_parameters():
        if name.endswith("router.weight") or name.endswith("router.group_weight"):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    opt = C.build_optimizer(model)
    rs = routers(C.model_chunks(model))
    C.train(model, opt, tc, args.steps)
    return {"biases_per_rank": C.all_gather_object([r.balance_bias_E.tolist() for r in rs]),
            "maxvio_batch_per_rank": C.all_gather_object(
                [float(r.counter.maxvio_batch_sum / r.counter.maxvio_batch_n) for r in rs]),
            "steps_counted": [float(r.counter.maxvio_batch_n) for r in rs],
            "step_forwards": [r.counter.step_forwards for r in rs]}


def gbs_mode(args) -> dict:
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_mohge import MoHGEConfig
    from megatron_mohge.routing import MoHGERouter

    C.init_layout(tp=1, ep=1, pp=1)
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    rank, world = dist.get_rank(), dist.get_world_size()
    x = torch.randn(2 * 24, 16, generator=torch.Generator().manual_seed(11))
    out = {}
    for mode in ("paper", "per_group"):
        grads = {}
        for gbs, part in ((True, "split"), (False, "split"), (False, "full")):
            mc = MoHGEConfig(widths=[32, 64, 96], experts_per_group=[2, 3, 2], group_topk=2,
                             topk=2, losses=dict(group_start_fraction=0.0, group_coeff=1e-2,
                                                 intra_group_coeff=5e-3, intra_group_mode=mode,
                                                 global_batch_stats=gbs))
            tc = mc.apply_to(TransformerConfig(num_layers=2, hidden_size=16,
                                               num_attention_heads=2, add_bias_linear=False,
                                               use_cpu_initialization=True))
            router = MoHGERouter(tc, mohge_config=mc)
            router.set_layer_number(1)
            gen = torch.Generator().manual_seed(5)
            with torch.no_grad():
                router.weight.copy_(torch.randn(router.weight.shape, generator=gen) * 0.5)
                router.group_weight.copy_(torch.randn(router.group_weight.shape, generator=gen))
            router.train()
            if part == "full":  # one rank sees the whole batch: no collective inside
                router.tp_dp_cp_group = router.tp_cp_group
                xs = x
            else:
                xs = x.chunk(world)[rank]
            probs, _ = router(xs)
            (probs * 0).sum().backward()  # only the aux losses' gradients
            g = torch.cat([router.weight.grad.reshape(-1), router.group_weight.grad.reshape(-1)])
            if part == "split":  # DDP: mean over data-parallel ranks
                dist.all_reduce(g)
                g /= world
            grads[f"{part}_gbs{int(gbs)}"] = g
        ref = grads["full_gbs0"]
        out[mode] = {
            "gbs_max_abs_diff": float((grads["split_gbs1"] - ref).abs().max()),
            "local_max_abs_diff": float((grads["split_gbs0"] - ref).abs().max()),
            "ref_max_abs": float(ref.abs().max()),
        }
    return out


def main():
    args = C.parse_args(extra=lambda p: (p.add_argument("--mode", required=True),
                                         p.add_argument("--ep", type=int, default=1),
                                         p.add_argument("--steps", type=int, default=4)))
    C.init_distributed()
    result = bias_mode(args) if args.mode == "bias" else gbs_mode(args)
    C.write_result(args, result)
    C.destroy_layout()


if __name__ == "__main__":
    main()
