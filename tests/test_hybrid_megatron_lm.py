"""The Megatron-LM launcher (``examples/pretrain_mohge.py``) with a hybrid run file: on
core_v0.18+ Megatron's ``HybridModelConfig`` / ``HybridModelBuilder`` with MoHGE ``E`` layers;
on core_v0.16 (``pretrain(provider, model_provider, ...)``) a one-line refusal. Needs a
Megatron-LM checkout on ``PYTHONPATH`` (skipped otherwise), as test_megatron_lm_launcher.py."""

import sys

import pytest
import torch

from megatron_mohge.integration import megatron_lm as ML
from tests.test_megatron_lm_launcher import (_need_config_container, _need_megatron_lm,
                                             _pretrain_style, megatron_globals, seed)

__all__ = ["megatron_globals"]  # the fixture, imported for the tests below

MOHGE = dict(widths=[16, 32, 48, 64], experts_per_group=2, group_topk=2, topk=2)


def hybrid_argv(tmp_path, pattern="*E-E"):
    from megatron_mohge.integration.flags import megatron_lm_flags, write_mohge_config
    from megatron_mohge.config.run import RunConfig

    run = RunConfig.from_dict({
        "output_dir": str(tmp_path),
        "model": dict(kind="hybrid", hybrid_layer_pattern=pattern, num_layers=len(pattern),
                      hidden_size=32, num_attention_heads=4, ffn_hidden_size=64, seq_length=16),
        "moe": {"kind": "mohge", "mohge": MOHGE, "use_te": False,
                "token_dispatcher": "allgather"},
        "data": {"path": [str(tmp_path / "ds")]},
        "launch": {"extra_args": ["--use-cpu-initialization", "--no-persist-layer-norm",
                                  "--no-gradient-accumulation-fusion",
                                  "--no-masked-softmax-fusion", "--no-bias-swiglu-fusion",
                                  "--no-bias-dropout-fusion"]}})
    write_mohge_config(run)
    return run, ["pretrain_mohge.py", *megatron_lm_flags(run)]


def test_config_container_builds_megatrons_hybrid_model_with_mohge_e_layers(
        mcore_world1, megatron_globals, monkeypatch, tmp_path):
    _need_config_container()
    from megatron.core.models.hybrid.hybrid_model import HybridModel
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.training.models.hybrid import HybridModelBuilder, HybridModelConfig

    from megatron_mohge.accounting import analytic_param_counts
    from megatron_mohge.routing.mohge_router import MoHGERouter

    run, argv = hybrid_argv(tmp_path)
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setenv("WORLD_SIZE", "1")
    cfg = ML.pretrain_cfg_container()
    assert type(cfg.model) is HybridModelConfig  # Megatron's own config and builder
    assert cfg.model.get_builder_cls() is HybridModelBuilder
    assert cfg.model.hybrid_layer_pattern == "*E-E" and cfg.model.num_moe_experts == 8
    cfg.model.finalize()
    seed()
    model = cfg.model.get_builder_cls()(cfg.model).build_model(
        ProcessGroupCollection.use_mpu_process_groups())
    assert type(model) is HybridModel
    moe = [isinstance(getattr(layer, "mlp", None), MoELayer) for layer in model.decoder.layers]
    assert moe == [False, True, False, True]
    assert all(isinstance(layer.mlp.router, MoHGERouter)
               for layer, m in zip(model.decoder.layers, moe) if m)
    assert sum(p.numel() for p in model.parameters()) == \
        analytic_param_counts(run, cfg.model.vocab_size).total
    tokens = torch.randint(0, 257, (2, 16))
    loss = model(tokens, torch.arange(16).unsqueeze(0).expand(2, -1), None, labels=tokens)
    assert loss.shape == (2, 16) and torch.isfinite(loss).all()


def test_core_v016_launcher_refuses_hybrid_in_one_line(monkeypatch, tmp_path):
    _need_megatron_lm()
    if _pretrain_style() != "args":
        pytest.skip("a core_v0.18+ checkout builds hybrid models (test above)")
    from megatron_mohge.config import ConfigError

    _, argv = hybrid_argv(tmp_path)
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(ConfigError, match="core_v0.19.0") as err:
        ML.run_pretrain()
    assert "\n" not in str(err.value)
