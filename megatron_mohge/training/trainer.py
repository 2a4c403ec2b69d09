"""``mohge-train``: a training loop on megatron.core alone, driven by a :class:`RunConfig`.

Megatron's pieces throughout: process groups, ``GPTModel`` (+ DDP / ``Float16Module``),
``get_megatron_optimizer`` + ``OptimizerParamScheduler``, the pipeline schedules,
``GPTDataset`` via ``BlendedMegatronDatasetBuilder`` and ``dist_checkpointing``. On CPU it
runs on gloo with :func:`megatron_mohge.compat.enable_cpu_mode`; on GPUs on NCCL.

Checkpoints are written to ``<save>/iter_XXXXXXX.tmp`` and renamed when complete, and
``latest_checkpointed_iteration.txt`` is replaced atomically after that, so Ctrl-C or a
crash never leaves a half-written "latest" checkpoint. Every step reseeds the RNGs from
``(seed, iteration)`` and the data order is a function of the iteration, so a resumed run
reproduces the uninterrupted one bit for bit (also on another EP size, up to reduction
order). Run safety (one writer per folder, numerical health, damaged or mismatched
checkpoints, stalled ranks, orphaned writer processes): ``lock``, ``health``, ``checkpoint``,
``resume`` and ``procs`` next to this module; the reported figures: ``run_figures``; the text
and TensorBoard log: ``run_log``.

Shape suffixes (``_TE``, ``_TG``, ...): see :mod:`megatron_mohge.routing`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_mohge.config import ConfigError
from megatron_mohge.metrics import (
    reset_routing_counts,
    restore_routing_counts,
    snapshot_routing_counts,
)
from megatron_mohge.config.run import RunConfig
from megatron_mohge.training import checkpoint as ckpt_lib
from megatron_mohge.training import diagnostics
from megatron_mohge.training import run_figures
from megatron_mohge.training import health as health_lib
from megatron_mohge.training import mcore_plumbing as M
from megatron_mohge.training import model_builder as model_lib
from megatron_mohge.training import procs
from megatron_mohge.training import resume as resume_lib
from megatron_mohge.training import run_log


@dataclass
class EvalResult:
    """One evaluation: the token-mean held-out loss, the loss of each held-out global batch,
    and the routing counts of the evaluation (a ``snapshot_routing_counts`` list)."""

    loss: float
    batch_losses: list
    routing_counts: list
    bytes_per_token: Optional[float] = None  # UTF-8 bytes per loss token (bits per byte)
    loss_by_width: Optional[dict] = None  # width_loss.loss_by_width_figures (final eval)


@dataclass
class TrainState:
    iteration: int = 0  # optimizer steps done
    history: list = field(default_factory=list)  # one dict per log interval
    evals: list = field(default_factory=list)  # {"iteration", "loss"}


class Trainer:
    """Build everything from ``run`` (collective: every rank constructs one)."""

    def __init__(self, run: RunConfig, *, log=print):
        self.run, self.log = run, log
        world = M.init_distributed(timeout_s=run.parallel.collective_timeout_s)
        self.rank = M.rank()
        self.locks = resume_lib.take_locks(run, self.rank, log)
        self.dp = run.check_world_size(world)
        p = run.parallel
        M.init_layout(p.tensor_parallel, p.expert_parallel, p.pipeline_parallel,
                      run.expert_tensor_parallel, seed=run.train.seed,
                      timeout_s=p.collective_timeout_s)
        self.heartbeat = procs.Heartbeat.start()
        self._setup_data()
        self._setup_health()
        self.model, self.tc = model_lib.build_model(run, self.vocab_size)
        self.optimizer, self.scheduler = model_lib.build_optimizer_and_scheduler(run, self.model)
        self.counts = model_lib.measured_param_counts(self.model)
        self.state = TrainState()
        self.writer = None
        if run.logging.tensorboard and self.rank == 0:
            self.writer = run_log.tensorboard_writer(run.out_dir / "tensorboard", run.name)

    # ------------------------------------------------------------------ run safety
    def release_locks(self) -> None:
        resume_lib.release_locks(getattr(self, "locks", []))

    def _setup_health(self) -> None:
        t, h = self.run.train, self.run.health
        hint = (f"Lower train.lr (now {t.lr:g})"
                + (" or enable gradient clipping (train.clip_grad is 0)" if not t.clip_grad else "")
                + "; re-running resumes from the latest checkpoint, so change the config first.")
        self.health = health_lib.HealthMonitor(
            spike_factor=h.loss_spike_factor, spike_window=h.loss_spike_window,
            vocab_size=self.tokenizer.vocab_size, hint=hint,
            log=self.log if self.rank == 0 else (lambda *_: None))
        self._resumed_from: Optional[Path] = None

    def _set_phase(self, phase: str) -> None:
        """What this rank is doing, for the heartbeat (named when a collective times out)."""
        self.phase = phase
        if self.heartbeat is not None:
            self.heartbeat.phase = phase

    def describe_timeout(self, exc: BaseException) -> str:
        return procs.timeout_message(exc, self.heartbeat, self.rank, getattr(self, "phase", "?"),
                                     self.run.parallel.collective_timeout_s)

    # ------------------------------------------------------------------ data
    def _setup_data(self) -> None:
        from megatron_mohge.data import build_gpt_datasets, ensure_default_dataset, load_tokenizer

        run = self.run
        self.tokenizer = load_tokenizer(run.data.tokenizer)
        prefixes = list(run.data.path)
        if not prefixes:  # the embedded default corpus: Python stdlib sources
            prefixes = [ensure_default_dataset(run.data.cache_dir, self.tokenizer,
                                               max_bytes=run.data.default_corpus_bytes)]
        self.vocab_size = run.padded_vocab_size(self.tokenizer.vocab_size)
        t = run.train
        self.train_ds, self.valid_ds = build_gpt_datasets(
            prefixes, self.tokenizer, seq_length=run.model.seq_length, seed=t.seed,
            split=run.data.split, train_samples=t.iters * t.global_batch_size,
            valid_samples=max(run.eval.iters, run.eval.final_batches) * t.global_batch_size,
            cache_dir=run.data.cache_dir, valid_seed=run.data.valid_seed)

    def _batches(self, dataset, iteration: int) -> list[dict]:
        from megatron.core import parallel_state as ps

        from megatron_mohge.data import get_micro_batches

        t = self.run.train
        mbs = get_micro_batches(dataset, iteration=iteration, global_batch_size=t.global_batch_size,
                                micro_batch_size=t.micro_batch_size,
                                dp_rank=ps.get_data_parallel_rank(), dp_size=self.dp)
        dev = M.device()
        return [{k: v.to(dev) for k, v in mb.items()} for mb in mbs]

    # ------------------------------------------------------------------ steps
    def _reseed(self, iteration: int) -> None:
        """Same RNG streams whether the run was resumed or not (router noise, dropout)."""
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        seed = self.run.train.seed + 7919 * (iteration + 1)
        torch.manual_seed(seed)
        model_parallel_cuda_manual_seed(seed, force_reset_rng=True)

    def step(self) -> dict:
        from megatron_mohge.routing.base import set_training_progress

        it = self.state.iteration
        self._reseed(it)
        set_training_progress(M.model_chunks(self.model), it, self.run.train.iters)
        for chunk in M.model_chunks(self.model):
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        loss = M.forward_backward(self.model, self._batches(self.train_ds, it))
        self.health.check_loss(loss, it + 1)  # before the update: weights stay finite
        ok, grad_norm, _ = self.optimizer.step()
        self.health.check_grad_norm(grad_norm, ok, it + 1)
        self.scheduler.step(increment=1)
        self.state.iteration += 1
        return dict(loss=loss, grad_norm=float(grad_norm) if grad_norm is not None else None,
                    skipped=not ok, lr=self.optimizer.param_groups[0]["lr"])

    def evaluate(self, num_batches: Optional[int] = None, by_width: bool = False) -> EvalResult:
        """Token-mean LM loss over the first ``num_batches`` (default ``eval.iters``) fixed
        held-out global batches, with their per-batch losses and routing counts (kept apart
        from the training counts); ``by_width``: also the loss by chosen expert width
        (:mod:`.width_loss`, where the layout allows)."""
        n = num_batches or self.run.eval.iters
        batches = [self._batches(self.valid_ds, i) for i in range(n)]
        # keep the training-routing counts of the current log window out of the evaluation
        chunks = M.model_chunks(self.model)
        saved = snapshot_routing_counts(chunks)
        reset_routing_counts(chunks)
        recorder = self._width_recorder(batches) if by_width else None
        try:
            losses = [M.eval_loss(self.model, b) for b in batches]
        finally:
            if recorder is not None:
                recorder.close()
        eval_counts = snapshot_routing_counts(chunks)
        restore_routing_counts(saved)
        by_width_figures = None
        if recorder is not None:
            from megatron.core import parallel_state as ps

            by_width_figures = recorder.figures(ps.get_data_parallel_group())
        # equal token counts per batch: the mean of the batch losses is the token mean
        return EvalResult(sum(losses) / len(losses), losses, eval_counts,
                          self._bytes_per_token(batches), by_width_figures)

    def _width_recorder(self, batches: list):
        """A :class:`width_loss.WidthLossRecorder` for ``batches``, or None (no MoE layers,
        or a layout where ranks do not route the tokens they compute the loss of)."""
        from megatron_mohge.metrics import routers
        from megatron_mohge.training import width_loss

        chunks = M.model_chunks(self.model)
        p = self.run.parallel
        if not routers(chunks) or not width_loss.supported(
                p.pipeline_parallel, p.tensor_parallel, self.run.sequence_parallel):
            return None
        recorder = width_loss.WidthLossRecorder(chunks, routers(chunks))
        recorder.expect(batches)
        return recorder

    def _bytes_per_token(self, batches: list) -> float:
        """UTF-8 bytes per loss token of the held-out batches (all DP ranks)."""
        import torch
        import torch.distributed as dist
        from megatron.core import parallel_state as ps

        from megatron_mohge.data.token_bytes import token_byte_lengths

        if getattr(self, "_token_bytes", None) is None:
            self._token_bytes = token_byte_lengths(self.tokenizer, self.vocab_size)
        sums = torch.zeros(2, dtype=torch.float64)
        for mbs in batches:
            for mb in mbs:
                mask = mb["loss_mask"].double().cpu()
                sums[0] += (self._token_bytes[mb["labels"].cpu()] * mask).sum()
                sums[1] += mask.sum()
        sums = sums.to(M.device())
        dist.all_reduce(sums, group=ps.get_data_parallel_group(with_context_parallel=True))
        return float(sums[0] / sums[1])

    # ------------------------------------------------------------------ metrics
    def routing(self) -> list[dict]:
        """Per-MoE-layer routing figures since the last reset (:func:`run_figures.routing`)."""
        return run_figures.routing(M.model_chunks(self.model), self.run.parallel.expert_parallel)

    def aux_losses(self, steps: int) -> dict:
        """Mean per MoE layer and micro-batch of each aux loss since the last call."""
        t = self.run.train
        return run_figures.aux_losses(steps,
                                      t.global_batch_size // (t.micro_batch_size * self.dp),
                                      max(1, sum(self.run.moe_layer_pattern)))

    # ------------------------------------------------------------------ checkpoints
    def _checkpoint_state(self, is_loading: bool) -> dict:
        model_sd = M.sharded_state_dict(self.model)
        return {"model": model_sd,
                "optimizer": ckpt_lib.optimizer_sharded_state_dict(self.optimizer, model_sd,
                                                                   is_loading=is_loading),
                "opt_param_scheduler": self.scheduler.state_dict(),
                "iteration": self.state.iteration,
                "train_state": {"history": self.state.history, "evals": self.state.evals}}

    def save(self) -> Path:
        self._set_phase(f"checkpoint save at iteration {self.state.iteration}")
        procs.install_child_reaper()  # before dist_checkpointing starts its writer processes
        path = ckpt_lib.save(self._checkpoint_state(False), self.run.save_dir,
                             self.state.iteration, fully_parallel=self.run.checkpoint.fully_parallel,
                             files={ckpt_lib.RUN_FILE: self.run.to_yaml()})
        if self.rank == 0:
            protect = (self._resumed_from,) if self._resumed_from else ()
            for gone in ckpt_lib.rotate(self.run.save_dir, self.run.checkpoint.keep_last, protect):
                self.log(f"checkpoint.keep_last={self.run.checkpoint.keep_last}: removed {gone}")
        return path

    def load(self, root: Path) -> bool:
        """Resume from ``root``'s latest complete checkpoint; False if there is none."""
        ckpt = resume_lib.resolve_checkpoint(self.run, self.rank, root, self.log)
        if ckpt is None:
            return False
        state = resume_lib.load_checked(lambda: self._checkpoint_state(True), ckpt, self.rank,
                                        fully_parallel=self.run.checkpoint.fully_parallel)
        self._resumed_from = ckpt
        M.load_model_state(self.model, state["model"])
        ckpt_lib.restore_optimizer(self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["opt_param_scheduler"])
        self.state.iteration = int(state["iteration"])
        self.state.history = list(state["train_state"]["history"])
        self.state.evals = list(state["train_state"]["evals"])
        return True

    # ------------------------------------------------------------------ loop
    def train(self) -> dict:
        run, t = self.run, self.run.train
        load_dir = Path(run.checkpoint.load) if run.checkpoint.load else run.save_dir
        if run.checkpoint.load and not (load_dir / ckpt_lib.TRACKER_FILE).is_file() \
                and not ckpt_lib.iteration_dirs(load_dir):
            raise ConfigError(f"checkpoint.load: no checkpoint in {load_dir} (missing "
                              f"{ckpt_lib.TRACKER_FILE}); point it at a save directory or set "
                              "it to null")
        resume_lib.check_save_dir_free(run, load_dir)
        resumed = self.load(load_dir)
        start = self.state.iteration
        if resumed and self.rank == 0:
            self.log(f"resumed from {load_dir} at iteration {start}")
        tokens_per_step = t.global_batch_size * run.model.seq_length
        bar = None
        if run.logging.progress_bar and self.rank == 0 and start < t.iters:
            from tqdm import tqdm

            bar = tqdm(total=t.iters, initial=start, desc=run.name, unit="it", leave=False)
        window, w_loss, w_t0 = 0, 0.0, time.perf_counter()
        timed_steps, timed_s = 0, 0.0
        reset_routing_counts(M.model_chunks(self.model))
        self.aux_losses(1)  # start the aux-loss window empty
        for it in range(start, t.iters):
            procs.raise_if_stop_requested()  # a SIGTERM whose interrupt was swallowed
            self._set_phase(f"step {it + 1}")
            t0 = time.perf_counter()
            out = self.step()
            dt = time.perf_counter() - t0
            if it - start >= 2:  # the first steps pay one-time costs (lazy init, allocation)
                timed_steps, timed_s = timed_steps + 1, timed_s + dt
            window, w_loss = window + 1, w_loss + out["loss"]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss']:.3f}")
            last = self.state.iteration == t.iters
            if self.state.iteration % run.logging.interval == 0 or last:
                self._log_interval(window, w_loss, time.perf_counter() - w_t0, tokens_per_step,
                                   out)
                window, w_loss, w_t0 = 0, 0.0, time.perf_counter()
            if run.eval.interval and self.state.iteration % run.eval.interval == 0 and not last:
                self._log_eval(self.evaluate().loss)
            ck = run.checkpoint
            if ck.enabled and ck.interval and self.state.iteration % ck.interval == 0 and not last:
                self.save()
        if bar is not None:
            bar.close()
        final_eval = self.evaluate(run.eval.final_batches, by_width=True)
        self._log_eval(final_eval.loss)
        if run.checkpoint.enabled and (self.state.iteration > start or not resumed):
            self.save()
        return self._summary(final_eval, tokens_per_step * timed_steps / timed_s
                             if timed_s else None)

    def _log_interval(self, steps, loss_sum, seconds, tokens_per_step, last) -> None:
        it = self.state.iteration
        aux = self.aux_losses(steps)
        layers = self.routing()
        reset_routing_counts(M.model_chunks(self.model))
        share = run_figures.mean_share(layers)
        width = (sum(l["mean_chosen_width"] for l in layers) / len(layers)) if layers else None
        rec = dict(iteration=it, loss=loss_sum / steps, lr=last["lr"], grad_norm=last["grad_norm"],
                   tokens_per_s=steps * tokens_per_step / seconds, aux=aux, group_share=share,
                   mean_chosen_width=width, **run_figures.balance_figures(layers),
                   diagnostics=diagnostics.window_record(layers) if layers else None)
        # rank 0's record on every rank: checkpoints require identical common state
        box = [rec]
        dist.broadcast_object_list(box, src=0)
        rec = box[0]
        self.state.history.append(rec)
        if self.rank == 0:
            run_log.log_interval(rec, share, width, self.run.name, self.log, self.writer)

    def _log_eval(self, loss: float) -> None:
        if not math.isfinite(loss):  # before it is logged, saved or published
            raise health_lib.TrainingDiverged(
                f"non-finite held-out loss ({loss}) at iteration {self.state.iteration}: "
                f"stopped before saving. {self.health.hint}", self.state.iteration)
        self.state.evals.append(dict(iteration=self.state.iteration, loss=loss))
        if self.rank == 0:
            run_log.log_eval(loss, self.state.iteration, self.run.name, self.log, self.writer)

    def _summary(self, final: EvalResult, tokens_per_s: Optional[float]) -> dict:
        """Figures of the finished run (routing measured over the final evaluation)."""
        restore_routing_counts(final.routing_counts)  # held-out batches, eval mode
        summary = run_figures.run_summary(self.run, self.state, self.counts, self.routing(),
                                      final.loss, final.batch_losses, tokens_per_s)
        from megatron_mohge.data.token_bytes import bits_per_byte

        # loss (nats / token) over bytes per token, end-of-document predictions included
        summary["heldout_bits_per_byte"] = bits_per_byte(final.loss, final.bytes_per_token)
        if final.loss_by_width is not None:  # do easy tokens go to narrow experts?
            summary["heldout_loss_by_width"] = final.loss_by_width
        if self.rank == 0:
            out = self.run.out_dir
            out.mkdir(parents=True, exist_ok=True)
            ckpt_lib.atomic_write(out / "summary.json", health_lib.dumps(summary, indent=1))
            if self.writer is not None:
                self.writer.close()
        return summary

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop()
        M.destroy_layout()
        self.release_locks()
