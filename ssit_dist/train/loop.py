"""The pretraining loop, MAE's `train_one_epoch` for SSiT under DeepSpeed: from the resumed step to the
end, each optimizer step sets the schedules, runs SSiT's step (train/step.py) over the step's micro
batches, agrees across ranks on a non-finite loss or a stop signal, reports and checkpoints. Setting a
run up (process group, shards, engine, resume) is train/pretrain.py's part.
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ssit_dist.config import PretrainConfig
from ssit_dist.data.sources import SourceError
from ssit_dist.data.stream import PairStream
from ssit_dist.data.workers import start_batches
from ssit_dist.dist import any_rank, any_ranks
from ssit_dist.eval.retrieval import retrieval_top1
from ssit_dist.models.encoder_meta import EncoderMeta
from ssit_dist.models.momentum import MomentumNetwork
from ssit_dist.train import checkpoint, schedule
from ssit_dist.train.report import Reporter
from ssit_dist.train.step import Batch, train_step


class StopRequested(Exception):
    """SIGTERM / SIGUSR1 arrived: a checkpoint was saved and the run stops cleanly."""


@dataclass
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
    retrieval_pairs: tuple[torch.Tensor, torch.Tensor] | None = None  # rank 0 only, where configured


def train(run: Run, stop: dict[str, bool]) -> None:
    """Train from `run.start_step` to `run.total_steps`. `stop["requested"]` is set by the signal
    handlers; once any rank has it, every rank saves and raises StopRequested after the step."""
    cfg, engine = run.cfg, run.engine
    batches = None
    try:
        step = run.start_step
        while step < run.total_steps:
            epoch, in_epoch = divmod(step, run.steps_per_epoch)
            if batches is None or in_epoch == 0:
                run.stream.set_position(epoch, skip_batches=in_epoch * run.accumulation)
                batches = start_batches(run.loader)
            progress = step / run.steps_per_epoch
            lr = schedule.learning_rate(
                progress, cfg.scaled_lr(), cfg.optim.warmup_epochs, cfg.epochs, cfg.optim.min_lr
            )
            for group in engine.optimizer.param_groups:
                group["lr"] = lr
            momentum = schedule.momentum(progress, cfg.epochs, cfg.loss.momentum)
            saliency_weight = schedule.saliency_weight(
                progress, cfg.epochs, cfg.loss.saliency_weight, cfg.loss.saliency_cosine_decay
            )

            started = time.perf_counter()
            waits: list[float] = []  # seconds spent waiting for each micro batch
            micro_batches = _micro_batches(batches, run.accumulation, run.device, waits)
            losses = train_step(
                engine,
                run.momentum_net,
                micro_batches,
                momentum,
                cfg.loss.contrastive_weight,
                saliency_weight,
                run.precision,
            )
            contrastive, saliency = losses.contrastive.item(), losses.saliency.item()
            # Before anything is reported or saved: a non-finite loss anywhere stops every rank, and a
            # signal on any rank stops all of them after this step's checkpoint.
            diverged, stopping = any_ranks([not _finite((contrastive, saliency)), stop["requested"]], run.device)
            _raise_if(diverged, (contrastive, saliency), step, run.run_dir)
            step += 1
            elapsed = time.perf_counter() - started

            if run.reporter is not None:
                record: dict[str, Any] = {
                    "step": step,
                    "epoch": round(step / run.steps_per_epoch, 4),
                    "contrastive_loss": contrastive,
                    "saliency_loss": saliency,
                    "lr": lr,
                    "momentum": momentum,
                    "saliency_weight": saliency_weight,
                    "pairs_per_s": round(cfg.global_batch / elapsed, 2),
                    "step_s": round(elapsed, 4),
                    "data_wait_s": round(sum(waits), 4),
                    "peak_mem_mb": round(_peak_memory_mb(run.device), 1),
                }
                if run.retrieval_pairs is not None and (step % cfg.retrieval.every == 0 or step == run.total_steps):
                    record["view_retrieval"] = _view_retrieval(run)
                run.reporter.step(record)
            if step % cfg.checkpoint_every == 0 or step == run.total_steps or stopping:
                save(run, step)
            if stopping:
                raise StopRequested(f"stopped by signal after step {step}; relaunch to resume")
    finally:
        batches = None  # shuts the loader workers down now (they ignore the exit-time SIGTERM)
        if run.reporter is not None:
            run.reporter.close()


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
    client = {
        "step": step,
        "momentum": run.momentum_net.state_dict(),
        "config": asdict(run.cfg),
        "torch_rng": torch.get_rng_state(),
    }
    meta = run.meta.with_provenance(step=step)
    return checkpoint.save(run.engine, run.run_dir, step, client, meta, run.cfg.keep_checkpoints, run.device)


def _micro_batches(batches: Iterator, count: int, device: torch.device, waits: list[float]) -> Iterator[Batch]:
    """The next `count` batches, on `device`, each agreed on by every rank before it is used: a rank
    whose loader failed would never join the forward's collectives, so all ranks stop together."""
    for _ in range(count):
        waited = time.perf_counter()
        try:
            batch, failure = next(batches), None
        except Exception as e:  # a starved source, a dead worker
            batch, failure = None, e
        waits.append(time.perf_counter() - waited)
        if any_rank(failure is not None, device):
            raise failure or SourceError("the data loader failed on another rank; see its log")
        yield tuple(t.to(device, non_blocking=True) for t in batch)


def _finite(losses: tuple[float, float]) -> bool:
    return all(math.isfinite(v) for v in losses)


def _raise_if(diverged: bool, losses: tuple[float, float], step: int, run_dir: Path) -> None:
    if not diverged:
        return
    where = f"contrastive {losses[0]}, saliency {losses[1]}" if not _finite(losses) else "on another rank"
    tag = checkpoint.latest_tag(run_dir)
    raise FloatingPointError(
        f"non-finite loss at step {step + 1} ({where}); the last good checkpoint is {tag or 'none'} in {run_dir}"
    )


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
