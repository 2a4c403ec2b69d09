"""Torch grouped-GEMM experts against the local (SequentialMLP) experts on the same weights.

Forward and backward of a whole MoHGE ``MoELayer`` (router, dispatcher, experts). The
weights are copied from the local layer into the torch layer through the checkpoint mapping
(``sharded_state_dict`` -> stacked parameters), so the comparison does not depend on both
backends drawing the same initial weights (that is tested separately).

Tolerances: fp32 1e-5 relative to the largest reference value (only the summation order of
the GEMMs may differ); bf16 2e-2 relative (one bf16 rounding of the fc1/fc2 outputs is
about 4e-3; GPU kernels may accumulate in a different order than CPU mm).
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megatron_mohge import MoHGEConfig
from megatron_mohge.config import ConfigError

pytestmark = pytest.mark.usefixtures("mcore_world1")

FP32_TOL = 1e-5
BF16_TOL = 2e-2

CFG = MoHGEConfig(widths=[8, 16, 24, 32], experts_per_group=[2, 3, 2, 3], group_topk=2, topk=3,
                  num_shared_experts=1, shared_expert_width=8)


def build(cfg, backend, hidden=16, dtype=torch.float32, seed=0, **tc_kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_mohge.specs import get_mohge_moe_module_spec

    kw = dict(num_layers=2, hidden_size=hidden, num_attention_heads=2,
              use_cpu_initialization=True, gated_linear_unit=True, activation_func=F.silu,
              add_bias_linear=False, moe_token_dispatcher_type="allgather", params_dtype=dtype,
              bf16=dtype == torch.bfloat16)
    kw.update(tc_kw)
    cfg = dataclasses.replace(cfg, expert_backend=backend)
    tc = cfg.apply_to(TransformerConfig(**kw))
    torch.manual_seed(seed)
    # specs are ModuleSpecs (0.16) or partials (0.19); both are called to build
    layer = get_mohge_moe_module_spec(cfg, use_te=False)(config=tc, layer_number=1)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # routing far from ties, every group used
        for p in (layer.router.weight, layer.router.group_weight):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return layer


def copy_through_checkpoint(src, dst):
    """Load ``src``'s weights into ``dst`` via the dist-checkpoint mapping (in memory)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.mapping import apply_factories
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    src_sd = src.sharded_state_dict(prefix="m.")
    apply_factories(src_sd)
    by_key = {}
    for sh in nested_values(src_sd):
        if isinstance(sh, ShardedTensor):
            by_key[(sh.key, sh.global_offset)] = sh.data
    dst_sd = dst.sharded_state_dict(prefix="m.")
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    factories = {k: v for k, v in dst_sd.items() if isinstance(v, ShardedTensorFactory)}
    apply_factories(dst_sd)
    from megatron.core.dist_checkpointing.mapping import apply_factory_merges

    def fill(x):
        if isinstance(x, ShardedTensor):
            return by_key[(x.key, x.global_offset)].detach().clone()
        if isinstance(x, ShardedObject):
            return None
        return x

    from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace

    loaded = dict_list_map_inplace(fill, dst_sd)
    merged = apply_factory_merges(loaded, factories)
    state = {k[len("m."):]: v for k, v in merged.items()}
    dst.load_state_dict(state, strict=True)


def run(layer, x):
    x = x.clone().requires_grad_(True)
    out, _ = layer(x)
    (out.float() ** 2).sum().backward()
    return out.detach(), x.grad


def expert_grads(layer):
    """fc1/fc2 weight gradients per expert, stacked per width run (backend independent)."""
    out = []
    for run_module in layer.experts.width_experts:
        if hasattr(run_module, "local_experts"):
            out += [torch.stack([getattr(m, n).weight.grad for m in run_module.local_experts])
                    for n in ("linear_fc1", "linear_fc2")]
        else:
            out += [run_module.linear_fc1.weight.grad, run_module.linear_fc2.weight.grad]
    return out


def rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
@pytest.mark.parametrize("dispatcher", ["allgather", "alltoall"])
def test_forward_backward_match_local(dtype, tol, dispatcher):
    local = build(CFG, "local", dtype=dtype, moe_token_dispatcher_type=dispatcher)
    torch_ = build(CFG, "torch", dtype=dtype, seed=5, moe_token_dispatcher_type=dispatcher)
    copy_through_checkpoint(local, torch_)
    x = torch.randn(10, 2, 16, generator=torch.Generator().manual_seed(2)).to(dtype)
    out_l, dx_l = run(local, x)
    out_t, dx_t = run(torch_, x)
    assert rel(out_t, out_l) <= tol
    assert rel(dx_t, dx_l) <= tol
    for g_t, g_l in zip(expert_grads(torch_), expert_grads(local)):
        assert rel(g_t, g_l) <= tol
    assert rel(torch_.router.weight.grad, local.router.weight.grad) <= tol


def test_same_seed_same_initial_weights():
    local, torch_ = build(CFG, "local"), build(CFG, "torch")
    for run_l, run_t in zip(local.experts.width_experts, torch_.experts.width_experts):
        for k, mlp in enumerate(run_l.local_experts):
            assert torch.equal(run_t.linear_fc1.weight[k], mlp.linear_fc1.weight)
            assert torch.equal(run_t.linear_fc2.weight[k], mlp.linear_fc2.weight)


def test_misaligned_sizes_are_padded_and_still_match_local():
    # bf16 needs leading strides of 8 elements: hidden 12 and width 12 are padded.
    cfg = MoHGEConfig(widths=[12, 20], experts_per_group=[2, 2], group_topk=1, topk=2)
    local = build(cfg, "local", hidden=12, dtype=torch.bfloat16)
    with pytest.warns(UserWarning, match="zero-padded"):
        torch_ = build(cfg, "torch", hidden=12, dtype=torch.bfloat16)
    copy_through_checkpoint(local, torch_)
    x = torch.randn(16, 1, 12, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    out_l, dx_l = run(local, x)
    out_t, dx_t = run(torch_, x)
    assert rel(out_t, out_l) <= BF16_TOL and rel(dx_t, dx_l) <= BF16_TOL
    # The padded columns never reach the parameters' shapes.
    assert torch_.experts.width_experts[0].linear_fc2.weight.shape == (2, 12, 12)


@pytest.mark.parametrize("gated", [True, False])
def test_bias_and_ungated_against_per_expert_math(gated):
    """Biases (which local experts cannot run at EP=TP=1 in megatron-core 0.16: an in-place
    add on a view) and plain activations, against the MLP formula expert by expert."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_mohge.experts.torch_backend import TorchGroupedMLP

    tc = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                           use_cpu_initialization=True, gated_linear_unit=gated,
                           activation_func=F.silu if gated else F.gelu, add_bias_linear=True,
                           num_moe_experts=3, moe_ffn_hidden_size=8, ffn_hidden_size=8)
    mlp = TorchGroupedMLP(3, tc)
    with torch.no_grad():
        for p in mlp.parameters():
            p.normal_()
    counts, x, probs = [3, 0, 4], torch.randn(7, 16), torch.rand(7)
    out, bias = mlp(x, counts, probs)
    assert bias is None
    start, ref = 0, []
    for k, t in enumerate(counts):
        xs, ps = x[start:start + t], probs[start:start + t, None]
        h = xs @ mlp.linear_fc1.weight[k].T + mlp.linear_fc1.bias[k]
        if gated:
            g, u = h.chunk(2, dim=-1)
            h = F.silu(g) * u
        else:
            h = F.gelu(h)
        ref.append((h * ps) @ mlp.linear_fc2.weight[k].T + mlp.linear_fc2.bias[k] * ps)
        start += t
    assert rel(out, torch.cat(ref)) <= FP32_TOL
    assert mlp.linear_fc1.bias.tensor_model_parallel and not hasattr(
        mlp.linear_fc2.bias, "tensor_model_parallel")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, FP32_TOL), (torch.bfloat16, BF16_TOL)])
def test_cuda_token_group_padding_matches_local(dtype, tol):
    """The CUDA path pads token groups to 16-byte row multiples; forced on here on CPU."""
    from megatron_mohge.experts.torch_backend import token_group_padding

    padded, dest = token_group_padding([3, 0, 9, 8], 8)
    assert padded == [8, 0, 16, 8]
    assert dest.tolist() == [0, 1, 2] + list(range(8, 17)) + list(range(24, 32))
    local = build(CFG, "local", dtype=dtype)
    torch_ = build(CFG, "torch", dtype=dtype)
    for run_module in torch_.experts.width_experts:
        run_module.token_group_align = 8
    x = torch.randn(10, 2, 16, generator=torch.Generator().manual_seed(4)).to(dtype)
    out_l, dx_l = run(local, x)
    out_t, dx_t = run(torch_, x)
    assert rel(out_t, out_l) <= tol and rel(dx_t, dx_l) <= tol
    for g_t, g_l in zip(expert_grads(torch_), expert_grads(local)):
        assert rel(g_t, g_l) <= tol


def test_empty_experts_and_empty_runs():
    from megatron_mohge.experts.torch_backend import TorchGroupedMLP

    layer = build(CFG, "torch")
    run_module = layer.experts.width_experts[1]
    assert isinstance(run_module, TorchGroupedMLP)
    x = torch.randn(5, 16, requires_grad=True)
    out, _ = run_module(x, [0, 5, 0], torch.ones(5))
    out.sum().backward()
    w1 = run_module.linear_fc1.weight.grad
    assert w1[0].abs().sum() == 0 and w1[2].abs().sum() == 0 and w1[1].abs().sum() > 0
    out0, _ = run_module(torch.randn(0, 16), [0, 0, 0], torch.ones(0))
    assert out0.shape == (0, 16)


def _entries(sd):
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
    from megatron.core.dist_checkpointing.mapping import apply_factories
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    apply_factories(sd)
    out = []
    for sh in nested_values(sd):
        if isinstance(sh, ShardedTensor):
            out.append((sh.key, tuple(sh.global_shape), tuple(sh.global_offset),
                        tuple(sh.local_shape), tuple(sh.replica_id), sh.data.clone()))
        elif isinstance(sh, ShardedObject):
            out.append((sh.key, tuple(sh.global_shape), tuple(sh.global_offset), None,
                        tuple(sh.replica_id), None))
    return sorted(out, key=lambda e: e[:5])


@pytest.mark.parametrize("singleton", [False, True])
def test_checkpoint_entries_identical_to_local(singleton):
    """Same keys, shapes, offsets, replica ids and tensor values (incl. extra-state objects)."""
    from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group

    meta = ensure_metadata_has_dp_cp_group({"singleton_local_shards": singleton})
    local, torch_ = build(CFG, "local"), build(CFG, "torch")
    e_l = _entries(local.experts.sharded_state_dict(prefix="mlp.experts.", metadata=dict(meta)))
    e_t = _entries(torch_.experts.sharded_state_dict(prefix="mlp.experts.", metadata=dict(meta)))
    assert [e[:5] for e in e_t] == [e[:5] for e in e_l]
    for a, b in zip(e_t, e_l):
        assert (a[5] is None and b[5] is None) or torch.equal(a[5], b[5]), a[0]
    keys = {e[0] for e in e_l}
    prefix = "mlp.experts.group_1.1." if singleton else "mlp.experts.group_1."
    assert f"{prefix}linear_fc2.weight" in keys and f"{prefix}linear_fc2._extra_state" in keys


def test_optimizer_style_key_prefix_is_kept():
    """Megatron's optimizer re-keys a model factory as ``<prefix>.<key>``: per-expert tensors
    must carry that prefix too."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    torch_ = build(CFG, "torch")
    sd = torch_.experts.sharded_state_dict(prefix="e.")
    fac = sd["e.width_experts.0.linear_fc1.weight"]
    assert isinstance(fac, ShardedTensorFactory)
    renamed = dataclasses.replace(fac, key=f"optimizer.state.exp_avg.{fac.key}")
    keys = {sh.key for parts in renamed.build() for sh in parts}
    assert keys == {"optimizer.state.exp_avg.e.group_0.linear_fc1.weight"}


def test_expert_params_have_megatron_attributes():
    torch_ = build(CFG, "torch")
    w1 = torch_.experts.width_experts[0].linear_fc1.weight
    assert w1.tensor_model_parallel and w1.partition_dim == 1
    assert w1.allreduce is True  # EP=1: reduced over DP like Megatron's expert linears


def test_torch_backend_is_a_stock_experts_module():
    """As MoESubmodules.experts of Megatron's stock MoELayer (uniform experts)."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_mohge.compat.mcore import builder_parts, rebuild_like
    from megatron_mohge.experts.torch_backend import TorchGroupedMLP

    tc = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2,
                           use_cpu_initialization=True, gated_linear_unit=True,
                           activation_func=F.silu, add_bias_linear=False, num_moe_experts=4,
                           moe_ffn_hidden_size=8, moe_router_topk=2,
                           moe_token_dispatcher_type="allgather")
    layers = []
    for experts_module in (None, TorchGroupedMLP):
        spec = get_moe_module_spec(use_te=False, num_experts=4, moe_grouped_gemm=False)
        if experts_module is not None:  # the same builder shape with other experts
            module, sub, params = builder_parts(spec)
            experts = rebuild_like(sub.experts, experts_module,
                                   builder_parts(sub.experts).submodules)
            spec = rebuild_like(spec, module, dataclasses.replace(sub, experts=experts), params)
        torch.manual_seed(0)
        layers.append(spec(config=tc, layer_number=1))
    x = torch.randn(8, 1, 16)
    out_l, _ = layers[0](x)
    out_t, _ = layers[1](x)
    assert rel(out_t, out_l) <= FP32_TOL
    keys = {k.split("experts.", 2)[-1] for k in layers[1].sharded_state_dict(prefix="m.")}
    assert "linear_fc1.weight" in keys


def test_backend_selection(monkeypatch):
    from megatron_mohge.experts import torch_backend
    from megatron_mohge.experts.selection import CPU_AUTO_BACKEND, resolve_expert_backend

    assert resolve_expert_backend("auto", use_te=True, te_grouped=True) == "te"
    # Both branches of "auto" without TE, on every machine (not only where CUDA is absent).
    monkeypatch.setattr(torch_backend, "grouped_mm_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_expert_backend("auto", use_te=False, te_grouped=False) == CPU_AUTO_BACKEND
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_expert_backend("auto", use_te=False, te_grouped=False) == "torch"
    monkeypatch.setattr(torch_backend, "grouped_mm_available", lambda: False)  # torch < 2.8
    assert resolve_expert_backend("auto", use_te=False, te_grouped=False) == "local"
    with pytest.raises(ConfigError, match="torch._grouped_mm"):
        resolve_expert_backend("torch", use_te=False, te_grouped=False)
    monkeypatch.undo()
    assert resolve_expert_backend("local", use_te=True, te_grouped=True) == "local"
    assert resolve_expert_backend("torch", use_te=False, te_grouped=False) == "torch"
    with pytest.raises(ConfigError, match="expert_backend=te"):
        resolve_expert_backend("te", use_te=False, te_grouped=False)
    with pytest.raises(ConfigError, match="expert_backend"):
        MoHGEConfig(widths=[8], experts_per_group=2, group_topk=1, topk=1, expert_backend="cuda")


def test_torch_backend_rejects_fp8():
    from types import SimpleNamespace

    cfg = dataclasses.replace(CFG, expert_backend="torch")
    tc = SimpleNamespace(fp8="hybrid", expert_model_parallel_size=1,
                         expert_tensor_parallel_size=1, tensor_model_parallel_size=1)
    with pytest.raises(ConfigError, match="FP8"):
        cfg.apply_to(tc)


def test_flattened_optimizer_shards_get_a_clear_error():
    """The distributed optimizer's fully_sharded_model_space format (flattened shards), which
    megatron-core's ShardedTensor rejects for every layer: one line naming the fix."""
    torch_ = build(CFG, "torch")
    fac = torch_.experts.sharded_state_dict(prefix="e.")["e.width_experts.0.linear_fc1.weight"]
    flat = dataclasses.replace(fac, key=f"optimizer.state.exp_avg.{fac.key}",
                               data=fac.data.detach().reshape(-1)[:5], flattened_range=slice(0, 5))
    with pytest.raises(ValueError, match="distrib_optim_sharding_type='fully_reshardable'"):
        flat.build()
