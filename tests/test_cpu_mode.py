"""CPU mode: stock Megatron-Core GPT + MoE on CPU / gloo (megatron_mohge.compat.cpu).

Single-process cases run in this process (a 1-rank gloo group); multi-rank cases launch
``tests/workers/cpu_mode_worker.py`` under torchrun, several layouts per launch.
"""

from __future__ import annotations

import logging
import math
import subprocess
import sys
import textwrap

import pytest
import torch

from tests._launch import REPO, WORKERS, run_workers

if str(WORKERS) not in sys.path:  # the worker modules import each other as top-level names
    sys.path.insert(0, str(WORKERS))

STEPS = 6


def _falls(losses, name=""):
    assert all(math.isfinite(x) for x in losses), (name, losses)
    assert losses[-1] < losses[0] - 0.05, (name, losses)


def _close(a, b, tol=1e-5):
    assert len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b)), (a, b)


# --------------------------------------------------------------------------------------
# enable_cpu_mode contract (fresh interpreters: the patches are process-wide)
# --------------------------------------------------------------------------------------

_ENABLE_AFTER_IMPORT = """
import warnings
import torch
import megatron.core.tensor_parallel.mappings as mappings
import megatron.core.tensor_parallel.random as tp_random
from megatron.core.transformer.torch_norm import WrappedTorchNorm
import megatron_mohge.compat as compat
from megatron_mohge.compat import cpu as cpu_mode, versions

original_gather = mappings._gather_along_first_dim
original_norm_new = WrappedTorchNorm.__new__

def untouched():
    return (mappings.torch is torch and tp_random.torch is torch
            and mappings._gather_along_first_dim is original_gather
            and WrappedTorchNorm.__new__ is original_norm_new)

# importing the plugin patches nothing
assert untouched() and not compat.is_cpu_mode_enabled() and compat.cpu_mode_patches() == ()

# untested megatron-core: clear refusal, nothing patched
real_version = versions.mcore_version
versions.mcore_version = lambda: versions.Version("0.17.0")
try:
    compat.enable_cpu_mode()
    raise AssertionError("untested megatron-core was accepted")
except versions.UnsupportedMegatronVersion as exc:
    assert "CPU mode" in str(exc) and "0.17.0" in str(exc), exc
versions.mcore_version = real_version
assert untouched() and not compat.is_cpu_mode_enabled()

# a CUDA machine: warning, False, nothing patched
real_is_available = torch.cuda.is_available
torch.cuda.is_available = lambda: True
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    assert compat.enable_cpu_mode() is False
torch.cuda.is_available = real_is_available
assert any("CUDA is available" in str(w.message) for w in caught), caught
assert untouched() and not compat.is_cpu_mode_enabled()

# enabling patches modules imported before; the second call is a no-op
assert compat.enable_cpu_mode() is True
assert compat.is_cpu_mode_enabled() and not untouched()
patches = compat.cpu_mode_patches()
assert compat.enable_cpu_mode() is False and compat.cpu_mode_patches() == patches
assert mappings._gather_along_first_dim.__mohge_original__ is original_gather  # not re-wrapped

# the proxy: CPU shim for torch.cuda, real torch types everywhere else
proxy = mappings.torch
assert proxy is not torch and proxy.cuda.current_device() == "cpu"
assert not proxy.cuda.is_available() and proxy.Tensor is torch.Tensor
assert proxy.device is torch.device and proxy.nn is torch.nn
assert proxy.zeros(2, device="cuda").device.type == "cpu"
assert proxy.tensor([1.0], device=torch.device("cuda", 0)).device.type == "cpu"
with proxy.cuda.stream(proxy.cuda.Stream()):
    proxy.cuda.current_stream().wait_stream(proxy.cuda.default_stream())
proxy.cuda.synchronize()
assert torch.cuda.is_available() is False  # the real torch.cuda is untouched
print("PATCHES", ",".join(p.name for p in patches))
"""

_ENABLE_BEFORE_IMPORT = """
import sys
from megatron_mohge.compat import enable_cpu_mode
assert not any(m.startswith("megatron.core") for m in sys.modules)
assert enable_cpu_mode() is True
from megatron.core.tensor_parallel import mappings
from megatron.core.transformer.moe import moe_utils, token_dispatcher
assert mappings.torch.cuda.current_device() == "cpu"
assert token_dispatcher.maybe_move_tensor_to_cpu is moe_utils.maybe_move_tensor_to_cpu
assert moe_utils.te_general_gemm is None or moe_utils.HAVE_TE
print("OK")
"""

#: Patches every supported megatron-core line needs.
EXPECTED_PATCHES = {
    "device-redirect", "rng-state", "rng-fork-warning", "split-sizes-numpy",
    "torch-norm-sequence-parallel", "clip-grads", "uneven-collectives", "tied-embedding-cuda",
    "dist-ckpt-exchange", "optimizer-type-checks", "recompute-without-te",
    "distopt-state-gather", "distopt-load",
}


def expected_patches() -> set:
    """Plus the line-specific ones, read from the installed release (before any patching)."""
    import megatron.core.tensor_parallel.random as tp_random
    from megatron.core.transformer.moe import moe_utils

    extra = set()
    if not hasattr(moe_utils, "te_general_gemm"):  # NameError without TE before 0.17
        extra.add("te-general-gemm")
    if hasattr(tp_random, "_get_share_storage"):  # 0.19: load_inline C++ extension
        extra.add("share-storage")
    return EXPECTED_PATCHES | extra


def test_enable_cpu_mode_contract():
    """Opt-in, version-gated, CUDA-aware, idempotent; works before or after megatron imports."""
    env = {"PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         env={**__import__("os").environ, **env})
        for code in (_ENABLE_AFTER_IMPORT, _ENABLE_BEFORE_IMPORT)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-4000:]
    line = [l for l in outputs[0].splitlines() if l.startswith("PATCHES ")][0]
    assert set(line.split(" ", 1)[1].split(",")) == expected_patches_fresh()
    assert outputs[1].strip().endswith("OK")


def expected_patches_fresh() -> set:
    """``expected_patches()`` in a fresh interpreter (this one may already be patched)."""
    code = "import tests.test_cpu_mode as t; print(','.join(sorted(t.expected_patches())))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, text=True, check=True,
                         capture_output=True).stdout
    return set(out.strip().splitlines()[-1].split(","))


def test_patch_table_documents_every_patch():
    from megatron_mohge.compat import cpu
    from megatron_mohge.compat.cpu.patches import PATCHES

    names = [p.name for p in PATCHES]
    assert len(names) == len(set(names))
    assert set(names) == EXPECTED_PATCHES | {"te-general-gemm", "share-storage"}
    for name in names:
        assert f"``{name}``" in cpu.__doc__, name
    from megatron_mohge.compat.cpu.patches import TRAINING_PATCHES

    training = [p.name for p in TRAINING_PATCHES]  # enable_cpu_mode(megatron_training=True)
    assert set(training) == {"training-redirect", "one-device-initialize", "allow-no-cuda",
                             "device-arch", "no-jit-warmup"} \
        and not set(training) & set(names)
    for name in training:
        assert f"``{name}``" in cpu.__doc__, name


def test_share_storage_without_compiler():
    """0.19's selective recompute re-points storage with a load_inline C++ extension; CPU
    mode copies instead: the released output (and its views) see the recomputed data."""
    from megatron_mohge.compat.cpu.redirect import _copy_storage

    out = torch.arange(6.0)
    view = out.view(2, 3)
    out.untyped_storage().resize_(0)  # CheckpointWithoutOutput releases the output's storage
    _copy_storage(out, torch.arange(6.0) * 2)
    assert torch.equal(view, (torch.arange(6.0) * 2).view(2, 3))


# --------------------------------------------------------------------------------------
# single process (1-rank gloo group in this process)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_rank():
    import common as C

    C.init_distributed()
    yield C
    C.destroy_layout()


@pytest.fixture(scope="module")
def world1_losses(one_rank, tmp_path_factory):
    import cpu_mode_worker as W

    name = f"steps={STEPS}"
    return W.run_case(name, W.parse_case(name), tmp_path_factory.mktemp("w1"))["losses"]


def test_world1_gpt_moe_trains(world1_losses):
    """Megatron DDP + finalize_model_grads + Megatron Adam with clipping, 1 rank."""
    assert len(world1_losses) == STEPS
    _falls(world1_losses)


def test_selective_recompute_reproduces_world1(world1_losses, tmp_path):
    """Output-discarding recompute of the norms (0.19 re-points storage
    with a C++ extension; CPU mode copies): the losses of the run without recompute."""
    import cpu_mode_worker as W

    name = f"recompute=2,steps={STEPS}"
    _close(W.run_case(name, W.parse_case(name), tmp_path)["losses"], world1_losses)


def test_grad_clipping(one_rank):
    C = one_rank
    C.init_layout()
    config = C.tiny_gpt_config()
    model = C.wrap_ddp(C.build_gpt(config), config)
    clip = 1e-3
    optimizer = C.build_optimizer(model, clip_grad=clip)
    model.zero_grad_buffer()
    optimizer.zero_grad()
    C.forward_backward(model, C.synthetic_batches(0))
    ok, grad_norm, _ = optimizer.step()
    assert ok and grad_norm > 10 * clip
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    clipped = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert abs(float(clipped) - clip) < 1e-3 * clip
    C.destroy_layout()


def test_rng_tracker_forks_cpu_generator(one_rank, caplog):
    """fork(name) swaps the CPU generator: reproducible per state name, no spurious warning."""
    from megatron.core.tensor_parallel import (
        get_cuda_rng_tracker,
        get_expert_parallel_rng_tracker_name,
        model_parallel_cuda_manual_seed,
    )

    C = one_rank
    C.init_layout(seed=123)
    tracker = get_cuda_rng_tracker()
    expected = torch.rand(8, generator=torch.Generator().manual_seed(123 + 2718))
    with caplog.at_level(logging.WARNING, logger="megatron.core.tensor_parallel.random"):
        outside = torch.get_rng_state()
        with tracker.fork():
            first = torch.rand(4)
        assert torch.equal(torch.get_rng_state(), outside)  # the default stream is restored
        with tracker.fork():
            second = torch.rand(4)  # the tracked stream continues
        with tracker.fork(get_expert_parallel_rng_tracker_name()):
            expert = torch.rand(4)
    assert torch.equal(torch.cat([first, second]), expected)
    assert not torch.equal(expert, first)
    assert not [r for r in caplog.records if "RNG" in r.getMessage()]
    model_parallel_cuda_manual_seed(123)
    with tracker.fork():
        assert torch.equal(torch.rand(4), first)
    C.destroy_layout()


# --------------------------------------------------------------------------------------
# multi-rank (torchrun, gloo)
# --------------------------------------------------------------------------------------


def _launch(nproc, *cases):
    args = [a for case in cases for a in ("--case", case)]
    return run_workers("cpu_mode_worker.py", nproc, *args)


def test_tp2_sequence_parallel_reproduces_world1(world1_losses):
    """TP2 + SP (world 2), allgather and alltoall dispatchers: the 1-rank losses."""
    allgather, alltoall = f"tp=2,steps={STEPS}", f"tp=2,dispatcher=alltoall,steps={STEPS}"
    result = _launch(2, allgather, alltoall)
    for case in (allgather, alltoall):
        assert result[case]["layout"]["tp"] == 2
        _close(result[case]["losses"], world1_losses)


W2 = dict(
    ep_allgather=f"ep=2,steps={STEPS}",
    ep_alltoall=f"ep=2,dispatcher=alltoall,steps={STEPS}",
    pp_tied=f"pp=2,tied=1,steps={STEPS}",
    ckpt="ep=2,dispatcher=alltoall,steps=2,ckpt=1,reload=tp2",
    ckpt_fully_parallel="ep=2,steps=2,ckpt=1,fp=1,shared=1",
    dropout="tp=2,dropout=1,steps=3",
    dropout_recompute="tp=2,dropout=1,recompute=1,steps=3",
    bf16_distopt=f"ep=2,dispatcher=alltoall,bf16=1,distopt=1,overlap=1,steps={STEPS}",
    fp16=f"ep=2,dispatcher=alltoall,fp16=1,steps={STEPS}",
)


@pytest.fixture(scope="module")
def world2():
    result = _launch(2, *W2.values())
    return {key: result[case] for key, case in W2.items()}


@pytest.mark.slow
def test_ep2_dispatchers_train_and_agree(world2):
    for key in ("ep_allgather", "ep_alltoall"):
        assert world2[key]["layout"]["ep"] == 2
        _falls(world2[key]["losses"], key)
    _close(world2["ep_allgather"]["losses"], world2["ep_alltoall"]["losses"])


@pytest.mark.slow
def test_pp2_tied_embeddings_train(world2):
    assert world2["pp_tied"]["layout"]["pp"] == 2
    _falls(world2["pp_tied"]["losses"])


@pytest.mark.slow
@pytest.mark.parametrize("key", ["ckpt", "ckpt_fully_parallel"])
def test_ep2_dist_checkpoint_round_trip(world2, key):
    result = world2[key]
    ckpt = result["ckpt"]
    assert ckpt["fresh_model_differed"] and ckpt["params_equal"]
    assert ckpt["eval_loss"] == result["eval_loss"]
    if "reload_eval_loss" in ckpt:  # EP2 checkpoint loaded into a TP2 model
        assert ckpt["reload_layout"]["tp"] == 2 and ckpt["reload_layout"]["ep"] == 1
        assert abs(ckpt["reload_eval_loss"] - result["eval_loss"]) < 1e-5


@pytest.mark.slow
def test_recompute_replays_dropout_masks(world2, world1_losses):
    dropout, recompute = world2["dropout"]["losses"], world2["dropout_recompute"]["losses"]
    _close(dropout, recompute, tol=1e-6)
    assert abs(dropout[0] - world1_losses[0]) > 1e-4  # dropout is active


@pytest.mark.slow
@pytest.mark.parametrize("key", ["bf16_distopt", "fp16"])
def test_half_precision_and_distributed_optimizer_train(world2, key):
    """bf16 + distributed optimizer + overlapped grad reduce; fp16 with loss scaling."""
    losses = world2[key]["losses"]
    _falls(losses, key)
    _close(losses, world2["ep_alltoall"]["losses"], tol=2e-2)


W4 = dict(
    tp_ep=f"tp=2,ep=2,dispatcher=alltoall,steps={STEPS}",
    tp_ep_etp1=f"tp=2,ep=2,etp=1,dispatcher=alltoall,steps={STEPS}",
    tp_pp=f"tp=2,pp=2,steps={STEPS}",
    ep_pp=f"ep=2,pp=2,dispatcher=alltoall,steps={STEPS}",
)


@pytest.fixture(scope="module")
def world4():
    result = _launch(4, *W4.values())
    return {key: result[case] for key, case in W4.items()}


@pytest.mark.slow
def test_world4_layouts_train(world4):
    for key, result in world4.items():
        _falls(result["losses"], key)
    assert world4["tp_ep"]["layout"]["etp"] == 2 and world4["tp_ep_etp1"]["layout"]["etp"] == 1


@pytest.mark.slow
def test_tp2_ep2_matches_ep2(world4, world2):
    """Adding TP2 (expert-TP 2 or 1) to EP2 keeps the EP2 losses (CPU-init weight slices)."""
    for key in ("tp_ep", "tp_ep_etp1"):
        _close(world4[key]["losses"], world2["ep_alltoall"]["losses"])
