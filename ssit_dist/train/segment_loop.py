"""The segmentation steps, MAE's engine for `ssit-dist segment`: from the resumed step to the last, random
augmented crops through the encoder and its per-pixel head (binary cross-entropy plus soft Dice, Adam,
warmup-cosine), a stop voted on every step; every `eval_every` steps the whole validation photographs
segmented by a sliding window, the best weights by mean Dice kept, a checkpoint written; at the end the
best weights on the validation and test photographs, report.json and its pictures. Setting a run up is
train/segment.py's part.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, Subset

from ssit_dist import atomic
from ssit_dist.config import SegmentConfig
from ssit_dist.data.loading.segmentation import (
    SegmentationCrops,
    SegmentationSet,
    normalise,
    read_sample,
    resize_sample,
)
from ssit_dist.data.loading.workers import ignore_preemption, worker_options
from ssit_dist.dist import mean_over_ranks, on_rank_zero
from ssit_dist.eval.report import curves_png, number
from ssit_dist.eval.seg_metrics import PixelCounts, constant_dice
from ssit_dist.stop import StopRequest, StopRequested, StopVote
from ssit_dist.train.checkpoint_accelerate import save_state
from ssit_dist.train.report import append_metrics, write_report

log = logging.getLogger("ssit_dist.segment")


@dataclass(kw_only=True)
class SegmentRun:
    cfg: SegmentConfig
    accelerator: Accelerator
    data: SegmentationSet
    model: Any  # Segmenter, wrapped by Accelerate
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LambdaLR
    mean: list[float]
    std: list[float]
    encoder: dict[str, Any]  # where the encoder came from
    fingerprint: dict[str, Any]
    stop: StopRequest  # set by a signal or the launcher's end (ssit_dist/stop.py)
    step: int = 0
    pending_loss: float = 0.0  # the training losses summed since the last validation, kept by a stop
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)  # {"step", "dice"} of the kept weights

    @property
    def out(self) -> Path:
        return Path(self.cfg.run_dir)


def train(run: SegmentRun) -> None:
    """Steps from run.step to cfg.iterations, validating (and checkpointing) every eval_every steps. A stop
    is voted on every step (StopVote, no device read): every process checkpoints that step and stops."""
    cfg, accelerator = run.cfg, run.accelerator
    crops = SegmentationCrops(
        run.data.splits["train"],
        cfg.img_size,
        cfg.resize,
        run.mean,
        run.std,
        cfg.seed,
        cfg.iterations * cfg.global_batch,
    )
    mine = Subset(
        crops, range(run.step * cfg.global_batch + accelerator.process_index, len(crops), accelerator.num_processes)
    )
    micro = cfg.global_batch // accelerator.num_processes
    loader = DataLoader(mine, batch_size=micro, **worker_options(cfg.workers, ignore_preemption))
    losses = torch.full((), run.pending_loss, device=accelerator.device)
    vote = StopVote(accelerator.device)
    run.model.train()
    for x, y in loader:
        x, y = x.to(accelerator.device), y.to(accelerator.device)
        with accelerator.autocast():
            logits = run.model(x)
        loss = pixel_loss(logits.float(), y)
        accelerator.backward(loss)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
        losses += loss.detach()
        run.step += 1
        if run.step % cfg.eval_every == 0 or run.step == cfg.iterations:
            since = cfg.eval_every if run.step % cfg.eval_every == 0 else run.step % cfg.eval_every
            validate(run, mean_over_ranks(float(losses) / since, accelerator.device))  # read at validations only
            losses.zero_()
            run.model.train()
        if vote.cast(run.stop.requested) and run.step < cfg.iterations:
            run.pending_loss = mean_over_ranks(float(losses), accelerator.device)  # validation takes the mean too
            save_checkpoint(run)
            raise StopRequested(f"stopped at step {run.step}; relaunch to resume")


def pixel_loss(logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy per pixel plus soft Dice per class (1 - Dice over the batch's pixels)."""
    bce = F.binary_cross_entropy_with_logits(logits, truth)
    p = torch.sigmoid(logits)
    dims = (0, 2, 3)
    dice = (2 * (p * truth).sum(dims) + 1) / (p.sum(dims) + truth.sum(dims) + 1)
    return bce + (1 - dice).mean()


def validate(run: SegmentRun, train_loss: float) -> None:
    """Whole validation photographs; the best weights kept by mean Dice; the checkpoint written."""
    metrics = evaluate(run, "val")
    dice = float(np.nanmean([m["dice"] for m in metrics["classes"].values()]))
    row = {"step": run.step, "train_loss": round(train_loss, 6), "val_dice": round(dice, 6)}
    run.history.append(row)
    log.info("step %d/%d loss %.4f val Dice %.4f", run.step, run.cfg.iterations, train_loss, dice)
    better = not run.best or dice > run.best["dice"]
    if better:
        run.best = {"step": run.step, "dice": dice}
    run.pending_loss = 0.0
    save_checkpoint(run, row, better)


def save_checkpoint(run: SegmentRun, row: dict[str, Any] | None = None, better: bool = False) -> None:
    """Process 0's files of a validation (its metrics `row`, where `better` the best weights) and the
    checkpoint of the step, last: a kill before it leaves the previous one to resume from."""
    model = run.accelerator.unwrap_model(run.model)
    state = {
        "scheduler": run.scheduler.state_dict(),
        **{"step": run.step, "pending_loss": run.pending_loss, "history": run.history, "best": run.best},
        "fingerprint": run.fingerprint,
    }

    def write() -> None:
        if row is not None:
            append_metrics(run.out, row)
        if better:
            atomic.write_with(run.out / "best.pt", lambda tmp: torch.save(model.state_dict(), tmp))
        save_state(run.out, f"step{run.step:08d}", model.state_dict(), run.optimizer.optimizer.state_dict(), state)

    on_rank_zero(write, run.accelerator.device, f"saving step {run.step} under {run.out}")


@torch.no_grad()
def predict(run: SegmentRun, image: np.ndarray) -> torch.Tensor:
    """(classes, H, W) probabilities of a whole photograph: sliding windows over it resized to `resize`,
    overlapping logits averaged, resized back to the photograph's (H, W)."""
    cfg, device = run.cfg, run.accelerator.device
    h, w = image.shape[:2]
    resized, _, _ = resize_sample(image, np.zeros((0, h, w), bool), np.ones((h, w), bool), cfg.resize)
    x = normalise(resized, run.mean, run.std).to(device)
    stride, size = max(cfg.img_size // 2, 1), cfg.img_size
    starts = sorted({*range(0, cfg.resize - size + 1, stride), cfg.resize - size})
    logits = torch.zeros(len(run.data.classes), cfg.resize, cfg.resize, device=device)
    hits = torch.zeros(1, cfg.resize, cfg.resize, device=device)
    windows = [(top, left) for top in starts for left in starts]
    for i in range(0, len(windows), 8):
        batch = torch.stack([x[:, t : t + size, c : c + size] for t, c in windows[i : i + 8]])
        with run.accelerator.autocast():
            out = run.model(batch).float()
        for (t, c), o in zip(windows[i : i + 8], out, strict=True):
            logits[:, t : t + size, c : c + size] += o
            hits[:, t : t + size, c : c + size] += 1
    probabilities = torch.sigmoid(logits / hits)
    return F.interpolate(probabilities[None], size=(h, w), mode="bilinear", align_corners=False)[0]


def evaluate(run: SegmentRun, split: str, keep: int = 0) -> dict[str, Any]:
    """Metrics of a split's whole photographs, each on one process, counts summed over processes; the
    first `keep` (photograph, truth, prediction) of process 0 returned for the overlays."""
    samples = run.data.splits[split]
    counts = PixelCounts(len(run.data.classes), run.cfg.threshold)
    kept: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]] = []
    run.model.eval()
    for i in range(run.accelerator.process_index, len(samples), run.accelerator.num_processes):
        image, masks, fov = read_sample(samples[i])
        probabilities = predict(run, image)
        counts.add(probabilities, torch.from_numpy(masks), torch.from_numpy(fov))
        if len(kept) < keep:
            kept.append((samples[i].name, image, masks, probabilities.cpu().numpy() > run.cfg.threshold))
    summary = counts.merged(run.accelerator.device).summary(run.data.classes)
    for metrics in summary.values():
        metrics["constant_dice"] = constant_dice(int(metrics["foreground_pixels"]), int(metrics["pixels"]))
    return {"photographs": len(samples), "classes": summary, "kept": kept}


def final_report(run: SegmentRun) -> dict[str, Any]:
    """The best weights on val and test; report.json, overlays.png and curves.png in RUN_DIR."""
    if (run.out / "best.pt").is_file():
        best = torch.load(run.out / "best.pt", map_location="cpu", weights_only=True)
        run.accelerator.unwrap_model(run.model).load_state_dict(best)
    results = {s: evaluate(run, s, keep=4) for s in ("val", "test") if s in run.data.splits}
    report: dict[str, Any] = {
        "data": str(run.cfg.data),
        "classes": list(run.data.classes),
        "photographs": {s: len(v) for s, v in run.data.splits.items()},
        "encoder": run.encoder,
        "linear": run.cfg.linear,
        "steps": run.step,
        "best": run.best,
        "processes": run.accelerator.num_processes,
        "mixed_precision": run.cfg.mixed_precision,
        "inference": f"sliding window {run.cfg.img_size} px at stride {run.cfg.img_size // 2} over {run.cfg.resize} px",
        **{s: {k: v for k, v in r.items() if k != "kept"} for s, r in results.items()},
    }

    def write() -> None:
        from ssit_dist.eval.seg_pictures import overlays_png

        write_report(run.out, report)
        shown = results.get("test", results["val"])
        overlays_png(
            run.out / "overlays.png", shown["kept"], f"{Path(run.cfg.data).name}: photograph | truth | prediction"
        )
        series = {k: [(r["step"], r[k]) for r in run.history] for k in ("train_loss", "val_dice")}
        curves_png(run.out / "curves.png", series, "step", f"segmentation of {Path(run.cfg.data).name}")

    on_rank_zero(write, run.accelerator.device, f"writing {run.out / 'report.json'}")
    if run.accelerator.is_main_process:
        print(closing_line(report, run.out), flush=True)
    return report


def closing_line(report: dict[str, Any], out: Path) -> str:
    """The run's last line: the best weights' metrics on the test split (val where there is none), and
    where the files are."""
    split = "test" if "test" in report else "val"
    classes = "; ".join(
        f"{name} Dice {number(m['dice'])} (all-foreground {number(m['constant_dice'])}), AUC-PR {number(m['auc_pr'])}"
        for name, m in report[split]["classes"].items()
    )
    best = report["best"]
    return (
        f"{split} split, {report['photographs'][split]} photographs, weights of step {best.get('step')} "
        f"(val Dice {number(best.get('dice'))}): {classes}. Written to {out}/: report.json, overlays.png, curves.png"
    )
