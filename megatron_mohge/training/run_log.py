"""``mohge-train``'s run log: one text line per log interval and evaluation (rank 0), and the
same values as TensorBoard scalars when ``logging.tensorboard`` is on."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable, Optional

from megatron_mohge.training import diagnostics


def tensorboard_writer(log_dir: Path, run_name: str):
    """A TensorBoard ``SummaryWriter``, or None with a one-line warning when the optional
    ``tensorboard`` package (the ``[train]`` extra) is missing: event files are a nicety,
    the run itself (logs, summary.json, checkpoints) does not need them."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        # print, not warnings.warn: once per run, in the run's own log, whatever the filters
        print(f"[{run_name}] warning: logging.tensorboard is on but the tensorboard package "
              f"is not installed, so no event files are written; pip install "
              f"'megatron-mohge[train]' or set logging.tensorboard=false", file=sys.stderr,
              flush=True)
        return None
    return SummaryWriter(str(log_dir))


def log_interval(rec: dict, share: Optional[list], width: Optional[float], run_name: str,
                 log: Callable, writer) -> None:
    """One log interval's record ``rec`` (loss, lr, throughput, aux losses, balance)."""
    it, aux = rec["iteration"], rec["aux"]
    aux_txt = " ".join(f"{k} {v:.4g}" for k, v in aux.items())
    if rec.get("maxvio_batch") is not None:
        aux_txt += f" | maxvio {rec['maxvio_batch']:.2f}"
        flops = rec.get("rank_flops_by_ep", {}).get("2")
        if flops:
            aux_txt += (" | ep2 rank flops max/mean "
                        f"{flops.get('all_size_max_over_mean', flops['contiguous_max_over_mean']):.2f}")
    share_txt = ("share [" + " ".join(f"{s:.2f}" for s in share) + "]") if share and len(share) > 1 else ""
    width_txt = f"width {width:.1f}" if width is not None else ""
    diag_txt = diagnostics.log_text(rec.get("diagnostics"))
    log(f"[{run_name}] it {it:5d} | loss {rec['loss']:.4f} | lr {rec['lr']:.2e} | "
        f"{rec['tokens_per_s']:,.0f} tok/s | {aux_txt} {share_txt} {width_txt}".rstrip()
        + (f" | {diag_txt}" if diag_txt else ""))
    if writer is None:
        return
    writer.add_scalar("train/loss", rec["loss"], it)
    writer.add_scalar("train/lr", rec["lr"], it)
    writer.add_scalar("train/tokens_per_s", rec["tokens_per_s"], it)
    if rec["grad_norm"] is not None:
        writer.add_scalar("train/grad_norm", rec["grad_norm"], it)
    for k, v in aux.items():
        writer.add_scalar(f"aux/{k}", v, it)
    for g, s in enumerate(share or []):
        writer.add_scalar(f"routing/group_share/g{g}", s, it)
    if width is not None:
        writer.add_scalar("routing/mean_chosen_width", width, it)
    for k in diagnostics.SCALARS:
        v = (rec.get("diagnostics") or {}).get(k)
        if v is not None:
            writer.add_scalar(f"routing/{k}", v, it)
    writer.flush()


def log_eval(loss: float, iteration: int, run_name: str, log: Callable, writer) -> None:
    """One evaluation's held-out loss and perplexity."""
    log(f"[{run_name}] it {iteration:5d} | held-out loss {loss:.4f} "
        f"| ppl {math.exp(min(loss, 50)):.3f}")
    if writer is not None:
        writer.add_scalar("eval/loss", loss, iteration)
        writer.flush()
