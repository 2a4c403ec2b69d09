import os

import pytest

# Keep single-process tests deterministic and light on the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "2")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-rank or long-running case (run by .ci/run after the default suite)")
    config.addinivalue_line("markers", "gpu: needs CUDA (skipped on machines without a GPU)")
    config.addinivalue_line(
        "markers", "pipeline: a whole bench / export pipeline whose Megatron parts other tests "
        "cover on every line (.ci/run runs it on the current line only, to keep CI short)")


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def mcore_world1():
    """A 1-rank gloo process group with Megatron's parallel state (TP=EP=PP=1).

    Shared by the single-process tests (re-created if a test tore the layout down); tests
    needing another layout run under torchrun.
    """
    import socket

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_mohge.compat import enable_cpu_mode

    enable_cpu_mode()  # no-op (a warning) on CUDA machines; idempotent

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0,
                                world_size=1)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()
    yield


@pytest.fixture(autouse=True)
def _fresh_megatron_globals():
    """Megatron state that lives for the whole process, reset after every test (only where
    megatron was imported):

    * the MoE metrics tracker sizes each entry by the first model that records it; a later
      test with more layers (or an MTP layer) would index past it -> emptied;
    * ``MoEAuxLossAutoScaler.main_loss_backward_scale``: a bare layer backward (router and
      layer tests) creates it 0-d, and Megatron's schedules later ``copy_`` their 1-element
      scale into it ("output with shape [] doesn't match the broadcast shape [1]"), so a
      training test failed when it ran after a layer test -> removed."""
    yield
    import sys

    if "megatron_mohge.compat.mcore" in sys.modules:
        from megatron_mohge.compat import mcore

        tracker = mcore._tracker()
        if tracker is not None:  # megatron-core 0.18+
            tracker.metrics.clear()
        else:
            from megatron.core.transformer.moe.moe_utils import (
                get_moe_layer_wise_logging_tracker,
            )

            get_moe_layer_wise_logging_tracker().clear()
    moe_utils = sys.modules.get("megatron.core.transformer.moe.moe_utils")
    if moe_utils is not None:
        moe_utils.MoEAuxLossAutoScaler.main_loss_backward_scale = None
