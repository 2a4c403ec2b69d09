"""HybridModel (megatron-core 0.19; MambaModel on 0.16.1) with MoHGE ``E`` layers on CPU: the
spec helpers, training (loss falls), the stock baseline, refusals of CUDA-only layers."""

import pytest
import torch

from megatron_mohge.config import ConfigError
from megatron_mohge.config.run import RunConfig
from tests.workers import common as C

STEPS = 12
MOHGE = dict(widths=[16, 32, 48, 64], experts_per_group=2, group_topk=2, topk=2,
             losses=dict(group_start_fraction=0.0))


def hybrid_run(moe=None, pattern="*E*E", **model):
    m = dict(kind="hybrid", hybrid_layer_pattern=pattern, num_layers=len(pattern),
             hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
             seq_length=C.SEQ_LENGTH, vocab_size=C.VOCAB_SIZE)
    m.update(model)
    return RunConfig.from_dict({"model": m, "moe": moe or {"kind": "mohge", "mohge": MOHGE}})


def build(run):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from megatron_mohge.training.model_builder import build_language_model

    torch.manual_seed(C.SEED)
    model_parallel_cuda_manual_seed(C.SEED, force_reset_rng=True)
    return build_language_model(run, C.VOCAB_SIZE)


def falls(losses, factor=0.9):
    return sum(losses[-3:]) / 3 < factor * sum(losses[:3]) / 3


def train(run, model):
    from megatron_mohge.training.model_builder import transformer_config

    tc = transformer_config(run)
    ddp = C.wrap_ddp(model, tc)
    return C.train(ddp, C.build_optimizer(ddp, lr=1e-2), tc, STEPS)


def test_mohge_hybrid_model_trains_with_mohge_e_layers(mcore_world1):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_mohge.compat.mcore import metric_entries
    from megatron_mohge.compat.versions import hybrid_model_api
    from megatron_mohge.experts.hetero import HeterogeneousExperts
    from megatron_mohge.routing.mohge_router import MoHGERouter

    run = hybrid_run(pattern="*E-E")
    model = build(run)
    assert type(model) is hybrid_model_api().model_cls  # Megatron's class, not a subclass
    layers = list(model.decoder.layers)
    moe = [layer.mlp for layer in layers if isinstance(getattr(layer, "mlp", None), MoELayer)]
    assert [isinstance(getattr(layer, "mlp", None), MoELayer) for layer in layers] == [
        False, True, False, True]
    assert all(isinstance(m.router, MoHGERouter) and isinstance(m.experts, HeterogeneousExperts)
               for m in moe)
    assert not hasattr(layers[1], "self_attention") or type(
        layers[1].self_attention).__name__ == "IdentityOp"
    losses = train(run, model)
    assert falls(losses), losses
    assert {"mohge_group_loss", "mohge_group_balance_loss"} <= set(metric_entries())


def test_stock_hybrid_baseline_trains_and_counts_its_routing(mcore_world1):
    from megatron_mohge.metrics import routers

    run = hybrid_run({"kind": "stock", "num_experts": 8, "expert_hidden_size": 40, "topk": 2})
    model = build(run)
    assert len(routers(model)) == 2  # the two E layers' (counting) TopKRouters
    losses = train(run, model)
    assert falls(losses), losses


def test_analytic_param_counts_match_a_real_hybrid_model(mcore_world1):
    from megatron_mohge import accounting as A
    from megatron_mohge.training.model_builder import measured_param_counts

    for run in (hybrid_run(pattern="*E-E*", num_attention_heads=4),
                hybrid_run({"kind": "dense"}, pattern="*-*-", normalization="LayerNorm",
                           untie_embeddings_and_output_weights=True),
                hybrid_run({"kind": "stock", "num_experts": 4, "expert_hidden_size": 24,
                            "topk": 2, "num_shared_experts": 1, "shared_expert_width": 16},
                           pattern="E*E")):
        model = build(run)
        counts = A.analytic_param_counts(run, C.VOCAB_SIZE)
        real = sum(p.numel() for p in model.parameters())
        assert counts.total == real, (run.model.hybrid_layer_pattern, counts.to_dict(), real)
        assert counts.num_moe_layers == run.model.hybrid_layer_pattern.count("E")
        assert measured_param_counts(model)["routed_expert_params"] == counts.routed_experts


def test_local_spec_has_only_local_layers_and_te_spec_keeps_megatrons(mcore_world1):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_mohge.compat.mcore import builder_parts, builds_subclass_of
    from megatron_mohge.config import MoHGEConfig
    from megatron_mohge.experts.hetero import HeterogeneousExperts
    from megatron_mohge.hybrid_specs import get_mohge_hybrid_stack_spec

    spec = get_mohge_hybrid_stack_spec(MoHGEConfig(**MOHGE), use_te=False)
    moe = spec.submodules.moe_layer.submodules.mlp
    assert builds_subclass_of(moe, MoELayer)
    assert builder_parts(builder_parts(moe).submodules.experts).module is HeterogeneousExperts
    for name in ("attention_layer", "mlp_layer", "moe_layer"):
        assert "TE" not in repr(getattr(spec.submodules, name)), name
    with pytest.raises(ImportError, match="use_te=True"):  # no TE here: one clear line
        get_mohge_hybrid_stack_spec(MoHGEConfig(**MOHGE), use_te=True)


@pytest.mark.parametrize("pattern,match", [("*M*E", "M layers need CUDA"),
                                           ("*G*E", "G layers")])
def test_cuda_only_layers_are_refused_on_cpu_in_one_line(mcore_world1, pattern, match):
    from megatron_mohge.training.model_builder import hybrid_stack_spec

    with pytest.raises(ValueError, match=match) as err:
        hybrid_stack_spec(hybrid_run(pattern=pattern))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("model,moe,match", [
    (dict(hybrid_layer_pattern=None), None, "model.hybrid_layer_pattern: required"),
    (dict(hybrid_layer_pattern="*E|*E", num_layers=5), None, "'|' not supported"),
    (dict(hybrid_layer_pattern="*E*E", num_layers=6), None, "set model.num_layers: 4"),
    (dict(hybrid_layer_pattern="*-*-"), None, "no E"),
    (dict(hybrid_layer_pattern="*E*E"), {"kind": "dense"}, "moe.kind is dense"),
    (dict(moe_layer_freq=2), None, "model.moe_layer_freq: not used"),
    (dict(kind="gpt"), None, "only used with model.kind: hybrid"),
    (dict(kind="mamba"), None, "model.kind"),
])
def test_bad_hybrid_settings_name_the_field(model, moe, match):
    with pytest.raises(ConfigError, match=match) as err:
        hybrid_run(moe, **model)
    assert "\n" not in str(err.value)


def _flags(run):
    from megatron_mohge.integration.flags import megatron_lm_flags

    out, key = {}, None
    for tok in megatron_lm_flags(run, megatron_lm_version=None, data=False):
        if tok.startswith("--"):
            key, out[tok] = tok, []
        else:
            out[key].append(tok)
    return out


def test_megatron_lm_flags_render_the_pattern_where_megatron_lm_defines_it(tmp_path):
    """core_v0.19 defines --hybrid-layer-pattern, core_v0.16 only --hybrid-override-pattern
    (read from the checkout's source); no --moe-layer-freq (the E layers are the MoE layers)."""
    for flag, source in (
            ("--hybrid-override-pattern",
             "group.add_argument('--hybrid-override-pattern', type=str, default=None)\n"),
            ("--hybrid-layer-pattern",
             "group.add_argument('--hybrid-override-pattern', type=str)\n"
             "group.add_argument('--hybrid-layer-pattern', type=str, default=None)\n")):
        mlm = tmp_path / flag.strip("-")
        (mlm / "megatron" / "training").mkdir(parents=True)
        (mlm / "megatron" / "training" / "arguments.py").write_text(source)
        run = RunConfig.from_dict({
            **hybrid_run(pattern="*E-E", vocab_size=None).to_dict(), "output_dir": str(tmp_path),
            "launch": {"megatron_lm_dir": str(mlm)}})
        f = _flags(run)
        assert f[flag] == ["*E-E"] and f["--num-layers"] == ["4"], flag
        assert "--moe-layer-freq" not in f
        other = ({"--hybrid-layer-pattern", "--hybrid-override-pattern"} - {flag}).pop()
        assert other not in f
    gpt = RunConfig.from_dict({"model": {"num_layers": 2}, "output_dir": str(tmp_path),
                               "launch": {"megatron_lm_dir": str(mlm)},
                               "moe": {"kind": "mohge", "mohge": MOHGE}})
    assert "--hybrid-layer-pattern" not in _flags(gpt) and "--moe-layer-freq" in _flags(gpt)


@pytest.mark.slow  # imports megatron.training (~30 s on 2 busy cores)
def test_installed_megatron_training_parses_the_hybrid_flags(tmp_path):
    """The 0.19 wheel's own parser and validation: num_layers and the pattern read back."""
    pytest.importorskip("megatron.training.arguments",
                        reason="megatron.training is not in this megatron-core wheel (0.16.1)")
    import argparse

    import megatron.training.arguments as A

    from megatron_mohge.integration.flags import megatron_lm_flags, write_mohge_config
    from megatron_mohge.integration.megatron_lm import add_mohge_args

    run = RunConfig.from_dict({**hybrid_run(pattern="*E*E", vocab_size=None).to_dict(),
                               "output_dir": str(tmp_path), "data": {"path": ["x"]}})
    write_mohge_config(run)
    parser = add_mohge_args(A.add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False)))
    args = parser.parse_args(megatron_lm_flags(run, installed=True))
    args.world_size, args.rank = 1, 0
    A.validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
    assert (args.hybrid_layer_pattern, args.num_layers) == ("*E*E", 4)


def test_flops_correction_counts_the_hybrid_e_layers():
    """Megatron's hybrid FLOPs formula has the GPT's routed term per E layer (fwd 4 T h W k x
    3/2 with SwiGLU, x3 passes): the correction is per E layer of the main pattern."""
    import argparse

    from megatron_mohge.config import MoHGEConfig
    from megatron_mohge.integration.megatron_lm import mohge_flops_correction

    cfg = MoHGEConfig.paper_3b()
    args = argparse.Namespace(mohge_config="x", num_layers=5, moe_layer_freq=1,
                              hybrid_layer_pattern="*E-*E", mtp_num_layers=None,
                              hidden_size=1024, seq_length=4096, swiglu=True,
                              moe_ffn_hidden_size=1280, ffn_hidden_size=4096, moe_router_topk=6,
                              mohge_flops_expectation="uniform", mohge_flops_routed_width=None)
    per_layer = 3 * 2 * 8 * 4096 * 1024 * 3 * (6 * 832 - 6 * 1280)
    assert mohge_flops_correction(args, 8, cfg) == 2 * per_layer
    args.hybrid_layer_pattern = None  # core_v0.16's pretrain_mamba MambaModel: not ours
    args.is_hybrid_model = True
    assert mohge_flops_correction(args, 8, cfg) == 0.0
