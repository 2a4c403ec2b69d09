"""Held-out loss by chosen expert width (training/width_loss.py) on constructed cases with
known answers."""


import pytest
import torch

from megatron_mohge.training.width_loss import (
    WidthLossRecorder,
    loss_by_width_figures,
    loss_by_width_sums,
    supported,
)


def test_sums_group_masked_losses_by_each_layers_width():
    loss = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    mask = torch.tensor([1, 1, 1, 1, 0])  # the last token is masked out
    index = torch.tensor([[0, 0, 1, 1, 1],    # layer 1: tokens 0,1 narrow; 2,3 wide
                          [1, 0, 1, 0, 0]])   # layer 2: tokens 1,3 narrow; 0,2 wide
    sums, counts = loss_by_width_sums(loss, mask, index, 2)
    assert sums.tolist() == [[3.0, 7.0], [6.0, 4.0]]
    assert counts.tolist() == [[2.0, 2.0], [2.0, 2.0]]
    fig = loss_by_width_figures(sums, counts, [16, 64], [1, 3])
    assert fig["widths"] == [16, 64]
    assert fig["mean_loss"] == [pytest.approx(9 / 4), pytest.approx(11 / 4)]
    assert fig["token_share"] == [0.5, 0.5]
    assert fig["layers"][0] == {"layer_number": 1, "mean_loss": [1.5, 3.5],
                                "token_share": [0.5, 0.5]}
    assert fig["layers"][1]["mean_loss"] == [3.0, 2.0]
    # the share-weighted mean of the per-width losses is the token-mean loss
    overall = sum(m * s for m, s in zip(fig["mean_loss"], fig["token_share"]))
    assert overall == pytest.approx(10 / 4)


def test_a_width_no_token_chose_has_no_loss():
    sums, counts = loss_by_width_sums(torch.tensor([1.0, 3.0]), torch.ones(2),
                                      torch.tensor([[0, 0]]), 3)
    fig = loss_by_width_figures(sums, counts, [8, 16, 32], [None])
    assert fig["mean_loss"] == [2.0, None, None] and fig["token_share"] == [1.0, 0.0, 0.0]


class _Router(torch.nn.Module):
    """A router's interface as the recorder reads it: ``(probs, routing_map)`` in slot
    order from ``[s, b, h]`` hidden states flattened s-major, like Megatron's MoE layer.
    Token t picks slots by its first feature: top-1 slot ``x % 4``, second ``(x+1) % 4``."""

    layer_number = 1
    slot_to_canonical = torch.tensor([3, 2, 1, 0])  # slot j holds canonical expert 3 - j

    def slot_widths(self):  # the public reader of GroupedExpertRouter / CountedTopKRouter
        canonical = [8, 16, 32, 64]
        return [canonical[int(c)] for c in self.slot_to_canonical]

    def forward(self, x_SBH):
        ids_T = x_SBH.reshape(-1, x_SBH.shape[-1])[:, 0].long()
        probs = torch.zeros(ids_T.numel(), 4)
        probs[torch.arange(ids_T.numel()), ids_T % 4] = 0.7
        probs[torch.arange(ids_T.numel()), (ids_T + 1) % 4] = 0.3
        return probs, probs > 0


class _Model(torch.nn.Module):
    """Tokens ``[b, s]`` -> per-token loss ``[b, s]`` (= the token id), routing on the way."""

    def __init__(self):
        super().__init__()
        self.router = _Router()

    def forward(self, tokens_BS):
        self.router(tokens_BS.t().unsqueeze(-1).float())  # [s, b, 1], as Megatron routes
        return tokens_BS.float()


def test_the_recorder_pairs_each_tokens_loss_with_its_own_top1_width():
    model = _Model()
    # b=2, s=3; token id = its loss; top-1 slot = id % 4 -> canonical 3 - slot
    tokens = torch.tensor([[0, 1, 2], [3, 5, 6]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # token 6 masked out
    rec = WidthLossRecorder([model], [model.router])
    rec.expect([[{"loss_mask": mask}]])
    model(tokens)
    rec.close()
    fig = rec.figures()
    # widths by id: 0 -> slot 0 -> canonical 3 -> 64; 1 -> 32; 2 -> 16; 3 -> 8; 5 -> 32
    assert fig["widths"] == [8, 16, 32, 64]
    assert fig["mean_loss"] == [3.0, 2.0, 3.0, 0.0]  # width 32: tokens 1 and 5
    assert fig["token_share"] == [0.2, 0.2, 0.4, 0.2]
    model(tokens)  # hooks removed: nothing more is counted
    assert rec.figures() == fig


def test_only_layouts_where_ranks_route_their_own_loss_tokens():
    assert supported(1, 1, False) and supported(1, 2, False)
    assert not supported(2, 1, False) and not supported(1, 2, True)


@pytest.mark.usefixtures("mcore_world1")
def test_slot_widths_follow_the_all_size_allocation():
    """A real MoHGE router: slot j's width is the width of the canonical expert it holds."""
    from tests.test_router import cfg_small, make_router

    r = make_router(cfg_small())
    canonical = list(r.routed_layout().expert_widths)
    assert r.slot_widths() == [canonical[int(c)] for c in r.slot_to_canonical]
    assert sorted(r.slot_widths()) == sorted(canonical)
