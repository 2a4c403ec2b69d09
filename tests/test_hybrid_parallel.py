"""HybridModel with MoHGE ``E`` layers across layouts: EP2 trains as one rank does (losses,
loss-free expert biases, logits), and its checkpoint loads at EP1 with the same logits."""

import pytest

from tests._launch import run_workers

LOSS_TOL = 1e-5  # relative; fp32 on CPU, differences only from summation order
LOGITS_TOL = 1e-5  # relative to max |logit|


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    ckpt = tmp_path_factory.mktemp("hybrid")
    one = run_workers("hybrid_worker.py", 1, "--mode", "train", "--ckpt", str(ckpt), "--ep", "1",
                      "--save-init")
    two = run_workers("hybrid_worker.py", 2, "--mode", "train", "--ckpt", str(ckpt), "--ep", "2")
    return ckpt, one, two


def test_ep2_hybrid_trains_like_one_rank(trained):
    _, one, two = trained
    assert (one["layout"]["ep"], two["layout"]["ep"]) == (1, 2)
    assert one["model"] == two["model"] and one["model"] in ("HybridModel", "MambaModel")
    assert two["losses"] == pytest.approx(one["losses"], rel=LOSS_TOL)
    assert one["losses"][-1] < one["losses"][0]
    # loss-free balancing moved the biases, identically at both sizes
    assert len(one["expert_biases"]) == 2 and any(any(b) for b in one["expert_biases"])
    for a, b in zip(one["expert_biases"], two["expert_biases"]):
        assert b == pytest.approx(a, abs=1e-6)


@pytest.mark.slow
def test_hybrid_checkpoint_saved_at_ep2_loads_at_ep1_with_same_logits(trained):
    ckpt, _, _ = trained
    loaded = run_workers("hybrid_worker.py", 1, "--mode", "load", "--ckpt",
                         str(ckpt / "ep2"), "--ep", "1")
    assert loaded["layout"]["ep"] == 1
    assert loaded["logits_max_abs_diff"] <= LOGITS_TOL * loaded["logits_scale"]
