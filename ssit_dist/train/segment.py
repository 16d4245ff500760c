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
unbroken run; a changed run is refused naming the changed fields, unless resume=force. Setting a run up
is this file's part; the steps, validation and the report are train/segment_loop.py's.
`python -m ssit_dist.train.segment [field=value]`.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ssit_dist import stop as stop_signals
from ssit_dist.config import ConfigError, SegmentConfig
from ssit_dist.data.loading.segmentation import (
    SegmentationDataError,
    SegmentationSet,
    discover_segmentation,
    read_sample,
)
from ssit_dist.dist import on_rank_zero
from ssit_dist.eval.report import number
from ssit_dist.models.pretrained import load_encoder
from ssit_dist.models.segmenter import Segmenter
from ssit_dist.stop import StopRequest
from ssit_dist.train import run as skeleton
from ssit_dist.train.checkpoint import ResumeError
from ssit_dist.train.checkpoint_accelerate import load_state, plan_resume
from ssit_dist.train.report import metrics_from
from ssit_dist.train.schedule import learning_rate
from ssit_dist.train.segment_loop import SegmentRun, final_report, train

log = logging.getLogger("ssit_dist.segment")
RUN_ONLY = ("run_dir", "workers", "dist_timeout_s", "resume")  # change no number of the run: never fingerprinted


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


def main(argv: list[str] | None = None) -> int:
    """`python -m ssit_dist.train.segment --config FILE field=value`; exit codes as train/run.py says."""
    return skeleton.main(segment, SegmentConfig, "segmentation evaluation with Accelerate", argv)


if __name__ == "__main__":  # python -m / accelerate launch -m
    sys.exit(main())
