"""Process-global Megatron state does not leak from one test into the next (conftest's
autouse fixtures). These two tests run in file order: the first leaves the state behind."""
import torch


def test_a_layer_backward_leaves_a_0d_aux_loss_scale():
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))  # as a bare layer backward does
    assert MoEAuxLossAutoScaler.main_loss_backward_scale.dim() == 0


def test_the_next_test_starts_without_it():
    # regression: a training test after a layer test failed in Megatron's schedules, which
    # copy_ a 1-element scale into the leftover 0-d one
    from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

    assert MoEAuxLossAutoScaler.main_loss_backward_scale is None
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones(1))  # what the schedules do
