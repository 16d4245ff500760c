"""The pretraining loop, MAE's `train_one_epoch` for SSiT under DeepSpeed: from the resumed step to the
end, each optimizer step sets the schedules, runs SSiT's step (train/pretrain_step.py) over the step's micro
batches, agrees across ranks on a non-finite loss or a stop, reports and checkpoints. Setting a
run up (process group, shards, engine, resume) is train/pretrain.py's part.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ssit_dist.config import PretrainConfig
from ssit_dist.data.loading.prefetch import Prefetcher
from ssit_dist.data.loading.sources import SourceError
from ssit_dist.data.loading.stream import PairStream
from ssit_dist.data.loading.workers import start_batches
from ssit_dist.dist import any_rank, max_over_ranks
from ssit_dist.eval.retrieval import retrieval_top1
from ssit_dist.models.encoder_meta import EncoderMeta
from ssit_dist.models.momentum import MomentumNetwork
from ssit_dist.stop import StopRequest, StopRequested, StopVote
from ssit_dist.train import checkpoint_deepspeed, schedule
from ssit_dist.train.checkpoint import latest_tag
from ssit_dist.train.pretrain_step import Views, train_step
from ssit_dist.train.report import Reporter


@dataclass(kw_only=True)
class Run:
    """A pretraining run, set up and (where a checkpoint was) restored: what the loop needs."""

    cfg: PretrainConfig
    engine: Any  # DeepSpeed's engine around the online network
    momentum_net: MomentumNetwork
    stream: PairStream
    loader: torch.utils.data.DataLoader
    run_dir: Path
    device: torch.device
    precision: torch.dtype | None
    accumulation: int
    steps_per_epoch: int
    total_steps: int
    start_step: int
    meta: EncoderMeta
    reporter: Reporter | None  # rank 0 only
    to_device: Callable[[Any], Views]  # loader batch -> the step's tensors on the device (data.augment_on)
    retrieval_pairs: tuple[torch.Tensor, torch.Tensor] | None = None  # rank 0 only, where configured


def train(run: Run, stop: StopRequest) -> None:
    """Train from `run.start_step` to `run.total_steps`. `stop` is set by a signal or the launcher's end;
    the step after any rank has it, every rank saves and raises StopRequested.

    The hot path never waits for the device: each step's losses stay there, and only at a sync point
    (every `log_every` steps, and before a checkpoint, a view retrieval or the end) does the host read
    them, with one collective that tells every rank whether any had a non-finite loss or a failed loader.
    Nothing is reported or saved before that agreement. A stop is voted on every step (StopVote: a tiny
    all-reduce whose outcome the host reads a step later, without waiting for the device)."""
    cfg = run.cfg
    feed: Feed | None = None
    vote = StopVote(run.device)
    try:
        step = run.start_step
        interval = Interval(time.perf_counter())
        last_save = time.monotonic()  # for checkpoint_every_minutes
        while step < run.total_steps:
            feed = _feed_at(run, step, feed)
            schedules = _set_schedules(run, step)
            waits: list[float] = []  # seconds spent waiting for each micro batch
            losses = train_step(
                run.engine,
                run.momentum_net,
                feed.micro_batches(run.accumulation, waits),
                schedules["momentum"],
                cfg.loss.contrastive_weight,
                schedules["saliency_weight"],
                run.precision,
            )
            step += 1
            record = {"step": step, "epoch": round(step / run.steps_per_epoch, 4), **schedules}
            interval.add(
                torch.stack([losses.contrastive, losses.saliency]), record | {"data_wait_s": round(sum(waits), 4)}
            )
            # From the config, not from `retrieval_pairs` (rank 0's alone): every rank must stop at the same
            # sync points, or rank 0's extra collective meets another rank's next step.
            retrieval_due = cfg.retrieval.shards is not None and (
                step % cfg.retrieval.every == 0 or step == run.total_steps
            )
            every = cfg.checkpoint_every
            checkpoint_due = (every is not None and step % every == 0) or step == run.total_steps
            stopping = vote.cast(stop.requested)
            if not (step % cfg.log_every == 0 or checkpoint_due or retrieval_due or stopping):
                continue
            minutes = cfg.checkpoint_every_minutes
            clock_due = minutes is not None and time.monotonic() - last_save >= 60 * minutes
            if _sync_point(run, step, interval, feed, stopping, checkpoint_due or clock_due, retrieval_due):
                last_save = time.monotonic()
            interval = Interval(time.perf_counter())  # checkpoints and retrieval are not the steps' time
    finally:
        if feed is not None:  # now, even while an exception's traceback still holds the loader
            feed.close()
        if run.reporter is not None:
            run.reporter.close()


def _feed_at(run: Run, step: int, feed: Feed | None) -> Feed:
    """The feed for `step`: a new one (the stream set to the epoch and the batch within it) at the start
    and at every epoch boundary, otherwise the current one."""
    epoch, in_epoch = divmod(step, run.steps_per_epoch)
    if feed is not None and in_epoch != 0:
        return feed
    run.stream.set_position(epoch, skip_batches=in_epoch * run.accumulation)
    if feed is not None:
        feed.close()
    batches = Prefetcher(start_batches(run.loader), run.to_device, run.device, run.loader.timeout)
    return Feed(batches, run.device, feed)


def _set_schedules(run: Run, step: int) -> dict[str, float]:
    """The step's learning rate (set on the optimizer), momentum and saliency weight (train/schedule.py)."""
    cfg, progress = run.cfg, step / run.steps_per_epoch
    lr = schedule.learning_rate(progress, cfg.scaled_lr(), cfg.optim.warmup_epochs, cfg.epochs, cfg.optim.min_lr)
    for group in run.engine.optimizer.param_groups:
        group["lr"] = lr
    return {
        "lr": lr,
        "momentum": schedule.momentum(progress, cfg.epochs, cfg.loss.momentum),
        "saliency_weight": schedule.saliency_weight(
            progress, cfg.epochs, cfg.loss.saliency_weight, cfg.loss.saliency_cosine_decay
        ),
    }


def _sync_point(
    run: Run, step: int, interval: Interval, feed: Feed, stopping: bool, save_due: bool, retrieval_due: bool
) -> bool:
    """Collective: one agreement over the ranks (and one read of the device), then the interval's
    records reported, a checkpoint where one is due (by step, by time, or for a stop every rank voted
    for) and the stop itself. A checkpoint by time is agreed on here: clocks differ between hosts, and
    every rank must save at the same step. Returns whether a checkpoint was saved."""
    records, diverged, save_due = interval.agree(feed.failure is not None, save_due, run.device)
    if feed.failure is not None:
        raise feed.failure
    _raise_if_diverged(diverged, records, run.run_dir)
    if run.reporter is not None:
        elapsed = (time.perf_counter() - interval.started) / len(records)
        for record in records:
            record["pairs_per_s"] = round(run.cfg.global_batch / elapsed, 2)
            record["step_s"] = round(elapsed, 4)
            record["peak_mem_mb"] = round(_peak_memory_mb(run.device), 1)
        if retrieval_due:
            records[-1]["view_retrieval"] = _view_retrieval(run)
        for record in records:
            run.reporter.step(record)
    if save_due or stopping:
        save(run, step)
    if stopping and step < run.total_steps:  # a stop at the last step is the end
        raise StopRequested(f"stopped at step {step}; relaunch to resume")
    return save_due or stopping


class Interval:
    """The steps since the last sync point: their losses on the device, the rest on the host."""

    def __init__(self, started: float):
        self.started = started
        self.losses: list[torch.Tensor] = []  # per step: (contrastive, saliency), on the device
        self.records: list[dict[str, Any]] = []

    def add(self, losses: torch.Tensor, record: dict[str, Any]) -> None:
        self.losses.append(losses)
        self.records.append(record)

    def agree(self, loader_failed: bool, save: bool, device: torch.device) -> tuple[list[dict[str, Any]], bool, bool]:
        """Collective. The interval's records with their losses, whether any rank had a non-finite loss,
        and whether any wants a checkpoint now. Raises SourceError when another rank's loader failed (this
        rank's own failure is the caller's to raise)."""
        losses = torch.stack(self.losses)  # (steps, 2)
        flags = torch.tensor([0, int(loader_failed), int(save)], dtype=torch.float32, device=device)
        flags[0] = (~torch.isfinite(losses)).any()
        flags = max_over_ranks(flags)
        values = torch.cat([flags, losses.flatten().float()]).tolist()  # the interval's only host read
        diverged, failed, saving = (bool(v) for v in values[:3])
        if failed and not loader_failed:
            raise SourceError("the data loader failed on another rank; see its log")
        for i, record in enumerate(self.records):
            record["contrastive_loss"], record["saliency_loss"] = values[3 + 2 * i], values[4 + 2 * i]
        return self.records, diverged, saving


def _raise_if_diverged(diverged: bool, records: list[dict[str, Any]], run_dir: Path) -> None:
    """A non-finite loss on any rank in the interval: stop before anything is reported or saved."""
    if not diverged:
        return
    bad = [r for r in records if not _finite((r["contrastive_loss"], r["saliency_loss"]))]
    where = (
        f"at step {bad[0]['step']} (contrastive {bad[0]['contrastive_loss']}, saliency {bad[0]['saliency_loss']})"
        if bad
        else f"on another rank between steps {records[0]['step']} and {records[-1]['step']}"
    )
    tag = latest_tag(run_dir)
    raise FloatingPointError(f"non-finite loss {where}; the last good checkpoint is {tag or 'none'} in {run_dir}")


class Feed:
    """Micro batches on the device, one ahead (data/loading/prefetch.py), without a collective per batch.

    A rank whose loader fails (a starved source, a dead worker) must still join every collective of the
    steps up to the next sync point, or the others wait forever: it keeps the failure, trains on its last
    good batch until then, and the sync point stops every rank before anything is saved. Only the very
    first batch of a run has no batch to fall back on; there every rank agrees on the spot."""

    def __init__(self, batches: Prefetcher, device: torch.device, previous: Feed | None = None):
        self.batches, self.device = batches, device
        self.fallback: Views | None = previous.fallback if previous is not None else None
        self.failure: Exception | None = previous.failure if previous is not None else None

    def close(self) -> None:
        """Stop prefetching and shut the loader's workers down."""
        self.batches.close()

    def micro_batches(self, count: int, waits: list[float]) -> Iterator[Views]:
        for _ in range(count):
            waited = time.perf_counter()
            if self.failure is None:
                try:
                    batch = next(self.batches)
                except Exception as e:  # reported at the next sync point, on every rank
                    self.failure = e
            waits.append(time.perf_counter() - waited)
            if self.fallback is None and any_rank(self.failure is not None, self.device):
                raise self.failure or SourceError("the data loader failed on another rank; see its log")
            if self.failure is None:
                self.fallback = batch  # type: ignore[assignment]
            yield self.fallback  # type: ignore[misc]


def _view_retrieval(run: Run) -> float:
    """On rank 0, by the momentum encoder: a full fp32 copy on every rank whatever the ZeRO stage, so
    no other rank has to take part (the online encoder's forward is collective under ZeRO-3)."""
    assert run.retrieval_pairs is not None
    encoder, training = run.momentum_net.encoder, run.momentum_net.encoder.training
    encoder.eval()  # no stochastic depth or dropout: the same weights give the same number
    try:
        return retrieval_top1(lambda x: encoder.forward_features(x.to(run.device))[:, 0], *run.retrieval_pairs)
    finally:
        encoder.train(training)


def save(run: Run, step: int) -> str:
    """Collective: a checkpoint of the engine, the fp32 momentum network, the step, config and RNG."""
    run.momentum_net.materialize()  # the exact fp32 average, where each rank held a partition of it
    client = {"step": step, "config": asdict(run.cfg), "torch_rng": torch.get_rng_state()}
    meta = run.meta.with_provenance(step=step)
    momentum = run.momentum_net.state_dict()
    keep = run.cfg.keep_checkpoints
    return checkpoint_deepspeed.save(run.engine, run.run_dir, step, client, meta, keep, run.device, momentum)


def _finite(losses: tuple[float, float]) -> bool:
    return all(math.isfinite(v) for v in losses)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
