"""The Megatron-LM launcher's pieces: argument hook, model builder, aux-loss names, FLOPs.

The core parts run with megatron.core alone (the ``mcore_world1`` fixture); the parts that
need Megatron-LM (``megatron.training``, ``pretrain_gpt``) are skipped unless a checkout at
core_v0.16.1 or core_v0.19.0 is on ``PYTHONPATH`` (``MEGATRON_LM_DIR`` too for the patch
tests). The seams that differ between the tags are picked by shape, as the launcher does:
``pretrain()``'s signature, ``track_moe_metrics`` vs the MoE metrics tracker.
"""

import argparse
import copy
import importlib.util
import inspect
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from megatron_mohge.config import ConfigError, MoHGEConfig
from megatron_mohge.integration import megatron_lm as ML
from megatron_mohge.accounting import activated_widths

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
    assert args.moe_ffn_hidden_size == 76 and args.moe_router_load_balancing_type == "none"
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
    assert names == ["z_loss", "mohge_group_loss", "mohge_group_balance_loss"]
    args.mohge_intra_group_coeff = 0.5  # the tiny layer balances inside groups loss-free
    assert ML.mohge_track_names(args, []) == ["mohge_group_loss", "mohge_group_balance_loss",
                                              "mohge_intra_group_loss"]
    assert ML.mohge_track_names(argparse.Namespace(), ["load_balancing_loss"]) == \
        ["load_balancing_loss"]
    noisy = MoHGEConfig.from_yaml(TINY)
    noisy.router.type = "noisy_topk"
    assert ML.mohge_aux_loss_names(noisy) == ["noisy_importance_loss", "noisy_load_loss"]
    from megatron_mohge.routing import mohge_router, noisy_topk

    assert {mohge_router.GROUP_LOSS_NAME, mohge_router.INTRA_GROUP_LOSS_NAME,
            mohge_router.GROUP_BALANCE_LOSS_NAME, noisy_topk.IMPORTANCE_LOSS_NAME,
            noisy_topk.LOAD_LOSS_NAME} == {"mohge_group_loss", "mohge_intra_group_loss",
                                           "mohge_group_balance_loss", "noisy_importance_loss",
                                           "noisy_load_loss"}


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


def mtp_transformer_layer(model):
    """The transformer layer inside the first MTP layer (0.16: ``transformer_layer``; 0.19:
    ``mtp_model_layer``)."""
    mtp = model.mtp.layers[0]
    return getattr(mtp, "transformer_layer", None) or mtp.mtp_model_layer


def test_builder_mtp_layer_is_mohge(mcore_world1):
    import dataclasses

    from megatron_mohge.routing.mohge_router import MoHGERouter

    args = model_args(TINY, [0, 1, 0, 1], mtp_num_layers=1)
    cfg = ML.finalize_mohge_args(args)
    seed()
    tc = dataclasses.replace(transformer_config(args), mtp_num_layers=1)
    model = ML.build_mohge_gpt_model(args, tc, cfg)
    assert isinstance(mtp_transformer_layer(model).mlp.router, MoHGERouter)
    check_mtp_forward(model)


def check_mtp_forward(model):
    """A training forward with the MTP loss and a backward reaching the MTP layer's experts."""
    tokens = torch.randint(0, 128, (2, 16))
    loss = model(tokens, torch.arange(16).unsqueeze(0).expand(2, -1), None, labels=tokens)
    assert loss.shape == (2, 16) and torch.isfinite(loss).all()
    loss.sum().backward()
    experts = mtp_transformer_layer(model).mlp.experts
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in experts.parameters())


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


def _pretrain_style():
    from megatron.training import pretrain

    from megatron_mohge.compat.versions import check_megatron_lm

    return check_megatron_lm(pretrain)


def _need_config_container():
    """core_v0.18+: the model comes from a GPTModelConfig and its builder."""
    _need_megatron_lm()
    if _pretrain_style() != "config_container":
        pytest.skip("Megatron-LM checkout before core_v0.18 (no GPTModelConfig / builder)")


@pytest.fixture
def megatron_globals():
    """Megatron-LM's global args/tokenizer/timers, unset afterwards (``pretrain_cfg_container``
    sets them as ``pretrain_gpt.py`` does; a second set in the same process would assert)."""
    _need_megatron_lm()  # skips where megatron.training is absent (the 0.16.1 wheel)
    import megatron.training.global_vars as G

    G.unset_global_variables()
    yield
    G.unset_global_variables()


def tiny_run_argv(tmp_path, extra=()):
    """The launcher's command line for a tiny MoHGE run (what the Slurm scripts generate)."""
    from megatron_mohge.integration.flags import megatron_lm_flags, write_mohge_config
    from megatron_mohge.config.run import RunConfig

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
    return run, ["pretrain_mohge.py", *megatron_lm_flags(run), *extra]


def megatron_lm_args(monkeypatch, tmp_path, extra=()):
    """Parse and validate a tiny MoHGE run as Megatron-LM does (no globals, no CUDA)."""
    import sys

    import megatron.training.arguments as A

    try:  # core_v0.16
        from megatron.training.tokenizer.tokenizer import _vocab_size_with_padding
    except ImportError:  # core_v0.19: the tokenizers moved to megatron.core
        from megatron.core.tokenizers.utils.build_tokenizer import (
            vocab_size_with_padding as _vocab_size_with_padding,
        )

    run, argv = tiny_run_argv(tmp_path, extra)
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setenv("WORLD_SIZE", "1")
    args = A.parse_args(ML.compose_extra_args_providers(None, ML.add_mohge_args))
    A.validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
    args.padded_vocab_size = _vocab_size_with_padding(257, args)
    return run, args


def check_tiny_model(model, run, vocab):
    """MoHGE layers where --moe-layer-freq puts MoE; parameters as accounted; finite loss."""
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from megatron_mohge.accounting import analytic_param_counts
    from megatron_mohge.routing.mohge_router import MoHGERouter

    kinds = [isinstance(layer.mlp, MoELayer) for layer in model.decoder.layers]
    assert kinds == [False, True, True, True]
    assert all(isinstance(layer.mlp.router, MoHGERouter)
               for layer, moe in zip(model.decoder.layers, kinds) if moe)
    assert sum(p.numel() for p in model.parameters()) == analytic_param_counts(run, vocab).total
    tokens = torch.randint(0, 257, (2, 16))
    loss = model(tokens, torch.arange(16).unsqueeze(0).expand(2, -1), None, labels=tokens)
    assert loss.shape == (2, 16) and torch.isfinite(loss).all()


def test_megatron_lm_parse_build_and_forward(mcore_world1, monkeypatch, tmp_path):
    """The model-provider path (core_v0.16 launcher; gpt_builders.gpt_builder in a patched
    checkout of either tag)."""
    _need_megatron_lm()
    run, args = megatron_lm_args(monkeypatch, tmp_path, ["--mohge-intra-group-coeff", "0.01"])
    assert args.num_experts == 16 and args.moe_router_load_balancing_type == "none"
    assert ML.mohge_config_from_args(args).losses.intra_group_coeff == 0.01
    seed()
    model = ML.mohge_gpt_builder(args, True, True)  # config from core_transformer_config_from_args
    check_tiny_model(model, run, args.padded_vocab_size)


def test_megatron_lm_config_container_build_and_forward(mcore_world1, megatron_globals,
                                                        monkeypatch, tmp_path):
    """core_v0.18+: the launcher's parse -> MoHGEGPTModelConfig -> PretrainConfigContainer, and
    the model ``pretrain`` builds from it (``get_builder_cls()(cfg.model).build_model``)."""
    import sys

    _need_config_container()
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training import get_args

    from megatron_mohge.integration.megatron_lm.gpt_config import (
        MoHGEGPTModelBuilder,
        MoHGEGPTModelConfig,
    )

    run, argv = tiny_run_argv(tmp_path, ["--mohge-group-coeff", "0.5"])
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg = ML.pretrain_cfg_container()
    args = get_args()  # pretrain() reads the same global args
    assert isinstance(cfg.model, MoHGEGPTModelConfig) and cfg.model.mohge.losses.group_coeff == 0.5
    assert cfg.model.get_builder_cls() is MoHGEGPTModelBuilder
    assert cfg.model.num_moe_experts == 16 and cfg.model.moe_ffn_hidden_size == 72
    assert cfg.model.moe_router_load_balancing_type == "none"
    cfg.model.finalize()
    seed()
    model = cfg.model.get_builder_cls()(cfg.model).build_model(
        ProcessGroupCollection.use_mpu_process_groups())
    assert model.pre_process and model.post_process
    check_tiny_model(model, run, cfg.model.vocab_size)
    assert cfg.model.vocab_size == args.padded_vocab_size


def test_megatron_lm_mtp_layers_are_mohge(mcore_world1, monkeypatch, tmp_path):
    """core_v0.18+: MoHGEGPTModelBuilder builds a MoHGE MTP layer; Megatron's own builder with
    the callable spec builds the MoHGE decoder but refuses MTP (its MTP layer would be stock)."""
    _need_config_container()
    import megatron.training as MT
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.training.argument_utils import gpt_config_from_args
    from megatron.training.models.gpt import GPTModelBuilder

    from megatron_mohge.integration.megatron_lm.gpt_config import mohge_gpt_model_config
    from megatron_mohge.routing.mohge_router import MoHGERouter

    pgs = ProcessGroupCollection.use_mpu_process_groups()
    run, args = megatron_lm_args(monkeypatch, tmp_path, ["--mtp-num-layers", "1"])
    monkeypatch.setattr(MT, "get_args", lambda: args)
    seed()
    model_cfg = mohge_gpt_model_config(args)
    model = model_cfg.get_builder_cls()(model_cfg).build_model(pgs)
    assert isinstance(mtp_transformer_layer(model).mlp.router, MoHGERouter)
    check_mtp_forward(model)
    # the callable spec through Megatron's GPTModelBuilder
    stock_cfg = gpt_config_from_args(args)
    stock_cfg.transformer_layer_spec = ML.mohge_decoder_spec
    with pytest.raises(ConfigError, match="--mtp-num-layers with the callable MoHGE --spec"):
        GPTModelBuilder(stock_cfg).build_model(pgs)
    args.mtp_num_layers = stock_cfg.mtp_num_layers = None
    seed()
    model = GPTModelBuilder(stock_cfg).build_model(pgs)
    routers = [layer.mlp.router for layer in model.decoder.layers
               if isinstance(layer.mlp, MoELayer)]
    assert len(routers) == 3 and all(isinstance(r, MoHGERouter) for r in routers)


def test_megatron_lm_hooks_and_flops(monkeypatch, tmp_path):
    T = _need_megatron_lm()
    run, args = megatron_lm_args(monkeypatch, tmp_path)
    import megatron.training as MT

    monkeypatch.setattr(T, "num_floating_point_operations", T.num_floating_point_operations)
    if hasattr(T, "track_moe_metrics"):  # core_v0.16: restore the stock function afterwards
        monkeypatch.setattr(T, "track_moe_metrics", T.track_moe_metrics)
    monkeypatch.setattr(MT, "get_args", lambda: args)
    monkeypatch.setattr(T, "finalize_model_grads", T.finalize_model_grads)
    monkeypatch.setattr(T, "training_log", T.training_log)
    monkeypatch.setattr(T, "evaluate", T.evaluate)
    stock = T.num_floating_point_operations(args, 8)
    assert ML.install_megatron_lm_hooks() == "installed"
    assert ML.install_megatron_lm_hooks() == "already installed"
    # end-of-step balancing runs after Megatron's finalize_model_grads, wrapped once
    assert T.finalize_model_grads._mohge_end_of_step
    assert not getattr(T.finalize_model_grads.__wrapped__.__wrapped__, "_mohge_end_of_step",
                       False)
    # routing diagnostics: training_log and evaluate wrapped, the model seen at finalize
    from megatron_mohge.integration.megatron_lm import routing_log

    for f in (T.finalize_model_grads, T.training_log, T.evaluate):
        assert getattr(f, routing_log._MARK, False), f
    corrected = T.num_floating_point_operations(args, 8)
    # Megatron's own formula with the activated width spread over K experts agrees
    eff = copy.copy(args)
    eff.moe_ffn_hidden_size = activated_widths(run.moe.mohge).uniform / args.moe_router_topk
    stock_fn = T.num_floating_point_operations.__mohge_stock__
    assert corrected == pytest.approx(stock_fn(eff, 8))
    assert corrected < stock
    assert ML.mohge_num_floating_point_operations(args, 8) == pytest.approx(corrected)
    if "total_real_tokens_in_batch" in inspect.signature(stock_fn).parameters:  # core_v0.19
        tokens = 8 * args.seq_length * 3 // 4  # a packed batch with a quarter of padding
        kw = dict(total_real_tokens_in_batch=tokens,
                  seqlen_squared_sum_in_batch=8 * args.seq_length ** 2 * 9 // 16)
        assert T.num_floating_point_operations(args, 8, **kw) == \
            pytest.approx(stock_fn(eff, 8, **kw))
        assert ML.mohge_flops_correction(args, 8, total_real_tokens_in_batch=tokens) == \
            pytest.approx(ML.mohge_flops_correction(args, 8) * 3 / 4)
    assert _pretrain_style() == ("args" if hasattr(T, "track_moe_metrics") else "config_container")


def test_megatron_lm_aux_losses_reduced_in_log(mcore_world1, monkeypatch, tmp_path):
    """The MoHGE router losses reach training_log's totals. core_v0.16: the names passed to
    track_moe_metrics (its reduction needs CUDA); core_v0.18+: the real tracker's report."""
    T = _need_megatron_lm()
    run, args = megatron_lm_args(monkeypatch, tmp_path)
    import megatron.training as MT

    monkeypatch.setattr(MT, "get_args", lambda: args)
    monkeypatch.setattr(T, "num_floating_point_operations", T.num_floating_point_operations)
    for name in ("finalize_model_grads", "training_log", "evaluate"):
        monkeypatch.setattr(T, name, getattr(T, name))
    if hasattr(T, "track_moe_metrics"):
        seen = {}
        monkeypatch.setattr(T, "track_moe_metrics", lambda *a, **kw: seen.update(kw))
        ML.install_megatron_lm_hooks()
        T.track_moe_metrics(loss_scale=1.0, iteration=1, track_names=["load_balancing_loss"])
        assert seen["track_names"] == ["mohge_group_loss", "mohge_group_balance_loss"]
        return
    from megatron.core.transformer.moe import moe_logging

    tracker = moe_logging.MoEMetricsTracker()
    monkeypatch.setattr(moe_logging, "_MOE_METRICS_TRACKER", tracker)
    assert ML.install_megatron_lm_hooks() == "installed"
    assert T.get_moe_metrics_tracker() is tracker and tracker.report.__mohge_stock__
    layers = args.num_layers
    for layer, (g, e) in zip((2, 3, 4), ((0.3, 0.1), (0.5, 0.2), (0.7, 0.3))):  # MoE layers
        tracker.record("mohge_group_loss", torch.tensor(g), layer, layers)
        tracker.record("mohge_intra_group_loss", torch.tensor(e), layer, layers)
    totals = {}
    # what training_log passes (core_v0.19.0): Megatron's names for the configured losses
    log = T.get_moe_metrics_tracker().report(
        loss_scale=0.5, iteration=1, force_initialize=True, track_names=[],
        num_layers=layers, moe_layer_freq=args.moe_layer_freq, mtp_num_layers=None,
        total_loss_dict=totals)
    assert totals.keys() == {"mohge_group_loss", "mohge_intra_group_loss"}
    assert totals["mohge_group_loss"].item() == pytest.approx(0.5 * 1.5 / 3)  # mean of layers
    assert totals["mohge_intra_group_loss"].item() == pytest.approx(0.5 * 0.6 / 3)
    assert "mohge" not in log  # losses go to the totals, not the extra MoE string
    args.mohge_config = None  # runs without MoHGE are left alone
    tracker.record("mohge_group_loss", torch.tensor(1.0), 2, layers)
    totals = {}
    tracker.report(loss_scale=1.0, iteration=2, track_names=[], num_layers=layers,
                   total_loss_dict=totals)
    assert totals == {}


def test_launcher_run_pretrain_builds_and_forwards(mcore_world1, megatron_globals,
                                                   monkeypatch, tmp_path):
    """examples/pretrain_mohge.py's run_pretrain on this tag, up to Megatron's pretrain() (which
    needs CUDA): the arguments it passes build the MoHGE model pretrain() would build, and the
    model runs a forward. core_v0.16: parse + validate + set globals as initialize_megatron
    does, then the model provider; core_v0.19: the PretrainConfigContainer's model builder."""
    import functools
    import sys

    T = _need_megatron_lm()
    import megatron.training as MT
    import megatron.training.arguments as A
    import pretrain_gpt
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.training.global_vars import set_global_variables

    got = {}

    @functools.wraps(MT.pretrain)  # same signature: the launcher picks its style from it
    def pretrain(*a, **kw):
        got.update(a=a, kw=kw)

    monkeypatch.setattr(MT, "pretrain", pretrain)
    monkeypatch.setattr(T, "num_floating_point_operations", T.num_floating_point_operations)
    if hasattr(T, "track_moe_metrics"):
        monkeypatch.setattr(T, "track_moe_metrics", T.track_moe_metrics)
    else:
        from megatron.core.transformer.moe import moe_logging

        monkeypatch.setattr(moe_logging, "_MOE_METRICS_TRACKER", moe_logging.MoEMetricsTracker())
    run, argv = tiny_run_argv(tmp_path)
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setenv("WORLD_SIZE", "1")
    ML.run_pretrain()
    assert T.num_floating_point_operations.__mohge_stock__  # the hooks are installed
    config_style = _pretrain_style() == "config_container"
    # (cfg_container | provider, provider | model_provider, model_type, forward_step)
    provider = got["a"][1] if config_style else got["a"][0]
    assert provider is pretrain_gpt.train_valid_test_datasets_provider and provider.is_distributed
    assert got["a"][3] is ML.mohge_forward_step
    assert got["kw"]["get_embedding_ranks"] is pretrain_gpt.get_embedding_ranks
    seed()
    if config_style:
        cfg = got["a"][0]
        assert cfg.model.mohge == ML.mohge_config_from_args(MT.get_args())
        model = cfg.model.get_builder_cls()(cfg.model).build_model(
            ProcessGroupCollection.use_mpu_process_groups())
        vocab = cfg.model.vocab_size
    else:
        model_provider, kw = got["a"][1], got["kw"]
        args = A.parse_args(kw["extra_args_provider"])
        A.validate_args(args, kw["args_defaults"])
        set_global_variables(args)
        model = model_provider(pre_process=True, post_process=True)
        vocab = args.padded_vocab_size
    assert vocab == run.megatron_padded_vocab(257)  # the byte tokenizer, padded
    check_tiny_model(model, run, vocab)


def test_megatron_lm_forward_step_reports_progress(monkeypatch):
    _need_megatron_lm()
    import megatron.training as MT
    import pretrain_gpt

    calls = []
    monkeypatch.setattr(pretrain_gpt, "forward_step",
                        lambda it, m, r=False: calls.append((it, m, r)))
    args = argparse.Namespace(mohge_config=None)
    monkeypatch.setattr(MT, "get_args", lambda: args)
    ML.mohge_forward_step("it", "model")
    assert calls == [("it", "model", False)]
    # the launcher script itself imports without side effects
    spec = importlib.util.spec_from_file_location("pretrain_mohge",
                                                  ROOT / "examples" / "pretrain_mohge.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert callable(mod.main)


def test_check_megatron_lm_refuses_other_pretrain(monkeypatch):
    from megatron_mohge.compat import versions as V

    def pretrain_odd(provider, model_type): ...

    with pytest.raises(V.UnsupportedMegatronVersion, match="core_v0.16.1 or core_v0.19.0"):
        V.check_megatron_lm(pretrain_odd)
