"""``mohge-pretrain``: Megatron's own ``pretrain()`` (the wheel's ``megatron.training``) on CPU.

Real jobs: ``torchrun`` starts the console script's module on gloo ranks; the assertions read
Megatron's own iteration log. Skipped where ``megatron.training`` is absent (the 0.16.1
wheel), where the CLI's one-line message is checked instead.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests._launch import REPO, _free_port

CONFIGS = REPO / "examples" / "configs"


def _has_megatron_training() -> bool:
    from megatron_mohge.compat.versions import megatron_training_available

    return megatron_training_available()


needs_training = pytest.mark.skipif(
    not _has_megatron_training(),
    reason="megatron.training is not in this megatron-core wheel (0.16.1); mohge-pretrain "
           "needs the 0.19 line (a Megatron-LM checkout uses examples/pretrain_mohge.py)")

#: Small and fast: the test is about the loop, not the model.
TINY = ("model.num_layers=2", "model.seq_length=32", "train.micro_batch_size=4",
        "train.global_batch_size=8", "eval.iters=1", "logging.interval=1",
        "logging.tensorboard=false", "data.default_corpus_bytes=300000")


def pretrain(tmp: Path, config: str, *overrides: str, nproc: int = 2) -> str:
    """Run ``mohge-pretrain`` under torchrun; returns the combined output (raises on failure)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--nnodes=1", "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
           "-m", "megatron_mohge.cli.pretrain", "--config", str(CONFIGS / config), *TINY,
           f"data.cache_dir={tmp / 'data'}", *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               TORCH_CPP_LOG_LEVEL="ERROR",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env,
                          cwd=str(tmp))
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"mohge-pretrain failed (exit {proc.returncode}):\n{out[-12000:]}")
    return out


_ITER = re.compile(r"\] iteration\s+(\d+)/\s*(\d+) \|([^\n]*)")  # ranks may share a line


def iteration_log(out: str) -> dict[int, dict[str, str]]:
    """Megatron's iteration lines: iteration -> {field: printed value}."""
    lines = {}
    for m in _ITER.finditer(out):
        fields = {}
        for part in m.group(3).split("|"):
            if ":" in part:
                key, value = part.rsplit(":", 1)
                fields[key.strip()] = value.strip()
        lines[int(m.group(1))] = fields
    return lines


_ROUTING = re.compile(r"\[mohge\] routing: it (\d+) \|([^\n]*)")


def routing_log(out: str) -> dict[int, str]:
    """The routing-diagnostics lines (``integration.megatron_lm.routing_log``): iteration ->
    the rest of the line."""
    return {int(m.group(1)): m.group(2) for m in _ROUTING.finditer(out)}


def routing_json(folder: Path) -> dict:
    """``routing_diagnostics.json`` of a run, checked for sane figures."""
    import json

    out = json.loads((folder / "routing_diagnostics.json").read_text())
    for d in [out["routing_diagnostics"]["mean"], *out["routing_diagnostics"]["layers"]]:
        assert 0 <= d["same_group_fraction"] <= 1 and 0 < d["ingroup_max_prob"] <= 1, d
        assert sum(d["group_assignment_share"]) == pytest.approx(1.0), d
        assert sum(d["group_selection_share"]) == pytest.approx(1.0), d
        # a mean over windows (and layers) of each one's largest share: at least the largest
        # mean share
        assert 1 >= d["max_group_share"] >= max(d["group_assignment_share"]) - 1e-9, d
        assert d["group_gate_grad_norm"] > 0 and d["expert_gate_grad_norm"] > 0, d
        assert d["expert_load_cv_first_half"] >= 0 and d["expert_load_cv_second_half"] >= 0
    return out


def checkpoint_common(iter_dir: Path) -> dict:
    """The common (not sharded) state of one of Megatron's ``torch_dist`` checkpoints."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_common_state_dict(str(iter_dir))


def megatron_flops_so_far(iter_dir: Path) -> tuple[float, object]:
    """The FLOPs Megatron accumulated up to a checkpoint (``num_floating_point_operations`` of
    every iteration, the function its throughput log divides) and the args it ran with."""
    common = checkpoint_common(iter_dir)
    return float(common["num_floating_point_operations_so_far"]), common["args"]


def expected_mohge_flops(args, iters: int) -> tuple[float, float]:
    """(corrected, stock) FLOPs of ``iters`` global batches: Megatron's own formula with the
    routed experts at our accounting's activated width (``activated_widths``, spread over the
    K experts), and Megatron's uncorrected figure (the widest group's width)."""
    import copy

    import megatron.training.training as T

    from megatron_mohge.accounting import activated_widths
    from megatron_mohge.integration.megatron_lm.args import mohge_config_from_args

    stock = getattr(T.num_floating_point_operations, "__mohge_stock__",
                    T.num_floating_point_operations)
    effective = copy.copy(args)
    effective.moe_ffn_hidden_size = \
        activated_widths(mohge_config_from_args(args)).uniform / args.moe_router_topk
    return (iters * stock(effective, args.global_batch_size),
            iters * stock(args, args.global_batch_size))


@needs_training
def test_dataset_and_megatron_flags_agree_on_the_attention_mask(tmp_path, monkeypatch):
    """Regression (TP2+SP hung before its first iteration): ``get_batch_on_this_tp_rank``
    broadcasts an attention mask from TP rank 0 exactly when Megatron's parsed
    ``create_attention_mask_in_dataloader`` says so; the samples our dataset provider yields
    must agree, or the other TP ranks wait for a broadcast that never comes."""
    from megatron.training.arguments import parse_args

    from megatron_mohge.data import prepare_data
    from megatron_mohge.integration.megatron_lm.args import add_mohge_args
    from megatron_mohge.integration.megatron_training import pretrain_argv
    from megatron_mohge.integration.megatron_training.steps import dataset_provider
    from megatron_mohge.config.run import RunConfig

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(10):
        (docs / f"d{i}.txt").write_text(f"document {i} " + "text of some length " * 40)
    prefix = str(tmp_path / "ds")
    prepare_data([docs], prefix, "byte", progress=False)
    run = RunConfig.from_yaml(CONFIGS / "cpu_tiny_mohge.yaml", [
        *TINY, f"data.path=[{prefix}]", "data.split=80,20,0", f"data.cache_dir={tmp_path}",
        f"output_dir={tmp_path / 'out'}"])
    train, _, _ = dataset_provider(run)([4, 1, 0])
    monkeypatch.setattr(sys, "argv", ["mohge-pretrain", *pretrain_argv(run, cpu=True)])
    args = parse_args(add_mohge_args)
    assert ("attention_mask" in train[0]) is args.create_attention_mask_in_dataloader is False


@needs_training
def test_pretrain_ep2_distributed_optimizer_resumes_exactly(tmp_path):
    """2 gloo ranks, EP=2, Megatron's distributed optimizer, 20 iterations with Megatron's
    checkpoints every 10; a second run loads iteration 10 and reaches 20 with the same
    figures. The log reduces the MoHGE router losses; the stock-MoE config runs the same way."""
    common = ("parallel.expert_parallel=2", "parallel.use_distributed_optimizer=true",
              "train.iters=20", "checkpoint.interval=10")
    full = pretrain(tmp_path, "cpu_tiny_mohge.yaml", *common, f"output_dir={tmp_path / 'a'}")
    ckpt = tmp_path / "a" / "checkpoints"
    assert (ckpt / "iter_0000010").is_dir() and (ckpt / "iter_0000020").is_dir()
    a = iteration_log(full)
    assert sorted(a) == list(range(1, 21))
    for name in ("lm loss", "mohge_group_loss", "mohge_group_balance_loss", "grad norm"):
        assert name in a[20], (name, a[20])
    # the group loss starts at losses.group_start_fraction of train.iters (progress reached
    # the routers through the forward step), the intra-group loss from the start
    assert float(a[1]["mohge_group_loss"]) == 0.0 and float(a[20]["mohge_group_loss"]) > 0
    assert float(a[1]["mohge_group_balance_loss"]) > 0
    assert "use_distributed_optimizer ....................... True" in full
    # routing diagnostics every log interval: one line (the last rank), and the run's figures
    # in --save, reduced over both data-parallel ranks
    diag = routing_log(full)
    assert sorted(diag) == list(range(1, 21)) and "same-group" in diag[20], diag.get(20)
    assert "gate grad g/e" in diag[20] and "group share [" in diag[20]
    a_diag = routing_json(ckpt)
    assert [h["iteration"] for h in a_diag["history"]] == list(range(1, 21))
    assert a_diag["train_iters"] == 20 and len(a_diag["routing_diagnostics"]["layers"]) == 2
    assert "validation loss at iteration 20" in full
    # Megatron counted MoHGE's FLOPs (the hooks' correction applied in this loop, not only
    # in a Megatron-LM checkout): what its log divides by time is our accounting's figure
    flops10, args = megatron_flops_so_far(ckpt / "iter_0000010")
    corrected, stock = expected_mohge_flops(args, 10)
    assert flops10 == pytest.approx(corrected, rel=1e-9) and corrected < 0.9 * stock
    # the optimizer state in model space (flags.OPTIM_FULLY_RESHARDABLE): loads in any layout
    sharding = checkpoint_common(ckpt / "iter_0000010")["content_metadata"]
    assert sharding["distrib_optim_sharding_type"] == "fully_reshardable"

    resumed = pretrain(tmp_path, "cpu_tiny_mohge.yaml", *common, f"output_dir={tmp_path / 'b'}",
                       f"checkpoint.load={ckpt}", "launch.extra_args=[--ckpt-step, '10']")
    b = iteration_log(resumed)
    assert sorted(b) == list(range(11, 21))
    for it in range(11, 21):
        # Megatron prints the first iteration after a (re)start on its own and then averages
        # it into the next line's figures (iteration 12): that line's losses are not one
        # iteration's. Everything else must be equal to the printed digits.
        keys = ["grad norm", "learning rate", "consumed samples"]
        if it != 12:
            keys += ["lm loss", "mohge_group_loss", "mohge_group_balance_loss"]
        assert {k: b[it][k] for k in keys} == {k: a[it][k] for k in keys}, it
    assert megatron_flops_so_far(tmp_path / "b" / "checkpoints" / "iter_0000020")[0] == \
        megatron_flops_so_far(ckpt / "iter_0000020")[0]  # the resumed count continues
    # the resumed run's diagnostics: windows 1-10 from the loaded run's file, 11-20 its own,
    # the same routing as the uninterrupted run
    assert sorted(routing_log(resumed)) == list(range(11, 21))
    b_diag = routing_json(tmp_path / "b" / "checkpoints")
    assert [h["iteration"] for h in b_diag["history"]] == list(range(1, 21))
    assert b_diag["history"][:10] == a_diag["history"][:10]
    for key in ("same_group_fraction", "weight_gap", "max_group_share"):
        assert b_diag["routing_diagnostics"]["mean"][key] == \
            pytest.approx(a_diag["routing_diagnostics"]["mean"][key], rel=1e-5), key

    stock = pretrain(tmp_path, "cpu_tiny_moe.yaml", "parallel.expert_parallel=2",
                     "parallel.use_distributed_optimizer=true", "train.iters=4",
                     f"output_dir={tmp_path / 'moe'}", "checkpoint.enabled=false")
    s = iteration_log(stock)
    assert sorted(s) == [1, 2, 3, 4] and "load_balancing_loss" in s[4]
    assert "mohge_group_loss" not in s[4]
    assert not routing_log(stock)  # Megatron's own routers: no MoHGE counters


@pytest.mark.slow
@needs_training
@pytest.mark.parametrize("layout", [
    ("parallel.tensor_parallel=2", "parallel.expert_parallel=2",  # TP2 + SP
     "parallel.expert_tensor_parallel=1"),
    ("parallel.pipeline_parallel=2", "parallel.expert_parallel=1"),
], ids=["tp2-sp", "pp2"])
def test_pretrain_tp_sp_and_pp(tmp_path, layout):
    out = pretrain(tmp_path, "cpu_tiny_mohge.yaml", *layout, "train.iters=3",
                   "checkpoint.enabled=false", f"output_dir={tmp_path / 'r'}")
    log = iteration_log(out)
    assert sorted(log) == [1, 2, 3]
    assert "mohge_group_balance_loss" in log[3] and float(log[3]["lm loss"]) > 0
    # routing diagnostics gathered over the stages (PP2: one MoE layer each); no --save:
    # routing_diagnostics.json in the working directory
    assert sorted(routing_log(out)) == [1, 2, 3]
    assert len(routing_json(tmp_path)["routing_diagnostics"]["layers"]) == 2
    if "parallel.tensor_parallel=2" in layout:
        assert "sequence_parallel ............................... True" in out


@pytest.mark.slow
@needs_training
def test_pretrain_resumes_in_another_layout(tmp_path):
    """The distributed optimizer's checkpoint is fully reshardable (flags.OPTIM_FULLY_
    RESHARDABLE): saved at EP2 x DP2, resumed at TP2 + SP x EP2 with the same figures (the
    first resumed loss to TP's reduction order; the grad norms to the printed digits)."""
    common = ("parallel.use_distributed_optimizer=true", "train.iters=4", "checkpoint.interval=2")
    full = iteration_log(pretrain(tmp_path, "cpu_tiny_mohge.yaml", *common,
                                  "parallel.expert_parallel=2", f"output_dir={tmp_path / 'a'}"))
    # the same padded vocabulary (make_vocab_size_divisible_by x TP = 128): the same output layer
    resumed = iteration_log(pretrain(
        tmp_path, "cpu_tiny_mohge.yaml", *common, "parallel.tensor_parallel=2",
        "parallel.expert_parallel=2", "parallel.expert_tensor_parallel=1",
        "model.make_vocab_size_divisible_by=64", f"output_dir={tmp_path / 'b'}",
        f"checkpoint.load={tmp_path / 'a' / 'checkpoints'}",
        "launch.extra_args=[--ckpt-step, '2']"))
    assert sorted(resumed) == [3, 4]
    assert float(resumed[3]["lm loss"]) == pytest.approx(float(full[3]["lm loss"]), rel=1e-5)
    assert [resumed[i]["grad norm"] for i in (3, 4)] == [full[i]["grad norm"] for i in (3, 4)]


@pytest.mark.skipif(_has_megatron_training(), reason="megatron.training is installed here")
def test_pretrain_without_megatron_training_says_so_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "megatron_mohge.cli.pretrain", "--config",
                           str(CONFIGS / "cpu_tiny_mohge.yaml")], capture_output=True,
                          text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "megatron.training" in lines[0]
    assert "examples/pretrain_mohge.py" in lines[0] and "Megatron-LM checkout" in lines[0]


@pytest.mark.slow
@needs_training
def test_pretrain_checkpoint_writers_die_with_a_killed_rank(tmp_path):
    """Issue 25.2: after ``kill -9`` of a mohge-pretrain rank, the checkpoint writers' results
    Manager (``spawn_main``) and multiprocessing's resource tracker lived on, adopted by PID 1,
    holding the job's log open: nothing installed the child reaper on this path."""
    from tests.test_run_safety import kill_at_first_checkpoint

    out = tmp_path / "kill"
    cmd = [sys.executable, "-m", "megatron_mohge.cli.pretrain", "--config",
           str(CONFIGS / "cpu_tiny_mohge.yaml"), *TINY, f"data.cache_dir={tmp_path / 'data'}",
           f"output_dir={out}", "train.iters=400", "train.lr_decay_iters=400",
           "checkpoint.interval=1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            cwd=str(tmp_path))
    kill_at_first_checkpoint(proc, out / "checkpoints" / "latest_checkpointed_iteration.txt",
                             600)
