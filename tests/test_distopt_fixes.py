"""The torch-Adam load fixes for Megatron's DistributedOptimizer are installed by the
Megatron-LM hooks (mohge-pretrain, the Megatron-LM launchers) on any device, not only in CPU
mode, and touch only optimizers that wrap torch Adam. The fixes themselves are exercised by
tests/test_distopt_checkpoint.py (mohge-train) and the mohge-pretrain resume test."""
import types

import pytest
import torch

from megatron_mohge.compat import distopt

WRAPPED = ("sharded_state_dict", "load_parameter_state_from_fully_reshardable",
           "load_state_dict", "load_parameter_state_from_dp_reshardable")


def test_megatron_lm_hooks_install_the_load_fixes_once():
    pytest.importorskip("megatron.training.training",
                        reason="megatron.training is not in this megatron-core wheel (0.16.1)")
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer as cls

    from megatron_mohge.integration.megatron_lm.hooks import install_megatron_lm_hooks

    install_megatron_lm_hooks()  # no CPU mode here: what a GPU run without TE gets
    wrapped = {name: getattr(cls, name) for name in WRAPPED}
    assert all(hasattr(f, "__mohge_original__") for f in wrapped.values())
    assert distopt.install_load_fixes() is False  # idempotent: not wrapped twice
    assert {name: getattr(cls, name) for name in WRAPPED} == wrapped


def test_only_torch_adam_is_touched():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert distopt.uses_torch_adam(types.SimpleNamespace(optimizer=torch.optim.Adam(p)))
    assert distopt.uses_torch_adam(types.SimpleNamespace(optimizer=torch.optim.AdamW(p)))
    assert not distopt.uses_torch_adam(types.SimpleNamespace(optimizer=torch.optim.SGD(p, 0.1)))
