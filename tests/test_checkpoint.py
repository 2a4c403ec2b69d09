"""Dist-checkpoint: MoHGE experts keyed by (group, index) reshard across EP sizes."""

import pytest

from tests._launch import run_workers


@pytest.fixture(scope="module")
def saved_at_ep2(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("mohge-ckpt")
    result = run_workers("checkpoint_worker.py", 2, "--mode", "save", "--ckpt", str(ckpt),
                         "--ep", "2")
    assert result["layout"]["ep"] == 2
    assert result["losses"][-1] < result["losses"][0]  # it really trained
    return ckpt, result


@pytest.mark.parametrize("ep", [1, 4])
def test_save_at_ep2_load_at_other_ep_sizes(saved_at_ep2, ep):
    ckpt, saved = saved_at_ep2
    loaded = run_workers("checkpoint_worker.py", ep, "--mode", "load", "--ckpt", str(ckpt),
                         "--ep", str(ep))
    assert loaded["layout"]["ep"] == ep
    # Same weights: logits agree up to the summation order of the expert combine.
    assert loaded["logits_max_abs_diff"] <= 1e-5 * loaded["logits_scale"]
    assert loaded["heldout_loss"] == pytest.approx(saved["heldout_loss"], rel=1e-6)


@pytest.mark.parametrize("save_backend,load_backend", [("torch", "local"), ("local", "torch")])
def test_checkpoint_moves_between_expert_backends_and_ep_sizes(tmp_path, save_backend,
                                                              load_backend):
    saved = run_workers("checkpoint_worker.py", 2, "--mode", "save", "--ckpt", str(tmp_path),
                        "--ep", "2", "--backend", save_backend)
    loaded = run_workers("checkpoint_worker.py", 1, "--mode", "load", "--ckpt", str(tmp_path),
                         "--ep", "1", "--backend", load_backend)
    assert (saved["backend"], loaded["backend"]) == (save_backend, load_backend)
    assert loaded["logits_max_abs_diff"] <= 1e-5 * loaded["logits_scale"]
    assert loaded["heldout_loss"] == pytest.approx(saved["heldout_loss"], rel=1e-6)
