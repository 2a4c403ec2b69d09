"""The Megatron-LM launcher's pieces: argument hook, model builder, aux-loss names, FLOPs.

The core parts run with megatron.core alone (the ``mcore_world1`` fixture); the parts that
need Megatron-LM (``megatron.training``, ``pretrain_gpt``) are skipped unless a core_v0.16.1
checkout is on ``PYTHONPATH``.
"""

import argparse
import copy
import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_mohge.config import ConfigError, MoHGEConfig
from megatron_mohge.integration import megatron_lm as ML
from megatron_mohge.integration.accounting import activated_widths

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs"
TINY = CONFIGS / "tiny_mohge.yaml"


def parser():
    return ML.add_mohge_args(argparse.ArgumentParser(allow_abbrev=False))


# ---------------------------------------------------------------------- arguments
def test_mohge_config_fills_megatron_moe_args():
    args = parser().parse_args(["--mohge-config", str(TINY), "--mohge-group-coeff", "0.5",
                                "--mohge-expert-weighting", "paper"])
    cfg = MoHGEConfig.from_yaml(TINY)
    assert args.num_experts == cfg.num_experts == 16 and args.moe_router_topk == 2
    assert args.moe_ffn_hidden_size == 80 and args.moe_router_load_balancing_type == "none"
    assert args.moe_aux_loss_coeff == 0.0 and args.moe_router_dtype == "fp32"
    got = ML.mohge_config_from_args(args)
    assert got.losses.group_coeff == 0.5 and got.router.expert_weighting == "paper"
    assert got.widths == cfg.widths and got.losses.intra_group_coeff == cfg.losses.intra_group_coeff
    assert ML.mohge_config_from_args(argparse.Namespace(mohge_config=None)) is None


def test_expert_backend_flag_overrides_the_yaml():
    args = parser().parse_args(["--mohge-config", str(TINY), "--mohge-expert-backend", "torch"])
    assert ML.mohge_config_from_args(args).expert_backend == "torch"
    args = parser().parse_args(["--mohge-config", str(TINY)])
    assert ML.mohge_config_from_args(args).expert_backend == "auto"
    with pytest.raises(SystemExit):
        parser().parse_args(["--mohge-config", str(TINY), "--mohge-expert-backend", "cuda"])


def test_run_yaml_and_bad_paths():
    args = parser().parse_args(["--mohge-config", str(CONFIGS / "small_mohge_1node.yaml")])
    assert args.num_experts == 32 and args.moe_router_topk == 4
    assert args.moe_shared_expert_intermediate_size == 1024
    with pytest.raises(SystemExit):
        parser().parse_args(["--mohge-config", "/nonexistent/layer.yaml"])
    with pytest.raises(SystemExit):
        parser().parse_args(["--mohge-config", str(TINY), "--mohge-expert-weighting", "x"])


def test_compose_extra_args_providers():
    def other(p):
        p.add_argument("--other", type=int, default=3)
        return p

    p = ML.compose_extra_args_providers(None, other, ML.add_mohge_args)(argparse.ArgumentParser())
    a = p.parse_args(["--other", "4", "--mohge-config", str(TINY)])
    assert a.other == 4 and a.num_experts == 16


def test_finalize_checks_and_mirrors():
    p = parser()
    p.add_argument("--num-experts", type=int, default=None)
    p.add_argument("--moe-router-topk", type=int, default=2)
    p.add_argument("--moe-router-load-balancing-type", nargs="+", default="aux_loss")
    p.add_argument("--expert-model-parallel-size", type=int, default=1)
    # an explicit, agreeing --num-experts is fine; Megatron's aux loss given later is overridden
    args = p.parse_args(["--num-experts", "16", "--mohge-config", str(TINY),
                         "--moe-router-load-balancing-type", "aux_loss",
                         "--expert-model-parallel-size", "2"])
    with pytest.warns(UserWarning, match="moe_router_load_balancing_type"):
        ML.finalize_mohge_args(args)
    assert args.moe_router_load_balancing_type == "none"
    bad = p.parse_args(["--mohge-config", str(TINY), "--num-experts", "32"])
    with pytest.raises(ConfigError, match="--num-experts=32"):
        ML.finalize_mohge_args(bad)
    bad_ep = p.parse_args(["--mohge-config", str(TINY), "--expert-model-parallel-size", "3"])
    with pytest.raises(ConfigError, match="expert_model_parallel_size=3"):
        ML.finalize_mohge_args(bad_ep)


# ---------------------------------------------------------------------- losses / FLOPs
def test_track_names():
    args = parser().parse_args(["--mohge-config", str(TINY)])
    names = ML.mohge_track_names(args, ["load_balancing_loss", "z_loss"])
    assert names == ["z_loss", "mohge_group_loss", "mohge_intra_group_loss"]
    args.mohge_intra_group_coeff = 0.0
    assert ML.mohge_track_names(args, []) == ["mohge_group_loss"]
    assert ML.mohge_track_names(argparse.Namespace(), ["load_balancing_loss"]) == \
        ["load_balancing_loss"]
    noisy = MoHGEConfig.from_yaml(TINY)
    noisy.router.type = "noisy_topk"
    assert ML.mohge_aux_loss_names(noisy) == ["noisy_importance_loss", "noisy_load_loss"]
    from megatron_mohge.routing import mohge_router, noisy_topk

    assert {mohge_router.GROUP_LOSS_NAME, mohge_router.INTRA_GROUP_LOSS_NAME,
            noisy_topk.IMPORTANCE_LOSS_NAME, noisy_topk.LOAD_LOSS_NAME} == \
        {"mohge_group_loss", "mohge_intra_group_loss", "noisy_importance_loss", "noisy_load_loss"}


def flops_args(**kw):
    cfg = MoHGEConfig.paper_3b()
    a = argparse.Namespace(mohge_config="x", num_layers=4, moe_layer_freq=[0, 1, 1, 1],
                           mtp_num_layers=None, hidden_size=1024, seq_length=4096, swiglu=True,
                           moe_ffn_hidden_size=1280, ffn_hidden_size=4096, moe_router_topk=6,
                           mohge_flops_expectation="uniform", mohge_flops_routed_width=None)
    vars(a).update(kw)
    return a, cfg


def test_flops_correction():
    args, cfg = flops_args()
    per_width = 3 * 2 * 8 * 4096 * 1024 * 3 * 3  # 3 passes x 2 x B x s x h x 3 halves x 3 layers
    assert ML.mohge_flops_correction(args, 8, cfg) == per_width * (6 * 832 - 6 * 1280)
    args.mohge_flops_expectation = "min"
    assert ML.mohge_flops_correction(args, 8, cfg) == per_width * (6 * 384 - 6 * 1280)
    args.mohge_flops_expectation = "max"
    assert ML.mohge_flops_correction(args, 8, cfg) == 0.0  # K widest = stock assumption
    args.mohge_flops_routed_width = 700.0  # measured mean chosen width
    assert ML.mohge_flops_correction(args, 8, cfg) == per_width * (6 * 700 - 6 * 1280)
    args.mtp_num_layers = 1  # last layer MoE: the MTP layer counts as MoE
    assert ML.mohge_flops_correction(args, 8, cfg) == per_width * 4 / 3 * (6 * 700 - 6 * 1280)
    args.mohge_config = None
    assert ML.mohge_flops_correction(args, 8) == 0.0
    assert activated_widths(cfg).uniform == 6 * 832


# ---------------------------------------------------------------------- model builder
def model_args(cfg_path, layer_freq, **kw):
    """The GPTModel arguments Megatron-LM's gpt_builder reads, as parsed args would hold them."""
    args = parser().parse_args(["--mohge-config", str(cfg_path)])
    vars(args).update(dict(padded_vocab_size=128, max_position_embeddings=32,
                           untie_embeddings_and_output_weights=True,
                           position_embedding_type="rope", rotary_percent=1.0, rotary_base=10000,
                           use_rope_scaling=False, fp16_lm_cross_entropy=False,
                           mtp_num_layers=None, transformer_impl="local", num_layers=4,
                           moe_layer_freq=layer_freq, expert_model_parallel_size=1,
                           tensor_model_parallel_size=1, train_iters=100, curr_iteration=60))
    vars(args).update(kw)
    return args


def seed(s=0):
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    torch.manual_seed(s)
    model_parallel_cuda_manual_seed(s, force_reset_rng=True)


def transformer_config(args):
    """What core_transformer_config_from_args gives for these args (the parts that matter)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig(num_layers=args.num_layers, hidden_size=32, num_attention_heads=4,
                             ffn_hidden_size=64, moe_layer_freq=args.moe_layer_freq,
                             num_moe_experts=args.num_experts,
                             moe_router_topk=args.moe_router_topk, normalization="RMSNorm",
                             gated_linear_unit=True, activation_func=F.silu,
                             add_bias_linear=False, use_cpu_initialization=True,
                             moe_token_dispatcher_type="allgather",
                             moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0)


def test_builder_builds_mohge_gpt(mcore_world1):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_mohge.routing.mohge_router import MoHGERouter

    args = model_args(TINY, [0, 1, 0, 1])
    cfg = ML.finalize_mohge_args(args)
    seed()
    model = ML.build_mohge_gpt_model(args, transformer_config(args), cfg)
    kinds = [isinstance(layer.mlp, MoELayer) for layer in model.decoder.layers]
    assert kinds == [False, True, False, True]  # --moe-layer-freq honoured
    routers = [layer.mlp.router for layer in model.decoder.layers if kinds[layer.layer_number - 1]]
    assert all(isinstance(r, MoHGERouter) for r in routers)
    assert model.output_layer.weight.shape == (128, 32)  # untied, padded vocab
    tokens = torch.randint(0, 128, (2, 16))
    pos = torch.arange(16).unsqueeze(0).expand(2, -1)
    loss = model(tokens, pos, None, labels=tokens)
    assert loss.shape == (2, 16) and torch.isfinite(loss).all()
    # the forward-step hook reports training progress to every router
    ML.update_training_progress(model, args)
    assert [r.training_progress for r in routers] == [0.6, 0.6]
    args.curr_iteration = 90
    ML.update_training_progress(model, args)
    assert routers[0].training_progress == 0.9


def test_builder_mtp_layer_is_mohge(mcore_world1):
    import dataclasses

    from megatron_mohge.routing.mohge_router import MoHGERouter

    args = model_args(TINY, [0, 1, 0, 1], mtp_num_layers=1)
    cfg = ML.finalize_mohge_args(args)
    seed()
    tc = dataclasses.replace(transformer_config(args), mtp_num_layers=1)
    model = ML.build_mohge_gpt_model(args, tc, cfg)  # (MTP training forward needs CUDA)
    assert isinstance(model.mtp.layers[0].transformer_layer.mlp.router, MoHGERouter)


def test_builder_passes_vp_stage_and_refuses_spec(mcore_world1, monkeypatch):
    """mohge_gpt_builder hands vp_stage to the MoHGE decoder block spec and refuses --spec."""
    import megatron_mohge.specs as S

    seen = {}
    real = S.get_mohge_decoder_block_spec

    def spy(tc, cfg, use_te=None, vp_stage=None, pp_rank=None):
        seen.update(vp_stage=vp_stage, use_te=use_te)
        return real(tc, cfg, use_te=use_te, vp_stage=vp_stage, pp_rank=pp_rank)

    monkeypatch.setattr(S, "get_mohge_decoder_block_spec", spy)
    args = model_args(TINY, 1, transformer_impl="transformer_engine")
    seed()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TE requested but not usable on CPU: local layers
        ML.mohge_gpt_builder(args, True, True, vp_stage=None, config=transformer_config(args))
    assert seen == {"vp_stage": None, "use_te": False}
    args.spec = ["some.module", "spec"]
    with pytest.raises(ConfigError, match="--spec"):
        ML.mohge_gpt_builder(args, True, True, config=transformer_config(args))
    with pytest.raises(ConfigError, match="--mohge-config is required"):
        ML.mohge_gpt_builder(argparse.Namespace(mohge_config=None), True, True)


# ---------------------------------------------------------------------- Megatron-LM
def _need_megatron_lm():
    if importlib.util.find_spec("megatron.training") is None or \
            importlib.util.find_spec("pretrain_gpt") is None:
        pytest.skip("Megatron-LM checkout (megatron.training, pretrain_gpt) not on PYTHONPATH")
    return pytest.importorskip("megatron.training.training")


def megatron_lm_args(monkeypatch, tmp_path, extra=()):
    """Parse and validate a tiny MoHGE run exactly as pretrain() does (no CUDA)."""
    import sys

    import megatron.training.arguments as A
    from megatron.training.tokenizer.tokenizer import _vocab_size_with_padding

    from megatron_mohge.integration.flags import megatron_lm_flags, write_mohge_config
    from megatron_mohge.run_config import RunConfig

    run = RunConfig.from_yaml(CONFIGS / "small_mohge_1node.yaml", [
        f"output_dir={tmp_path}", "model.num_layers=4", "model.hidden_size=32",
        "model.num_attention_heads=4", "model.ffn_hidden_size=64", "model.seq_length=16",
        "model.moe_layer_freq=[0,1,1,1]", "model.precision=fp32", "moe.use_te=false",
        "moe.mohge.widths=[16,24,32,40,48,56,64,72]", "moe.mohge.experts_per_group=2",
        "moe.mohge.topk=2", "moe.mohge.shared_expert_width=32", "moe.token_dispatcher=allgather",
        "parallel.expert_parallel=1", "parallel.use_distributed_optimizer=false",
        "launch.extra_args=[--no-persist-layer-norm, --no-gradient-accumulation-fusion, "
        "--no-masked-softmax-fusion, --no-bias-swiglu-fusion, --no-bias-dropout-fusion]"])
    write_mohge_config(run)
    monkeypatch.setattr(sys, "argv", ["pretrain_mohge.py", *megatron_lm_flags(run), *extra])
    monkeypatch.setenv("WORLD_SIZE", "1")
    args = A.parse_args(ML.compose_extra_args_providers(None, ML.add_mohge_args))
    A.validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
    args.padded_vocab_size = _vocab_size_with_padding(257, args)
    return run, args


def test_megatron_lm_parse_build_and_forward(mcore_world1, monkeypatch, tmp_path):
    _need_megatron_lm()
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_mohge.integration.accounting import param_counts

    run, args = megatron_lm_args(monkeypatch, tmp_path, ["--mohge-intra-group-coeff", "0.01"])
    assert args.num_experts == 16 and args.moe_router_load_balancing_type == "none"
    assert ML.mohge_config_from_args(args).losses.intra_group_coeff == 0.01
    seed()
    model = ML.mohge_gpt_builder(args, True, True)  # config from core_transformer_config_from_args
    assert [isinstance(layer.mlp, MoELayer) for layer in model.decoder.layers] == \
        [False, True, True, True]
    assert sum(p.numel() for p in model.parameters()) == \
        param_counts(run, args.padded_vocab_size).total
    tokens = torch.randint(0, 257, (2, 16))
    loss = model(tokens, torch.arange(16).unsqueeze(0).expand(2, -1), None, labels=tokens)
    assert torch.isfinite(loss).all()


def test_megatron_lm_hooks_and_flops(monkeypatch, tmp_path):
    T = _need_megatron_lm()
    from megatron_mohge.compat.versions import (
        UnsupportedMegatronVersion,
        check_megatron_lm,
        megatron_lm_pretrain_style,
    )

    run, args = megatron_lm_args(monkeypatch, tmp_path)
    import megatron.training as MT

    seen = {}  # Megatron's track_moe_metrics reduces on CUDA; record what it would get instead
    monkeypatch.setattr(T, "track_moe_metrics", lambda *a, **kw: seen.update(kw))
    monkeypatch.setattr(T, "num_floating_point_operations", T.num_floating_point_operations)
    monkeypatch.setattr(MT, "get_args", lambda: args)
    stock = T.num_floating_point_operations(args, 8)
    assert ML.install_megatron_lm_hooks() == "installed"
    assert ML.install_megatron_lm_hooks() == "already installed"
    corrected = T.num_floating_point_operations(args, 8)
    # Megatron's own formula with the activated width spread over K experts agrees
    eff = copy.copy(args)
    eff.moe_ffn_hidden_size = activated_widths(run.moe.mohge).uniform / args.moe_router_topk
    assert corrected == pytest.approx(T.num_floating_point_operations.__mohge_stock__(eff, 8))
    assert corrected < stock
    assert ML.mohge_num_floating_point_operations(args, 8) == pytest.approx(corrected)
    T.track_moe_metrics(loss_scale=1.0, iteration=1, track_names=["load_balancing_loss"])
    assert seen["track_names"] == ["mohge_group_loss", "mohge_intra_group_loss"]
    # pretrain() signature gate
    check_megatron_lm(MT.pretrain)
    assert megatron_lm_pretrain_style(MT.pretrain) == "args"

    def pretrain_018(cfg_container, provider, model_provider, model_type, forward_step): ...

    with pytest.raises(UnsupportedMegatronVersion, match="core_v0.18"):
        check_megatron_lm(pretrain_018)


def test_megatron_lm_forward_step_reports_progress(monkeypatch):
    _need_megatron_lm()
    import megatron.training as MT
    import pretrain_gpt

    calls = []
    monkeypatch.setattr(pretrain_gpt, "forward_step", lambda it, m, r=False: calls.append((it, m, r)))
    args = argparse.Namespace(mohge_config=None)
    monkeypatch.setattr(MT, "get_args", lambda: args)
    ML.mohge_forward_step("it", "model")
    assert calls == [("it", "model", False)]
    # the launcher script itself imports without side effects
    spec = importlib.util.spec_from_file_location("pretrain_mohge", ROOT / "examples" / "pretrain_mohge.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert callable(mod.main)
