"""The fine-tuning epochs, MAE's engine_finetune: from the resumed epoch to the last, one pass over the
shuffled training split (Adam, cosine lr, MSE on the grade or cross-entropy) through Accelerate, the
validation split through every process (each sample exactly once), the best epoch by validation QWK (or
accuracy) kept as best.safetensors, a checkpoint after every epoch; at the end the best and the final
weights on every evaluation split. Setting a run up is train/finetune.py's part.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader

from ssit_dist.config import FinetuneConfig
from ssit_dist.data.loading.labelled import LabelledShards
from ssit_dist.data.loading.workers import start_batches, stop_batches
from ssit_dist.dist import mean_over_ranks, on_rank_zero
from ssit_dist.eval.grading_report import write_grading_report
from ssit_dist.eval.over_split import evaluate
from ssit_dist.eval.report import number
from ssit_dist.models.grader import Grader, load_grader, save_grader
from ssit_dist.models.pretrained import EncoderSource
from ssit_dist.stop import StopRequest, StopRequested, StopVote
from ssit_dist.train.checkpoint_accelerate import save_state
from ssit_dist.train.progress import Progress
from ssit_dist.train.report import append_metrics

log = logging.getLogger("ssit_dist.finetune")
PROGRESS_EVERY_S = 30.0  # a line within a long epoch; tests set 0 for one per batch


@dataclass(kw_only=True)
class FinetuneRun:
    """A fine-tuning run, set up: what the epochs and the report need."""

    cfg: FinetuneConfig
    accelerator: Accelerator
    out: Path
    model: torch.nn.Module  # prepared by Accelerate
    plain: Grader  # the same, unwrapped
    optimizer: Any
    scheduler: Any
    loader: DataLoader
    train_set: LabelledShards  # the loader's dataset
    order: torch.Generator  # the loader's shuffling, reseeded every epoch
    eval_sets: dict[str, LabelledShards]
    meta: dict[str, Any]  # written beside best/final weights
    source: EncoderSource
    fingerprint: dict[str, Any]
    stop: StopRequest  # set by a signal or the launcher's end (ssit_dist/stop.py)


@dataclass
class Selection:
    """Model selection so far, carried from epoch to epoch and through a checkpoint: the best validation
    score and its epoch, the per-epoch history, and where training goes on: the first epoch still to
    train, and where a stop saved in the middle of it, the batches of it already trained and the mean
    over the processes of their summed losses."""

    select_by: str
    best_score: float = -math.inf
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    start: int = 1
    start_batch: int = 0
    loss_so_far: float = 0.0

    def restore(self, state: dict[str, Any]) -> None:
        """From a checkpoint's state.json (see `checkpoint_state`)."""
        self.best_score = state["best_score"] if state["best_score"] is not None else -math.inf
        self.best_epoch, self.history, self.start = state["best_epoch"], state["history"], state["epoch"] + 1
        self.start_batch, self.loss_so_far = state.get("batch", 0), state.get("loss_so_far", 0.0)

    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "best_score": self.best_score if math.isfinite(self.best_score) else None,
            "best_epoch": self.best_epoch,
            "history": self.history,
        }

    def score(self, val: dict[str, Any], asked: str) -> float:
        """The validation score to select by; where it is undefined (QWK on a split with one grade), the
        other metric from then on."""
        if val[self.select_by] is None:
            self.select_by = "accuracy" if self.select_by == "qwk" else "qwk"
            log.warning(
                "validation %s is undefined (the split has %s); selecting the best epoch by %s",
                asked,
                "one grade" if asked == "qwk" else "no samples",
                self.select_by,
            )
        return val[self.select_by] if val[self.select_by] is not None else -math.inf


def train_epochs(run: FinetuneRun, selection: Selection) -> None:
    """From `selection.start` to the last epoch: train, validate, keep the best, checkpoint; then the
    final weights."""
    cfg, out, device = run.cfg, run.out, run.accelerator.device
    for epoch in range(selection.start, cfg.epochs + 1):
        started = time.perf_counter()
        rank = run.accelerator.process_index
        set_seed(int(np.random.SeedSequence([cfg.seed, epoch, rank]).generate_state(1)[0]))
        run.order.manual_seed(cfg.seed + epoch)  # the epoch's order, the same on every process
        run.train_set.augment_seed = (cfg.seed, epoch)  # each sample's augmentation: (seed, epoch, index)
        loss_sum, batches = train_one_epoch(run, selection, epoch)
        # The epoch's one read of the device; a NaN on any rank reaches all.
        train_loss = mean_over_ranks(loss_sum.item() / batches if batches else math.nan, device)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"non-finite training loss in epoch {epoch}; lower lr (now {cfg.resolved_lr})")
        val = evaluate(run.plain, run.eval_sets["val"], run.accelerator, cfg.eval_batch)["metrics"]
        score = selection.score(val, cfg.select_by)
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "lr": run.scheduler.get_last_lr()[0],
            "val_accuracy": val["accuracy"],
            "val_qwk": val["qwk"],
            "val_macro_auc": val["macro_auc"],
            "seconds": round(time.perf_counter() - started, 2),
        }
        selection.history.append(row)
        improved = score > selection.best_score
        if improved:
            selection.best_score, selection.best_epoch = score, epoch
        on_rank_zero(
            partial(_end_epoch, run, selection, epoch, row, val, improved), device, f"saving epoch {epoch} under {out}"
        )
    on_rank_zero(
        lambda: save_grader(run.plain, out / "final.safetensors", {**run.meta, "epoch": cfg.epochs}),
        device,
        f"writing {out / 'final.safetensors'}",
    )


def train_one_epoch(run: FinetuneRun, selection: Selection, epoch: int) -> tuple[torch.Tensor, int]:
    """One epoch of fine-tuning through Accelerate (gradient accumulation, clipping, one scheduler step
    per optimizer step), from the batch a stop saved at where this is the epoch it stopped in; the sum of
    the batches' losses, on the device, and the number of batches. Process 0 logs its progress every
    PROGRESS_EVERY_S seconds. Dropout draws from a seed of (seed, epoch, process, batch), so a resumed
    epoch trains exactly as the uninterrupted one. A stop is voted on every batch (StopVote, no device
    read); every process saves after the optimizer step it agreed on and raises StopRequested.

    Nothing here reads the device: the losses add up where they are, so the host can queue the next
    batch while the GPU still computes this one (a `loss.item()` per batch would wait for it)."""
    model, accelerator, optimizer, clip_grad = run.model, run.accelerator, run.optimizer, run.cfg.clip_grad
    model.train()
    if run.cfg.linear:
        run.plain.encoder.eval()  # frozen: no dropout, fixed features
    trainable = [p for p in run.plain.parameters() if p.requires_grad]
    loader, batches, loss_sum = run.loader, 0, torch.zeros((), device=accelerator.device)
    if epoch == selection.start and selection.start_batch:
        batches = selection.start_batch
        loader = accelerator.skip_first_batches(run.loader, batches)
        loss_sum += selection.loss_so_far
    progress = Progress(log, f"epoch {epoch}", "batch", len(run.loader), accelerator.is_main_process, PROGRESS_EVERY_S)
    vote, stopping, process = StopVote(accelerator.device), False, accelerator.process_index
    stream = start_batches(loader)  # this epoch's workers fork from a server that already imported the package
    try:
        for images, grades, _ in stream:
            torch.manual_seed(int(np.random.SeedSequence([run.cfg.seed, epoch, process, batches]).generate_state(1)[0]))
            with accelerator.accumulate(model):
                loss = run.plain.loss(model(images), grades)
                accelerator.backward(loss)
                if accelerator.sync_gradients and clip_grad is not None:
                    accelerator.clip_grad_norm_(trainable, clip_grad)
                optimizer.step()
                if accelerator.sync_gradients:
                    run.scheduler.step()
                optimizer.zero_grad()
            loss_sum += loss.detach().float()
            batches += 1
            progress.update(batches)
            stopping = vote.cast(run.stop.requested) or stopping
            if stopping and accelerator.sync_gradients and batches < len(run.loader):  # never within an accumulation
                _save_in_epoch(run, selection, epoch, batches, loss_sum)
                where = f"epoch {epoch} after batch {batches} of {len(run.loader)}"
                raise StopRequested(f"stopped in {where}; relaunch to resume")
    finally:
        stop_batches(stream)
    return loss_sum, batches


def _save_in_epoch(run: FinetuneRun, selection: Selection, epoch: int, batches: int, loss_sum: torch.Tensor) -> None:
    """Collective: the checkpoint of a stop within `epoch`, after `batches` of its batches."""
    device = run.accelerator.device
    state = {
        "scheduler": run.scheduler.state_dict(),
        **selection.checkpoint_state(),
        "fingerprint": run.fingerprint,
        "loss_so_far": mean_over_ranks(loss_sum.item(), device),  # read once, at the stop
    }

    def save() -> None:
        save_checkpoint(run, epoch - 1, state, batch=batches)

    on_rank_zero(save, device, f"saving epoch {epoch} at batch {batches} under {run.out}")


def _end_epoch(run: FinetuneRun, selection: Selection, epoch: int, row: dict, val: dict, improved: bool) -> None:
    """Rank 0's files of an epoch (every rank hears if they failed): the metrics row, the best weights,
    the checkpoint."""
    out = run.out
    append_metrics(out, row)
    log.info(
        "epoch %d: train loss %.4f, val qwk %s, accuracy %s",
        epoch,
        row["train_loss"],
        number(val["qwk"]),
        number(val["accuracy"]),
    )
    if improved:
        meta = {**run.meta, "epoch": epoch, "val": val, "select_by": selection.select_by}
        save_grader(run.plain, out / "best.safetensors", meta)
    state = {"scheduler": run.scheduler.state_dict(), **selection.checkpoint_state(), "fingerprint": run.fingerprint}
    save_checkpoint(run, epoch, state)


def save_checkpoint(run: FinetuneRun, epoch: int, state: dict[str, Any], batch: int = 0) -> str:
    """Process 0's checkpoint of `epoch` complete epochs (and `batch` batches of the next one)."""
    tag = f"epoch{epoch:04d}" + (f"-batch{batch:06d}" if batch else "")
    model, optimizer = run.plain.state_dict(), run.optimizer.state_dict()
    return save_state(run.out, tag, model, optimizer, {**state, "epoch": epoch, "batch": batch})


def final_report(run: FinetuneRun, selection: Selection) -> dict[str, Any]:
    """The best weights (and, as the reference reports both, the final ones) on every evaluation split;
    rank 0 writes the report files (eval/grading_report.py)."""
    cfg, out, accelerator = run.cfg, run.out, run.accelerator
    best, _ = load_grader(out / "best.safetensors")
    best.to(accelerator.device)
    results = {name: evaluate(best, data, accelerator, cfg.eval_batch, True) for name, data in run.eval_sets.items()}
    final_weights = {
        name: evaluate(run.plain, data, accelerator, cfg.eval_batch)["metrics"] for name, data in run.eval_sets.items()
    }
    result = {
        "best_epoch": selection.best_epoch,
        "select_by": selection.select_by,
        "select_by_asked": cfg.select_by,
        "init": asdict(run.source),
        "linear": cfg.linear,
        "objective": cfg.objective,
        "processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        **{name: r["metrics"] for name, r in results.items()},
        "final": final_weights,
    }
    split = "test" if "test" in results else "val"
    headline = f"{'linear probe' if cfg.linear else 'fine-tuned'} from {cfg.init}, best epoch {selection.best_epoch}"
    on_rank_zero(
        lambda: write_grading_report(
            out, result, split, results[split], run.eval_sets[split], selection.history, headline
        ),
        accelerator.device,
        f"writing the report under {out}",
    )
    return result  # main's shutdown() tears the process group down
