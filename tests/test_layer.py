"""The MoHGE MoELayer built from our spec: outputs, parameters, checkpoint keys, TE keys."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megatron_mohge import MoHGEConfig

pytestmark = pytest.mark.usefixtures("mcore_world1")

HIDDEN = 16


def build_layer(cfg: MoHGEConfig, backend: str = "local", **tc_kw):
    """The MoHGE layer with ``backend`` experts (these tests read the local MLPs)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_mohge.specs import get_mohge_moe_module_spec

    kw = dict(num_layers=2, hidden_size=HIDDEN, num_attention_heads=2, use_cpu_initialization=True,
              gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
              moe_token_dispatcher_type="allgather")
    kw.update(tc_kw)
    cfg = dataclasses.replace(cfg, expert_backend=backend)
    tc = cfg.apply_to(TransformerConfig(**kw))
    torch.manual_seed(0)
    layer = get_mohge_moe_module_spec(cfg, use_te=False)(config=tc, layer_number=1)
    with torch.no_grad():  # non-trivial routing
        layer.router.weight.normal_(0, 0.5)
        if hasattr(layer.router, "group_weight"):  # the flat noisy router has none
            layer.router.group_weight.normal_(0, 0.5)
    return layer


def naive_forward(layer, x):
    """sum_e w_e FFN_e(x) (+ shared) token by token, experts looked up by (group, index)."""
    probs, rmap = layer.router(x)
    canon = layer.router.slot_to_canonical.tolist()
    cfg = layer.router.mohge
    by_expert = {}
    for (g, idx), run in zip(layer.experts.runs, layer.experts.width_experts):
        for i, mlp in zip(idx, run.local_experts):
            by_expert[cfg.group_offsets[g] + i] = mlp
    xt = x.reshape(-1, x.shape[-1])
    out = torch.zeros_like(xt)
    for t in range(xt.shape[0]):
        for slot in torch.nonzero(rmap[t]).flatten().tolist():
            y, _ = by_expert[canon[slot]](xt[t:t + 1])
            out[t] += probs[t, slot] * y[0]
    out = out.view_as(x)
    if layer.shared_experts is not None:
        out = out + layer.shared_experts(x)
    return out


@pytest.mark.parametrize("weighting", ["renorm", "paper"])
@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
def test_layer_matches_naive_per_token_computation(weighting, dispatcher):
    cfg = MoHGEConfig(widths=[8, 16, 24, 32], experts_per_group=[2, 3, 2, 3], group_topk=2, topk=3,
                      num_shared_experts=1, shared_expert_width=8,
                      router=dict(expert_weighting=weighting))
    layer = build_layer(cfg, moe_token_dispatcher_type=dispatcher).eval()
    x = torch.randn(6, 2, HIDDEN)
    out, bias = layer(x)
    assert bias is None and out.shape == x.shape
    assert torch.allclose(out, naive_forward(layer, x), atol=1e-5)


def test_one_module_per_width_and_parameter_count():
    cfg = MoHGEConfig(widths=[8, 16, 24], experts_per_group=[2, 2, 2], group_topk=2, topk=2)
    layer = build_layer(cfg)
    exp = layer.experts
    assert [g for g, _ in exp.runs] == [0, 1, 2] and exp.run_sizes == [2, 2, 2]
    for (g, _), run in zip(exp.runs, exp.width_experts):
        fc1 = run.local_experts[0].linear_fc1.weight
        fc2 = run.local_experts[0].linear_fc2.weight
        assert fc1.shape == (2 * cfg.widths[g], HIDDEN)  # SwiGLU: gate + up
        assert fc2.shape == (HIDDEN, cfg.widths[g])
    n_routed = sum(p.numel() for p in exp.parameters())
    assert n_routed == sum(cfg.routed_params_per_expert(HIDDEN, gated=True))


def test_gradients_reach_every_used_expert_and_both_gates():
    cfg = MoHGEConfig(widths=[8, 16], experts_per_group=[2, 2], group_topk=1, topk=2,
                      losses=dict(group_start_fraction=0.0))
    layer = build_layer(cfg).train()
    x = torch.randn(16, 2, HIDDEN, requires_grad=True)
    out, _ = layer(x)
    out.square().mean().backward()
    assert layer.router.weight.grad.abs().sum() > 0
    assert layer.router.group_weight.grad.abs().sum() > 0
    used = layer.router.tokens_per_expert_E > 0
    mlps = [m for run in layer.experts.width_experts for m in run.local_experts]
    for cid, mlp in enumerate(mlps):  # EP=1: local order == canonical order
        assert (mlp.linear_fc1.weight.grad.abs().sum() > 0) == bool(used[cid])
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("rtype", ["mohge", "noisy_topk"])
def test_topk_1_layer_builds_and_matches_naive_forward(rtype):
    # topk: 1 used to validate but fail in TransformerConfig (Megatron requires pre-softmax for
    # top-1 softmax routing: softmax over one logit has zero gradient).
    cfg = MoHGEConfig(widths=[8, 16, 24], experts_per_group=[2, 3, 2], group_topk=2, topk=1,
                      router=dict(type=rtype), losses=dict(group_coeff=0.0, intra_group_coeff=0.0))
    layer = build_layer(cfg)
    x = torch.randn(6, 2, HIDDEN)
    probs, rmap = layer.router(x)
    assert (rmap.sum(-1) == 1).all()
    layer.eval()
    out, _ = layer(x)
    assert torch.allclose(out, naive_forward(layer, x), atol=1e-5)
    if rtype == "mohge":  # the K=1 weight is q_chosen < 1, so both gates learn from the output
        layer.train()
        out, _ = layer(x)
        out.square().mean().backward()
        assert layer.router.weight.grad.abs().sum() > 0
        assert layer.router.group_weight.grad.abs().sum() > 0


def _plain_sharded(sd):
    """Expand factories (SwiGLU) into plain ShardedTensors: {key: (global_shape, offset)}."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factories

    apply_factories(sd)
    out = {}
    for v in sd.values():
        items = v.values() if isinstance(v, dict) else v if isinstance(v, list) else [v]
        for sh in items:
            if isinstance(sh, ShardedTensor):
                out.setdefault(sh.key, []).append((tuple(sh.global_shape), tuple(sh.global_offset),
                                                   tuple(sh.local_shape)))
            elif isinstance(sh, ShardedObject):
                out.setdefault(sh.key, []).append(("obj", tuple(sh.global_offset)))
    return {k: sorted(v) for k, v in out.items()}


def test_checkpoint_keys_are_by_group_and_index():
    cfg = MoHGEConfig(widths=[8, 16], experts_per_group=[2, 3], group_topk=1, topk=2)
    layer = build_layer(cfg)
    sd = _plain_sharded(layer.sharded_state_dict(prefix="mlp."))
    # fc1 (SwiGLU) is saved as two halves, each [N_g, W_g, hidden]; fc2 as [N_g, hidden, W_g].
    assert sd["mlp.experts.group_0.linear_fc2.weight"] == [((2, HIDDEN, 8), (i, 0, 0), (HIDDEN, 8))
                                                         for i in range(2)]
    assert sd["mlp.experts.group_1.linear_fc2.weight"] == [((3, HIDDEN, 16), (i, 0, 0), (HIDDEN, 16))
                                                         for i in range(3)]
    # SwiGLU fc1 of expert i: gate rows [0, W) and up rows [W, 2W) of entry i.
    assert sd["mlp.experts.group_1.linear_fc1.weight"] == sorted(
        [((3, 32, HIDDEN), (i, 0, 0), (16, HIDDEN)) for i in range(3)]
        + [((3, 32, HIDDEN), (i, 16, 0), (16, HIDDEN)) for i in range(3)])
    assert "mlp.router.weight" in sd and "mlp.router.group_weight" in sd


class _StandInGroupedLinear(torch.nn.Module):
    """Stand-in for TE's GroupedLinear: the attributes our TE key mapping reads.

    TE cannot run on CPU; this fake holds the same tensors as the local experts so the test
    can check that both backends write identical checkpoint keys and shards.
    """

    def __init__(self, weights, tp_group):
        super().__init__()
        for k, w in enumerate(weights):
            self.register_parameter(f"weight{k}", torch.nn.Parameter(w.detach().clone()))
        self.use_bias = False
        self._tp_group = tp_group

    def get_extra_state(self):
        return None

    def set_extra_state(self, state):
        pass

    def _split_extra_state(self, state):
        return [state] * len(list(self.parameters()))


def test_te_backend_writes_the_same_checkpoint_keys_as_the_local_backend():
    from types import SimpleNamespace

    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    from megatron_mohge.experts.te_backend import te_run_sharded_state_dict

    cfg = MoHGEConfig(widths=[8, 16], experts_per_group=[2, 3], group_topk=1, topk=2)
    layer = build_layer(cfg)
    local = _plain_sharded(layer.experts.sharded_state_dict(prefix="e."))
    te_sd = {}
    metadata = ensure_metadata_has_dp_cp_group(None)
    for r, ((g, idx), run) in enumerate(zip(layer.experts.runs, layer.experts.width_experts)):
        tp = run.local_experts[0].linear_fc1.tp_group
        fake = SimpleNamespace(
            config=run.config,
            linear_fc1=_StandInGroupedLinear([m.linear_fc1.weight for m in run.local_experts], tp),
            linear_fc2=_StandInGroupedLinear([m.linear_fc2.weight for m in run.local_experts], tp))
        te_sd.update(te_run_sharded_state_dict(fake, f"e.width_experts.{r}.", f"e.group_{g}.", idx,
                                               cfg.experts_per_group[g], (), metadata))
    te = _plain_sharded(te_sd)
    weight_keys = {k for k in local if "weight" in k}
    assert weight_keys == {k for k in te if "weight" in k}
    for k in weight_keys:
        assert local[k] == te[k], k
