"""MoHGE GPT under EP/TP/PP layouts vs a 1-rank reference: logits, loss, aux losses, grads.

``--mode reference`` (1 rank): builds the tiny MoHGE GPT, saves its initial weights
(``init/``), runs the global batch as micro-batches and saves the finalized gradients as a
checkpoint (``grad/``: every parameter replaced by its gradient), plus logits, loss and the
aux-loss values (``reference.pt``).

``--mode compare`` (N ranks): for each requested layout, builds the same model sharded
over that layout, loads ``init/`` (dist-ckpt reshards it through the MoHGE (group, index)
expert keys), runs this rank's part of the same global batch, and compares per rank:
its logits slice, the global loss, the aux losses, and every local gradient against the
reference gradient loaded into a second model of the same layout from ``grad/``.
"""

from __future__ import annotations

import os
import sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import common as C  # noqa: E402

AUX_NAMES = ("mohge_group_loss", "mohge_group_balance_loss", "mohge_intra_group_loss", "z_loss",
             "noisy_importance_loss", "noisy_load_loss")


def mohge_config(router_type: str = "mohge", backend: str = "local"):
    from megatron_mohge import MoHGEConfig

    # 8 experts in 4 groups of 2: EP=2 is all-size (one of each width per rank), EP=4 needs
    # the balanced planner (complementary widths 16+64, 32+48 share a rank).
    return MoHGEConfig(
        widths=[16, 32, 48, 64], experts_per_group=2, group_topk=2, topk=2,
        num_shared_experts=1, shared_expert_width=16,
        router=dict(type=router_type, z_loss_coeff=1e-3),
        losses=dict(group_coeff=1e-2, group_start_fraction=0.0, intra_group_coeff=1e-2),
        # Noise draws differ between layouts (per-rank RNG streams), so the noisy routers are
        # compared deterministically: without noise (load from hard counts, logged only).
        noisy_gating=dict(noise=False, importance_coeff=0.1, load_coeff=0.1),
        expert_backend=backend)


def build(mc, dispatcher: str):
    from megatron_mohge import get_mohge_decoder_block_spec

    tc = mc.apply_to(C.tiny_gpt_config(
        moe_token_dispatcher_type=dispatcher, moe_layer_freq=[1, 0, 1, 1],
        moe_aux_loss_coeff=0.0, moe_router_load_balancing_type="none"))
    model = C.build_gpt(tc, get_mohge_decoder_block_spec(tc, mc, use_te=False))
    return C.wrap_ddp(model, tc), tc


def spread_gates(model):
    """Spread the gates so that routing is far from ties (tiny fp differences between layouts
    must not flip a top-k choice) and every group/expert gets traffic."""
    gen = torch.Generator().manual_seed(7)
    for name, p in C.unwrap(model).named_parameters():
        if name.endswith("router.weight") or name.endswith("router.group_weight"):
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def global_batch():
    """All micro-batches of the global batch (reference view: DP=1)."""
    return C.synthetic_batches(0)


def logits_pass(model, batches):
    """Forward-only through Megatron's schedule, collecting last-stage logits [b, s, V/tp]."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    collected = []

    def loss_func(output_tensor):
        collected.append(output_tensor.detach().clone())
        return output_tensor.sum() * 0, {}

    def forward_step(it, m):
        b = next(it)
        return m(b["tokens"], b["position_ids"], None), loss_func

    tokens = batches[0]["tokens"]
    with torch.no_grad():
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(batches), model=model,
            num_microbatches=len(batches), seq_length=tokens.shape[1],
            micro_batch_size=tokens.shape[0], forward_only=True)
    return torch.cat(collected) if ps.is_pipeline_last_stage() else None


def aux_values():
    """Per-layer aux losses, reduced like Megatron-LM logs them (mean over micro-batches)."""
    from megatron.core import parallel_state as ps

    from megatron_mohge.compat.mcore import metric_entries, reduce_metrics

    entries = metric_entries()
    names = [n for n in AUX_NAMES if n in entries]
    # z_loss is a per-rank mean over its own tokens, averaged over TP x CP x DP by the tracker's
    # avg group + DP mean (equal token counts): comparable with the 1-rank reference.
    reduce_metrics(names, ps.get_pipeline_model_parallel_group(),
                   ps.get_data_parallel_group(with_context_parallel=False))
    return {n: entries[n].values.clone() for n in names}


def grads_into_params(model):
    """Replace every parameter by its finalized gradient (to checkpoint the gradients)."""
    with torch.no_grad():
        for p in C.unwrap(model).parameters():
            p.copy_(p.main_grad)


def run_reference(args):
    C.init_distributed()
    C.init_layout(1, 1, 1)
    mc = mohge_config(args.router, args.backend)
    model, tc = build(mc, "allgather")
    spread_gates(model)
    C.save_checkpoint(model, os.path.join(args.ref_dir, "init"))
    batches = global_batch()
    logits = logits_pass(model, batches)
    from megatron_mohge.compat.mcore import clear_metrics

    clear_metrics()
    model.zero_grad_buffer()
    loss = C.forward_backward(model, batches)
    aux = {k: v / len(batches) for k, v in aux_values().items()}
    grads_into_params(model)
    C.save_checkpoint(model, os.path.join(args.ref_dir, "grad"))
    torch.save(dict(logits=logits, loss=loss, aux=aux), os.path.join(args.ref_dir, "reference.pt"))
    C.write_result(args, dict(loss=loss, aux={k: v.tolist() for k, v in aux.items()}))
    C.destroy_layout()


def compare_layout(args, spec: str, ref: dict) -> dict:
    from megatron.core import parallel_state as ps
    from megatron_mohge.compat.mcore import clear_metrics

    sizes = dict(kv.split("=") for kv in spec.split(",") if "=" in kv)
    tp, ep, pp = int(sizes.get("tp", 1)), int(sizes.get("ep", 1)), int(sizes.get("pp", 1))
    etp = int(sizes["etp"]) if "etp" in sizes else None
    dispatcher = sizes.get("disp", "allgather")
    C.init_layout(tp, ep, pp, etp=etp)
    # backend=torch|local: expert backend of this layout (the reference's is --backend), so
    # the reference checkpoint is also loaded across backends.
    mc = mohge_config(args.router, sizes.get("backend", args.backend))
    model, tc = build(mc, dispatcher)
    C.load_checkpoint(model, os.path.join(args.ref_dir, "init"))
    batches = C.synthetic_batches(0)
    out = dict(layout=C.layout(), dispatcher=dispatcher)

    logits = logits_pass(model, batches)
    if logits is not None:
        b = logits.shape[0]
        rows = slice(ps.get_data_parallel_rank() * b, (ps.get_data_parallel_rank() + 1) * b)
        v = logits.shape[-1]
        cols = slice(ps.get_tensor_model_parallel_rank() * v,
                     (ps.get_tensor_model_parallel_rank() + 1) * v)
        ref_logits = ref["logits"][rows, :, cols]
        out["logits_max_abs_diff"] = float((logits - ref_logits).abs().max())
        out["logits_scale"] = float(ref_logits.abs().max())

    clear_metrics()
    model.zero_grad_buffer()
    loss = C.forward_backward(model, batches)
    out["loss"], out["loss_ref"] = loss, ref["loss"]
    aux = aux_values()
    scale = 1.0 / len(batches)  # Megatron-LM scales tracked values by 1/num_microbatches
    out["aux_max_rel_diff"] = {}
    for name, ref_v in ref["aux"].items():
        got = aux[name] * scale
        out["aux_max_rel_diff"][name] = float(((got - ref_v).abs() / ref_v.abs().clamp_min(1e-12))
                                              .max())

    grad_model, _ = build(mc, dispatcher)
    C.load_checkpoint(grad_model, os.path.join(args.ref_dir, "grad"))
    worst_abs, worst_rel, worst_name, n = 0.0, 0.0, "", 0
    ref_params = dict(C.unwrap(grad_model).named_parameters())
    for name, p in C.unwrap(model).named_parameters():
        g, r = p.main_grad, ref_params[name].detach()
        diff = float((g - r).abs().max())
        rel = diff / max(float(r.abs().max()), 1e-8)
        n += 1
        if rel > worst_rel:
            worst_abs, worst_rel, worst_name = diff, rel, name
    out.update(grad_max_abs_diff=worst_abs, grad_max_rel_diff=worst_rel, grad_worst=worst_name,
               num_params_compared=n)
    experts = [m.experts for m in C.unwrap(model).modules()
               if hasattr(m, "experts") and hasattr(m.experts, "runs")]
    out["local_experts"] = [e.runs for e in experts][:1]
    out["expert_backend"] = experts[0].backend if experts else None
    C.destroy_layout()
    return out


def run_compare(args):
    C.init_distributed()
    ref = torch.load(os.path.join(args.ref_dir, "reference.pt"), weights_only=False)
    results = {}
    for spec in args.layouts.split(";"):
        per_rank = C.all_gather_object(compare_layout(args, spec, ref))
        results[spec] = per_rank
    C.write_result(args, results)


def main():
    args = C.parse_args(extra=lambda p: (
        p.add_argument("--mode", choices=["reference", "compare"], required=True),
        p.add_argument("--ref-dir", required=True),
        p.add_argument("--layouts", default=""),
        p.add_argument("--router", default="mohge"),
        p.add_argument("--backend", default="local", help="expert backend of the reference")))
    if args.mode == "reference":
        run_reference(args)
    else:
        run_compare(args)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
