"""Routing diagnostics in Megatron's own loop (``integration.megatron_lm.routing_log``): the
wrappers of ``finalize_model_grads`` / ``training_log`` / ``evaluate`` driven step by step
with a real MoHGE router, without Megatron's ``train()`` (``test_megatron_pretrain`` runs
them in it)."""

import json
import math
from types import SimpleNamespace

import pytest
import torch

from megatron_mohge.integration.megatron_lm import routing_log as RL

from tests.test_router import cfg_small, make_router

pytestmark = pytest.mark.usefixtures("mcore_world1")


class Writer:
    """What ``routing_log`` calls of Megatron's TensorBoard ``SummaryWriter``."""

    def __init__(self):
        self.scalars = {}

    def add_scalar(self, tag, value, step):
        self.scalars.setdefault(tag, {})[step] = value

    def flush(self):
        pass


# Megatron's call shapes (core_v0.16.1 and core_v0.19: the names the wrappers look up)
def stock_training_log(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale,
                       report_memory_flag, *rest, **kw):
    return report_memory_flag


def stock_finalize_model_grads(model, num_tokens=None, pg_collection=None):
    pass


def _router():
    router = make_router(cfg_small(router=dict(group_gradient="straight_through")))
    torch.manual_seed(5)
    with torch.no_grad():  # spread the zero-mean init so routing is non-trivial
        router.weight.normal_(0, 0.5)
        router.group_weight.normal_(0, 0.5)
    return router


def _args(tmp_path, **kw):
    base = dict(mohge_config="mohge_layer.yaml", log_interval=2, train_iters=4,
                save=str(tmp_path / "ckpt"), tensorboard_dir=None, load=None, iteration=0,
                expert_model_parallel_size=1)
    return SimpleNamespace(**{**base, **kw})


def _train(router, state, args, writer, iters, start=0, on_eval=None):
    """``iters`` steps of Megatron's loop order: forward/backward, finalize, training_log;
    returns each step's gate-gradient norms ``(group, expert)``."""
    finalize = RL.wrap_finalize_model_grads(stock_finalize_model_grads, state)
    log = RL.wrap_training_log(stock_training_log, state, context=lambda: (args, writer))
    norms = []
    router.train()
    for it in range(start + 1, start + iters + 1):
        router.weight.grad = router.group_weight.grad = None
        probs, _ = router(torch.randn(6, 2, 16))
        (probs * torch.randn_like(probs)).sum().backward()
        norms.append((router.group_weight.grad.norm().item(), router.weight.grad.norm().item()))
        finalize([router])
        assert log({}, {}, 1e-3, it, 1.0, False) is False  # Megatron's return value kept
        if on_eval and it == start + 1:
            on_eval()
    return norms


def test_windows_are_logged_written_and_reset(tmp_path, capsys):
    router, state, writer = _router(), RL.RoutingLog(), Writer()
    args = _args(tmp_path)

    def evaluate(forward_step_func, data_iterator, model, process_non_loss_data_func=None,
                 config=None):
        model[0].eval()
        with torch.no_grad():
            model[0](torch.randn(50, 2, 16))
        model[0].train()
        return "eval"

    def held_out():  # evaluation between steps leaves the training window alone
        before = router.counter.window_vector().clone()
        assert RL.wrap_evaluate(evaluate)(None, None, [router]) == "eval"
        assert torch.equal(router.counter.window_vector(), before)

    norms = _train(router, state, args, writer, 4, on_eval=held_out)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "[mohge] routing:" in ln]
    assert [ln.split("|")[0].strip() for ln in lines] == ["[mohge] routing: it 2",
                                                          "[mohge] routing: it 4"]
    assert "same-group" in lines[-1] and "gate grad g/e" in lines[-1]
    assert "group share [" in lines[-1]

    out = json.loads((tmp_path / "ckpt" / RL.DIAGNOSTICS_FILE).read_text())
    assert out["iteration"] == 4 and out["train_iters"] == 4
    assert [h["iteration"] for h in out["history"]] == [2, 4]
    # each window holds its own steps only (counters reset at every log): the mean gate
    # gradient norm over the window's two backward passes
    for (it, h), steps in zip(((2, out["history"][0]), (4, out["history"][1])),
                              (norms[:2], norms[2:])):
        d = h["diagnostics"]
        assert d["group_gate_grad_norm"] == pytest.approx(sum(g for g, _ in steps) / 2, rel=1e-6)
        assert d["expert_gate_grad_norm"] == pytest.approx(sum(e for _, e in steps) / 2,
                                                           rel=1e-6)
        assert writer.scalars["routing/group_gate_grad_norm"][it] == \
            pytest.approx(d["group_gate_grad_norm"])
        assert sum(writer.scalars[f"routing/group_assignment_share/g{g}"][it]
                   for g in range(4)) == pytest.approx(1.0)
    run = out["routing_diagnostics"]
    mean = run["mean"]
    assert 0 <= mean["same_group_fraction"] <= 1 and 0.25 <= mean["ingroup_max_prob"] <= 1
    assert sum(mean["group_assignment_share"]) == pytest.approx(1.0)
    assert sum(mean["group_selection_share"]) == pytest.approx(1.0)
    assert mean["max_group_share"] == pytest.approx(max(mean["group_assignment_share"]))
    assert mean["weight_gap"] > 0 and mean["gate_grad_ratio"] > 0
    # the first and second half of training each have a window (2 and 4)
    assert math.isfinite(mean["expert_load_cv_first_half"])
    assert math.isfinite(mean["expert_load_cv_second_half"])
    # end state: the last quarter's window (4)
    assert mean["same_group_fraction"] == \
        pytest.approx(out["history"][1]["diagnostics"]["same_group_fraction"])


def test_resumed_run_keeps_the_windows_up_to_its_start(tmp_path, capsys):
    router, writer = _router(), Writer()
    args = _args(tmp_path, log_interval=1)
    _train(router, RL.RoutingLog(), args, writer, 4)  # windows 1..4 on file
    # resumed from the checkpoint of iteration 2 in a new process: windows 3, 4 are redone
    resumed = _args(tmp_path, log_interval=1, iteration=2, load=args.save)
    _train(router, RL.RoutingLog(), resumed, writer, 1, start=2)
    out = json.loads((tmp_path / "ckpt" / RL.DIAGNOSTICS_FILE).read_text())
    assert [h["iteration"] for h in out["history"]] == [1, 2, 3]
    # a fresh start into the same folder does not inherit them
    _train(router, RL.RoutingLog(), _args(tmp_path, log_interval=1), writer, 1)
    out = json.loads((tmp_path / "ckpt" / RL.DIAGNOSTICS_FILE).read_text())
    assert [h["iteration"] for h in out["history"]] == [1]


def test_nothing_without_mohge_config_or_before_the_model_is_known(tmp_path, capsys):
    router, writer = _router(), Writer()
    _train(router, RL.RoutingLog(), _args(tmp_path, mohge_config=None), writer, 2)
    state = RL.RoutingLog()  # finalize_model_grads never seen: no collective, no report
    log = RL.wrap_training_log(stock_training_log, state,
                               context=lambda: (_args(tmp_path), writer))
    log({}, {}, 1e-3, 2, 1.0, False)
    assert "[mohge] routing" not in capsys.readouterr().out
    assert not (tmp_path / "ckpt").exists() and not writer.scalars


def test_output_dir_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert RL.output_dir(_args(tmp_path, save="s", tensorboard_dir="t")) == RL.Path("s")
    assert RL.output_dir(_args(tmp_path, save=None, tensorboard_dir="t")) == RL.Path("t")
    assert RL.output_dir(_args(tmp_path, save=None)) == tmp_path


def test_install_wraps_each_seam_once():
    T = SimpleNamespace(finalize_model_grads=stock_finalize_model_grads,
                        training_log=stock_training_log,
                        evaluate=lambda forward_step_func, data_iterator, model: None)
    assert RL.install_routing_log_hooks(T) is True
    wrapped = (T.finalize_model_grads, T.training_log, T.evaluate)
    assert all(getattr(f, RL._MARK) for f in wrapped)
    assert RL.install_routing_log_hooks(T) is False
    assert (T.finalize_model_grads, T.training_log, T.evaluate) == wrapped


def test_megatron_lm_hooks_install_it_on_megatron_training(monkeypatch):
    """``install_megatron_lm_hooks`` (mohge-pretrain, examples/pretrain_mohge.py) wraps the
    installed ``megatron.training.training``'s seams; their parameters are found by name."""
    pytest.importorskip("megatron.training.training",
                        reason="megatron.training is not in the 0.16.1 wheel")
    import megatron.training.training as T

    from megatron_mohge.compat import distopt
    from megatron_mohge.integration.megatron_lm.hooks import install_megatron_lm_hooks
    from megatron_mohge.training import procs

    # process-wide side effects of the install that this test does not need
    monkeypatch.setattr(procs, "install_child_reaper", lambda: None)
    monkeypatch.setattr(distopt, "install_load_fixes", lambda: None)
    for name in ("finalize_model_grads", "training_log", "evaluate",
                 "num_floating_point_operations"):
        monkeypatch.setattr(T, name, getattr(T, name))  # restored afterwards
    if hasattr(T, "get_moe_metrics_tracker"):
        from megatron.core.transformer.moe import moe_logging

        monkeypatch.setattr(moe_logging, "_MOE_METRICS_TRACKER",
                            moe_logging.MoEMetricsTracker())
    install_megatron_lm_hooks()
    for f in (T.finalize_model_grads, T.training_log, T.evaluate):
        assert getattr(f, RL._MARK, False), f
    assert T.finalize_model_grads._mohge_end_of_step
