"""``mohge-pretrain`` with a HybridModel (``model.kind: hybrid``): Megatron's own ``pretrain()``
and ``HybridModelBuilder`` with MoHGE ``E`` layers, 2 gloo ranks, resumed from its checkpoint.
Skipped where ``megatron.training`` is absent (0.16.1; its one-line refusal is tested in
test_megatron_pretrain.py)."""

from __future__ import annotations

import pytest

from tests.test_megatron_pretrain import (expected_mohge_flops, iteration_log,
                                          megatron_flops_so_far, needs_training, pretrain)

HYBRID = ("model.num_layers=4", 'model.hybrid_layer_pattern="*E*E"')


@pytest.mark.slow
@needs_training
def test_hybrid_pretrain_ep2_20_iterations_and_resume(tmp_path):
    common = (*HYBRID, "parallel.expert_parallel=2", "train.iters=20", "checkpoint.interval=10")
    full = pretrain(tmp_path, "cpu_tiny_hybrid_mohge.yaml", *common,
                    f"output_dir={tmp_path / 'a'}")
    assert "layers='*E*E' (4 layers)" in full  # Megatron's HybridModel built the pattern
    a = iteration_log(full)
    assert sorted(a) == list(range(1, 21))
    for name in ("lm loss", "mohge_group_loss", "mohge_group_balance_loss", "grad norm"):
        assert name in a[20], (name, a[20])
    assert float(a[1]["mohge_group_loss"]) == 0.0 and float(a[20]["mohge_group_loss"]) > 0
    assert float(a[20]["lm loss"]) < float(a[1]["lm loss"])
    ckpt = tmp_path / "a" / "checkpoints"
    # Megatron's hybrid FLOPs formula, routed experts at MoHGE's activated width
    flops10, args = megatron_flops_so_far(ckpt / "iter_0000010")
    corrected, stock = expected_mohge_flops(args, 10)
    assert args.hybrid_layer_pattern == "*E*E"
    assert flops10 == pytest.approx(corrected, rel=1e-9) and corrected < 0.9 * stock

    resumed = pretrain(tmp_path, "cpu_tiny_hybrid_mohge.yaml", *common,
                       f"output_dir={tmp_path / 'b'}", f"checkpoint.load={ckpt}",
                       "launch.extra_args=[--ckpt-step, '10']")
    b = iteration_log(resumed)
    assert sorted(b) == list(range(11, 21))
    for it in range(11, 21):  # iteration 12 averages in 11 (test_megatron_pretrain.py)
        keys = ["grad norm", "learning rate", "consumed samples"]
        if it != 12:
            keys += ["lm loss", "mohge_group_loss", "mohge_group_balance_loss"]
        assert {k: b[it][k] for k in keys} == {k: a[it][k] for k in keys}, it
