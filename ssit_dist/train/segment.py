"""Segmentation with Accelerate (`ssit-dist segment`): the SSiT paper's evaluation of an encoder on vessels
(DRIVE) and lesions (IDRiD), after the reference's eval_seg.py.

The encoder (an export, a timm folder, a reference checkpoint, or random) gets a per-pixel head
(models/segmenter.py) and trains on random augmented crops (data/loading/segmentation.py) with a per-pixel
binary cross-entropy plus a soft Dice term (the Dice keeps thin, rare structures such as vessels from
collapsing to background), Adam, linear warmup then cosine decay over a fixed number of steps; the
encoder frozen with `linear`. Every `eval_every` steps the whole validation photographs are segmented and
the weights with the best mean Dice kept; at the end those weights segment the test photographs.

Whole photographs are segmented by a sliding window: the photograph resized to `resize`, windows of the
input size at half-window strides, overlapping logits averaged, the probabilities resized back to the
photograph's own size, the metrics (eval/seg_metrics.py) counted there inside its field of view. Each
process takes every world-th photograph; the counts are summed, so every pixel counts once.

Images are normalised with the mean/std of the train photographs. The run's skeleton is fine-tuning's
(train/run.py): a checkpoint at every validation and at a stop (train/checkpoint_accelerate.py:
RUN_DIR/checkpoints/stepNNNNNNNN/, `latest`); a relaunch of the same run continues from it with the same
crops in the same order (each crop is a function of (seed, index)) and ends with the weights of an
unbroken run; a changed run is refused naming the changed fields, unless resume=force.
`python -m ssit_dist.train.segment [field=value]`.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, Subset

from ssit_dist import atomic
from ssit_dist import stop as stop_signals
from ssit_dist.config import ConfigError, SegmentConfig
from ssit_dist.data.loading.segmentation import (
    SegmentationCrops,
    SegmentationDataError,
    SegmentationSet,
    discover_segmentation,
    normalise,
    read_sample,
    resize_sample,
)
from ssit_dist.data.loading.workers import ignore_preemption, worker_options
from ssit_dist.dist import mean_over_ranks, on_rank_zero
from ssit_dist.eval.report import curves_png, number
from ssit_dist.eval.seg_metrics import PixelCounts, constant_dice
from ssit_dist.models.pretrained import load_encoder
from ssit_dist.models.segmenter import Segmenter
from ssit_dist.stop import StopRequest, StopRequested, StopVote
from ssit_dist.train import run as skeleton
from ssit_dist.train.checkpoint import ResumeError
from ssit_dist.train.checkpoint_accelerate import load_state, plan_resume, save_state
from ssit_dist.train.report import append_metrics, metrics_from, write_report
from ssit_dist.train.schedule import learning_rate

log = logging.getLogger("ssit_dist.segment")
RUN_ONLY = ("run_dir", "workers", "dist_timeout_s", "resume")  # change no number of the run: never fingerprinted


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


def segment(cfg: SegmentConfig) -> dict[str, Any]:
    """Train, select by validation Dice, test; returns the report (RUN_DIR/report.json)."""
    run = set_up(cfg, stop_signals.install())
    resume(run)
    train(run)
    return final_report(run)


def set_up(cfg: SegmentConfig, stop: StopRequest) -> SegmentRun:
    """Accelerate, the data (every photograph and mask checked before anything trains), model, Adam."""
    accelerator = skeleton.start_accelerate(cfg.mixed_precision, cfg.dist_timeout_s, cfg.seed)
    if cfg.global_batch % accelerator.num_processes:
        raise ConfigError(f"global_batch = {cfg.global_batch}: not divisible by {accelerator.num_processes} processes")
    try:
        data = discover_segmentation(Path(cfg.data), Path(cfg.splits) if cfg.splits else None)
        mean, std = _train_statistics(data)  # reads (and so checks) every train photograph and mask
        for split in ("val", "test"):
            for sample in data.splits.get(split, []):
                read_sample(sample)
    except SegmentationDataError as e:
        raise ConfigError(str(e)) from None
    encoder, source = load_encoder(cfg.init, cfg.img_size, cfg.arch, cfg.timm_kwargs, cfg.trust_pickle)
    model = Segmenter(encoder, len(data.classes))
    if cfg.linear:
        model.encoder.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    model, optimizer = accelerator.prepare(model, optimizer)
    schedule = lambda s: learning_rate(s, 1.0, cfg.warmup, cfg.iterations)  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, schedule)
    log.info(
        "encoder from %s (%s); classes %s; %s photographs; %d processes",
        cfg.init,
        source.kind,
        data.classes,
        {k: len(v) for k, v in data.splits.items()},
        accelerator.num_processes,
    )
    encoder_info = {"init": cfg.init, "kind": source.kind, "arch": source.arch, "timm_kwargs": source.timm_kwargs}
    return SegmentRun(
        cfg=cfg, accelerator=accelerator, data=data, model=model, optimizer=optimizer, scheduler=scheduler,
        mean=mean, std=std, encoder=encoder_info, stop=stop,
        fingerprint=run_fingerprint(cfg, accelerator.num_processes, data),
    )  # fmt: skip


def _train_statistics(data: SegmentationSet) -> tuple[list[float], list[float]]:
    """Per-channel mean/std in [0, 1] of the train photographs inside their fields of view."""
    total, squares, count = np.zeros(3), np.zeros(3), 0
    for sample in data.splits["train"]:
        image, _, fov = read_sample(sample)
        pixels = image[fov].astype(np.float64) / 255
        total, squares, count = total + pixels.sum(0), squares + (pixels**2).sum(0), count + len(pixels)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean**2, 1e-12))
    return mean.round(6).tolist(), std.round(6).tolist()


def run_fingerprint(cfg: SegmentConfig, processes: int, data: SegmentationSet) -> dict[str, Any]:
    """What a resume depends on: every field of the config but the run-only ones, the process count, the
    data's classes and file names."""
    files = {s: [x.image.name for x in samples] for s, samples in data.splits.items()}
    config = [f.name for f in fields(cfg) if f.name not in RUN_ONLY]
    return skeleton.fingerprint(cfg, config, processes=processes, files=files, classes=data.classes)


def resume(run: SegmentRun) -> None:
    """Every process agrees on the resume plan (train/checkpoint.py) and loads the checkpoint it names."""
    cfg, out, device = run.cfg, run.out, run.accelerator.device
    if (out / "checkpoint.pt").is_file():
        raise ResumeError(
            f"{out / 'checkpoint.pt'} is a checkpoint of an earlier ssit-dist, which this one cannot resume: "
            "finish that run with the version that wrote it, or choose another run_dir"
        )
    plan = skeleton.agree_on_resume(
        cfg, run.fingerprint, lambda: plan_resume(out, run.fingerprint, cfg.resume, device, "step"), device
    )
    on_rank_zero(lambda: metrics_from(out, "step", plan.step), device, f"writing {out / 'metrics.jsonl'}")
    if plan.tag is None:
        return
    weights, optimizer_state, state = load_state(out, plan.tag)
    run.accelerator.unwrap_model(run.model).load_state_dict(weights)
    run.optimizer.optimizer.load_state_dict(optimizer_state)
    run.scheduler.load_state_dict(state["scheduler"])
    run.step, run.history, run.best = state["step"], state["history"], state["best"]
    run.pending_loss = state["pending_loss"]
    dice = number(run.best.get("dice"))
    log.info("resumed at step %d of %d (best val Dice %s)", run.step, cfg.iterations, dice)


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


def main(argv: list[str] | None = None) -> int:
    """`python -m ssit_dist.train.segment --config FILE field=value`; exit codes as train/run.py says."""
    return skeleton.main(segment, SegmentConfig, "segmentation evaluation with Accelerate", argv)


if __name__ == "__main__":  # python -m / accelerate launch -m
    sys.exit(main())
