"""Run YAML -> Megatron-LM flags (megatron_mohge.integration.flags)."""

import argparse
from pathlib import Path

import pytest

from megatron_mohge.config import ConfigError, MoHGEConfig
from megatron_mohge.integration.flags import (
    OPTIM_FULLY_RESHARDABLE,
    defines_arg,
    megatron_lm_flags,
    write_mohge_config,
)
from megatron_mohge.integration.megatron_lm import load_mohge_config, megatron_moe_args
from megatron_mohge.config.run import RunConfig

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"
REFERENCE = ["paper_3b_mohge.yaml", "paper_3b_moe.yaml", "small_mohge_1node.yaml",
             "small_moe_1node.yaml"]


def load(name, *overrides, tmp_path=None):
    extra = [f"output_dir={tmp_path}"] if tmp_path is not None else []
    return RunConfig.from_yaml(CONFIGS / name, [*extra, *overrides])


def as_dict(flags, unique=True):
    """{'--flag': [values...]} (flags without a value map to []; the last occurrence wins)."""
    out, key = {}, None
    for tok in flags:
        if tok.startswith("--"):
            key = tok
            assert not (unique and key in out), f"duplicate flag {key}"
            out[key] = []
        else:
            out[key].append(tok)
    return out


def test_stock_moe_flags(tmp_path):
    run = load("small_moe_1node.yaml", tmp_path=tmp_path)
    f = as_dict(megatron_lm_flags(run))
    assert f["--num-experts"] == ["32"]
    assert f["--moe-ffn-hidden-size"] == ["1024"]
    assert f["--moe-router-topk"] == ["4"]
    assert f["--moe-shared-expert-intermediate-size"] == ["1024"]
    assert f["--moe-router-load-balancing-type"] == ["aux_loss"]
    assert f["--moe-aux-loss-coeff"] == ["0.01"]
    assert f["--moe-layer-freq"] == ["[0,1,1,1,1,1,1,1,1,1,1,1]"]
    assert "--moe-grouped-gemm" in f and f["--transformer-impl"] == ["transformer_engine"]
    assert f["--expert-model-parallel-size"] == ["4"]
    assert "--mohge-config" not in f
    assert f["--distributed-timeout-minutes"] == ["10"]  # parallel.collective_timeout_s
    assert f["--ckpt-format"] == ["torch_dist"]
    assert f["--save"] == [str(tmp_path / "checkpoints")] and f["--save-interval"] == ["2000"]
    assert f["--load"] == [str(tmp_path / "checkpoints")]
    assert f["--tensorboard-dir"] == [str(tmp_path / "tensorboard")]
    assert "--bf16" in f and "--swiglu" in f and "--disable-bias-linear" in f
    assert f["--lr-decay-style"] == ["cosine"] and f["--lr"] == ["0.0006"]
    assert f["--max-position-embeddings"] == f["--seq-length"] == ["2048"]


def test_mohge_flags_match_apply_to(tmp_path):
    from megatron.core.transformer.transformer_config import TransformerConfig

    run = load("paper_3b_mohge.yaml", tmp_path=tmp_path)
    flags = megatron_lm_flags(run)
    f = as_dict(flags)
    assert f["--mohge-config"] == [str(tmp_path / "mohge_layer.yaml")]
    tc = TransformerConfig(num_layers=15, hidden_size=1024, num_attention_heads=16,
                           num_moe_experts=8, expert_model_parallel_size=8,
                           moe_ffn_hidden_size=1024)
    applied = run.moe.mohge.apply_to(tc)
    assert f["--num-experts"] == [str(applied.num_moe_experts)] == ["64"]
    assert f["--moe-router-topk"] == [str(applied.moe_router_topk)] == ["6"]
    assert f["--moe-ffn-hidden-size"] == [str(applied.moe_ffn_hidden_size)] == ["1280"]
    assert f["--moe-shared-expert-intermediate-size"] == \
        [str(applied.moe_shared_expert_intermediate_size)] == ["2048"]
    assert f["--moe-router-load-balancing-type"] == [applied.moe_router_load_balancing_type]
    assert float(f["--moe-aux-loss-coeff"][0]) == applied.moe_aux_loss_coeff == 0.0
    assert f["--moe-router-dtype"] == [applied.moe_router_dtype] == ["fp32"]
    assert "--moe-z-loss-coeff" not in f and applied.moe_z_loss_coeff is None
    assert "--moe-grouped-gemm" not in f  # the MoHGE spec picks its own expert GEMMs
    assert f["--expert-model-parallel-size"] == ["8"]
    assert f["--tokenizer-type"] == ["HuggingFaceTokenizer"]
    assert f["--tokenizer-model"] == ["/path/to/llama3"]


def test_megatron_moe_args_is_apply_to():
    cfg = MoHGEConfig.paper_3b(router={"z_loss_coeff": 1e-3, "input_jitter_eps": 0.01})
    a = megatron_moe_args(cfg, ep=8)
    assert a == dict(num_experts=64, moe_router_topk=6, moe_ffn_hidden_size=1280,
                     moe_shared_expert_intermediate_size=2048, moe_router_dtype="fp32",
                     moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0,
                     moe_z_loss_coeff=1e-3, moe_input_jitter_eps=0.01,
                     moe_router_topk_scaling_factor=None, moe_router_pre_softmax=False)
    with pytest.raises(ConfigError, match="expert_model_parallel_size=3"):
        megatron_moe_args(cfg, ep=3)


def test_mohge_config_file_round_trip(tmp_path):
    run = load("small_mohge_1node.yaml", "moe.mohge.losses.group_coeff=0.25", tmp_path=tmp_path)
    path = write_mohge_config(run)
    assert path == tmp_path / "mohge_layer.yaml"
    assert load_mohge_config(path) == run.moe.mohge
    assert load_mohge_config(path).losses.group_coeff == 0.25
    # --mohge-config also takes the run file itself (its moe.mohge section)
    assert load_mohge_config(CONFIGS / "paper_3b_mohge.yaml") == \
        MoHGEConfig.from_yaml(CONFIGS / "paper_3b_layer.yaml")
    with pytest.raises(ConfigError, match="moe.kind='stock'"):
        load_mohge_config(CONFIGS / "paper_3b_moe.yaml")


def test_mohge_config_tells_run_files_by_config_kind(tmp_path):
    """--mohge-config and mohge-check-config use one rule (``config_kind``): a run file whose
    only sections are not model/moe (or are misspelt) still reaches RunConfig's own error,
    rather than being read as a layer file."""
    (tmp_path / "paper_3b_layer.yaml").write_text((CONFIGS / "paper_3b_layer.yaml").read_text())
    path = tmp_path / "run.yaml"
    path.write_text((CONFIGS / "paper_3b_mohge.yaml").read_text() + "trian: {iters: 3}\n")
    with pytest.raises(ConfigError, match="trian: unknown key in RunConfig"):
        load_mohge_config(path)
    path.write_text("health: {loss_spike_factor: 3.0}\n")
    with pytest.raises(ConfigError, match="moe.kind='dense'|moe.kind='stock'|moe.kind"):
        load_mohge_config(path)


@pytest.mark.parametrize("version, vocab_flags", [
    ("0.16.1", ["--vocab-size", "256"]),  # core_v0.16.1: eod is the extra id 256
    ("0.19.1", ["--vocab-size", "257", "--null-tokenizer-eod-id", "256"]),  # core_v0.19.0
])
def test_byte_tokenizer_is_null_tokenizer(tmp_path, version, vocab_flags):
    """Megatron's NullTokenizer from the flags for each tag is our ByteTokenizer (ids 0..255,
    eod 256); checked with the installed megatron-core's tokenizer builder on its own line."""
    from packaging.version import Version

    from megatron_mohge.compat.versions import mcore_version
    from megatron_mohge.data.tokenizers import ByteTokenizer

    run = load("small_mohge_1node.yaml", tmp_path=tmp_path)
    flags = megatron_lm_flags(run, megatron_lm_version=Version(version))
    i = flags.index("--tokenizer-type")
    assert flags[i:i + 2 + len(vocab_flags)] == ["--tokenizer-type", "NullTokenizer", *vocab_flags]
    byte = ByteTokenizer()
    assert (byte.vocab_size, byte.eod) == (257, 256)
    assert run.padded_vocab_size(byte.vocab_size) == 384  # Megatron-LM pads the same way
    if (mcore_version().major, mcore_version().minor) != Version(version).release[:2]:
        return
    try:  # core_v0.16 wheel
        from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer
    except ImportError:  # core_v0.19 wheel
        from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
    f = as_dict(flags)
    ns = argparse.Namespace(tokenizer_type="NullTokenizer", vocab_size=int(f["--vocab-size"][0]),
                            null_tokenizer_eod_id=int(f.get("--null-tokenizer-eod-id", [-1])[0])
                            if "--null-tokenizer-eod-id" in f else None,
                            metadata_path=None, pad_vocab_size=False, rank=0)
    tok = build_tokenizer(ns)
    assert (tok.vocab_size, tok.eod) == (byte.vocab_size, byte.eod)


def test_flags_follow_the_megatron_lm_checkout(tmp_path):
    """Without an explicit version the flags follow launch.megatron_lm_dir's version file."""
    for version, vocab in (((0, 16, 1), "256"), ((0, 19, 1), "257")):
        mlm = tmp_path / f"mlm-{version[1]}"
        (mlm / "megatron" / "core").mkdir(parents=True)
        (mlm / "megatron" / "core" / "package_info.py").write_text(
            "MAJOR = {}\nMINOR = {}\nPATCH = {}\nPRE_RELEASE = ''\n".format(*version))
        run = load("small_mohge_1node.yaml", f"launch.megatron_lm_dir={mlm}", tmp_path=tmp_path)
        assert as_dict(megatron_lm_flags(run))["--vocab-size"] == [vocab]


def test_byte_tokenizer_vocab_mismatch(tmp_path):
    run = load("small_mohge_1node.yaml", "model.vocab_size=300", tmp_path=tmp_path)
    with pytest.raises(ConfigError, match="model.vocab_size=300"):
        megatron_lm_flags(run)
    ok = load("small_mohge_1node.yaml", "model.vocab_size=384", tmp_path=tmp_path)
    assert "--vocab-size" in megatron_lm_flags(ok)


@pytest.mark.parametrize("tok, folder", [("/tok/llama3/tokenizer.json", "/tok/llama3"),
                                         ("/tok/llama3", "/tok/llama3")])
def test_hf_tokenizer(tmp_path, tok, folder):
    run = load("small_mohge_1node.yaml", f"data.tokenizer={tok}", tmp_path=tmp_path)
    f = as_dict(megatron_lm_flags(run))
    assert f["--tokenizer-type"] == ["HuggingFaceTokenizer"]
    assert f["--tokenizer-model"] == [folder]
    assert "--vocab-size" not in f


def test_hf_tokenizer_file_must_be_tokenizer_json(tmp_path):
    run = load("small_mohge_1node.yaml", "data.tokenizer=data/x.tokenizer.json", tmp_path=tmp_path)
    with pytest.raises(ConfigError, match="tokenizer.json"):
        megatron_lm_flags(run)


def test_parallel_data_and_extra_args(tmp_path):
    run = load("small_mohge_1node.yaml", "parallel.tensor_parallel=2",
               "parallel.expert_tensor_parallel=1", "data.path=[a/x, b/y]",
               "launch.extra_args=[--lr, '0.1', --recompute-activations]",
               "moe.use_te=false", "checkpoint.enabled=false", "eval.interval=0",
               tmp_path=tmp_path)
    flags = megatron_lm_flags(run)
    f = as_dict(flags, unique=False)
    assert "--sequence-parallel" in flags  # TP > 1 with MoE
    assert f["--data-path"] == ["a/x", "b/y"]
    assert flags[-3:] == ["--lr", "0.1", "--recompute-activations"]  # last, so they win
    assert f["--lr"] == ["0.1"]
    assert "--expert-tensor-parallel-size" in f and "--save" not in f
    assert "--no-rope-fusion" in flags and flags[flags.index("--transformer-impl") + 1] == "local"
    assert flags[flags.index("--eval-interval") + 1] == str(run.train.iters)


def test_dense_and_refusals(tmp_path):
    dense = load("small_moe_1node.yaml", "moe.kind=dense", "parallel.expert_parallel=1",
                 tmp_path=tmp_path)
    flags = megatron_lm_flags(dense)
    assert not [t for t in flags if t.startswith("--moe") or t == "--num-experts"]
    noisy = load("small_moe_1node.yaml", "moe.router=noisy_topk", tmp_path=tmp_path)
    with pytest.raises(ConfigError, match="moe.router='noisy_topk'"):
        megatron_lm_flags(noisy)
    no_data = load("small_moe_1node.yaml", "data.path=[]", tmp_path=tmp_path)
    with pytest.raises(ConfigError, match="data.path"):
        megatron_lm_flags(no_data)


@pytest.mark.parametrize("name", REFERENCE)
def test_reference_configs_validate(name, tmp_path):
    run = load(name, tmp_path=tmp_path)
    run.check_world_size(run.launch.nodes * run.launch.gpus_per_node)
    assert megatron_lm_flags(run)


def _megatron_lm_parser():
    """Megatron-LM's argument parser: from the checkout at $MEGATRON_LM_DIR when set, else
    the installed ``megatron.training`` (the 0.19 wheel ships it)."""
    from megatron_mohge.integration.megatron_lm import add_megatron_lm_to_path

    add_megatron_lm_to_path()
    pytest.importorskip("megatron.training.arguments",
                        reason="Megatron-LM checkout (megatron.training) not importable")
    import megatron.training.arguments as A

    from megatron_mohge.integration.megatron_lm import add_mohge_args

    parser = argparse.ArgumentParser(allow_abbrev=False)
    return add_mohge_args(A.add_megatron_arguments(parser)), A


@pytest.mark.parametrize("name", REFERENCE)
def test_flags_parse_with_megatron_lm(name, tmp_path, monkeypatch):
    """Every flag exists in Megatron-LM's parser and reads back as intended."""
    parser, A = _megatron_lm_parser()
    import torch

    # validate_args asks the GPU's compute capability for --moe-grouped-gemm (GPU runs)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    run = load(name, tmp_path=tmp_path)
    if run.moe.kind == "mohge":
        write_mohge_config(run)
    flags = megatron_lm_flags(run)
    args = parser.parse_args(flags)
    # the installed Megatron-LM knows the flag: rendered for distributed-optimizer runs
    assert args.dist_ckpt_optim_fully_reshardable == run.parallel.use_distributed_optimizer == \
        (OPTIM_FULLY_RESHARDABLE in flags)
    m = run.model
    assert (args.num_layers, args.hidden_size, args.seq_length) == \
        (m.num_layers, m.hidden_size, m.seq_length)
    assert args.moe_layer_freq == m.moe_layer_freq
    assert args.expert_model_parallel_size == run.parallel.expert_parallel
    assert args.ckpt_format == "torch_dist" and args.bf16
    if run.moe.kind == "mohge":
        cfg = run.moe.mohge
        assert (args.num_experts, args.moe_router_topk) == (cfg.num_experts, cfg.topk)
        assert args.mohge_config == str(tmp_path / "mohge_layer.yaml")
        assert args.moe_router_load_balancing_type in ("none", ["none"])
    else:
        assert (args.num_experts, args.moe_router_topk) == (run.moe.num_experts, run.moe.topk)
    # Megatron-LM's own validation accepts the layout at the launch size
    args.world_size = run.launch.nodes * run.launch.gpus_per_node
    args.rank = 0
    A.validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
    assert args.data_parallel_size == run.check_world_size(args.world_size)


def _moe_args_of(run):
    """The Megatron-LM MoE arguments mohge-train's TransformerConfig implies for ``run``."""
    from megatron_mohge.config.megatron import megatron_lm_args, run_moe_transformer_fields

    return megatron_lm_args(run_moe_transformer_fields(run.moe))


def _one(value):
    return value[0] if isinstance(value, list) and len(value) == 1 else value


@pytest.mark.parametrize("name, overrides", [
    ("paper_3b_mohge.yaml", ()),
    ("small_mohge_1node.yaml", ("moe.mohge.topk=1", "moe.mohge.group_topk=1")),  # K=1
    ("small_mohge_1node.yaml", ("moe.mohge.router.z_loss_coeff=0.001",
                                "moe.mohge.router.input_jitter_eps=0.01",
                                "moe.mohge.router.fp32=false")),
    ("small_moe_1node.yaml", ()),
    ("small_moe_1node.yaml", ("moe.aux_loss_coeff=0", "moe.z_loss_coeff=0.001")),
])
def test_rendered_moe_flags_parse_back_to_the_mapping(name, overrides, tmp_path):
    """The flags alone (no ``--mohge-config`` action filling arguments) read back by
    Megatron-LM's own parser give every MoE argument of the one mapping."""
    parser, _ = _megatron_lm_parser()
    run = load(name, *overrides, tmp_path=tmp_path)
    flags = megatron_lm_flags(run)
    if "--mohge-config" in flags:
        i = flags.index("--mohge-config")
        flags = flags[:i] + flags[i + 2:]
    args = parser.parse_args(flags)
    want = _moe_args_of(run)
    assert {k: _one(getattr(args, k)) for k in want} == want
    if run.moe.kind == "mohge":
        assert want == megatron_moe_args(run.moe.mohge, ep=run.parallel.expert_parallel)


@pytest.mark.parametrize("name", REFERENCE)
def test_megatron_lm_transformer_config_matches_mohge_train(name, tmp_path, monkeypatch):
    """Megatron-LM's TransformerConfig from our flags has the MoE fields mohge-train's has."""
    parser, A = _megatron_lm_parser()
    import torch

    try:  # core_v0.16: in arguments; core_v0.19: moved to argument_utils
        from megatron.training.arguments import core_transformer_config_from_args
    except ImportError:
        from megatron.training.argument_utils import core_transformer_config_from_args
    from megatron_mohge.config.megatron import run_moe_transformer_fields

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    # local layers: the config then builds without Transformer Engine (RoPE fusion is TE's)
    run = load(name, "moe.use_te=false", tmp_path=tmp_path)
    if run.moe.kind == "mohge":
        write_mohge_config(run)
    args = parser.parse_args(megatron_lm_flags(run))
    args.world_size = run.launch.nodes * run.launch.gpus_per_node
    args.rank = 0
    A.validate_args(args, {"tokenizer_type": "GPT2BPETokenizer"})
    tc = core_transformer_config_from_args(args)
    want = run_moe_transformer_fields(run.moe)
    assert {k: _one(getattr(tc, k)) for k in want} == want


def checkout(root: Path, source: str = "", where: str = "config/training_config.py") -> Path:
    """A Megatron-LM checkout's argument sources (``megatron/training/<where>``)."""
    path = root / "megatron" / "training" / where
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    return root


#: How the two supported tags define the flag (core_v0.16.1: training_config.py, core_v0.19.0:
#: config/training_config.py, generated flags), and the add_argument call of older sources.
FIELD = "class CheckpointConfig:\n    dist_ckpt_optim_fully_reshardable: bool = False\n"
ADD_ARGUMENT = "group.add_argument('--dist-ckpt-optim-fully-reshardable', action='store_true')\n"


def test_optim_fully_reshardable_found_in_the_megatron_lm_source(tmp_path, monkeypatch):
    monkeypatch.delenv("MEGATRON_LM_DIR", raising=False)
    for where, source in (("training_config.py", FIELD), ("config/training_config.py", FIELD),
                          ("arguments.py", ADD_ARGUMENT)):
        assert defines_arg(OPTIM_FULLY_RESHARDABLE, checkout(tmp_path / where, source, where))
    # named only in a message or an attribute read: not defined
    mention = ("assert not args.dist_ckpt_optim_fully_reshardable, "
               "'--dist-ckpt-optim-fully-reshardable'\n")
    old = checkout(tmp_path / "old", mention, "arguments.py")
    assert not defines_arg(OPTIM_FULLY_RESHARDABLE, old)
    monkeypatch.setenv("MEGATRON_LM_DIR", str(tmp_path / "training_config.py"))
    assert defines_arg(OPTIM_FULLY_RESHARDABLE)  # the checkout of $MEGATRON_LM_DIR
    try:  # the installed megatron-core: the 0.19 wheels ship megatron.training, 0.16.1 not
        import megatron.training.arguments  # noqa: F401
        installed = True
    except ImportError:
        installed = False
    assert defines_arg(OPTIM_FULLY_RESHARDABLE, installed=True) is installed


def test_optim_fully_reshardable_rendered_where_megatron_lm_has_it(tmp_path, monkeypatch):
    """A distributed-optimizer run saves a checkpoint that loads in any layout (Megatron-LM's
    default dp_reshardable loads only in the one that saved it) -- where the flag exists."""
    from megatron_mohge.integration import slurm

    monkeypatch.delenv("MEGATRON_LM_DIR", raising=False)
    new = checkout(tmp_path / "new", FIELD)
    old = checkout(tmp_path / "old")
    run = load("small_mohge_1node.yaml", f"launch.megatron_lm_dir={new}", tmp_path=tmp_path)
    assert run.parallel.use_distributed_optimizer
    assert OPTIM_FULLY_RESHARDABLE in megatron_lm_flags(run)
    without = load("small_mohge_1node.yaml", f"launch.megatron_lm_dir={old}", tmp_path=tmp_path)
    assert OPTIM_FULLY_RESHARDABLE not in megatron_lm_flags(without)
    no_dist_opt = load("small_mohge_1node.yaml", f"launch.megatron_lm_dir={new}",
                       "parallel.use_distributed_optimizer=false", tmp_path=tmp_path)
    assert OPTIM_FULLY_RESHARDABLE not in megatron_lm_flags(no_dist_opt)
    # the Slurm launchers follow the checkout they run ($MEGATRON_LM_DIR wins, as render_env)
    for mlm, present in ((new, True), (old, False)):
        [line] = slurm.render_commands(without, "/mlm/pretrain_gpt.py",
                                       {"MEGATRON_LM_DIR": str(mlm)}, shape="torchrun")
        assert (OPTIM_FULLY_RESHARDABLE in line) is present
