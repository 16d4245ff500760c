"""DR grading with Accelerate: fine-tuning (or a linear probe) of a pretrained encoder, model selection
on the validation split, and the test report.

Per epoch: one pass over the shuffled training split with the reference augmentation (Adam, cosine lr,
MSE on the grade or cross-entropy), then the validation split through every process, each sample
exactly once; the epoch with the best validation QWK (or accuracy) is kept as best.safetensors. At the
end the best weights are evaluated on the test split: report.json, predictions.csv, confusion.png,
curves.png, and a summary table. Every epoch ends with a checkpoint; rerunning the same command
resumes after the last complete epoch and, in fp32 on the same process count, ends with the same weights.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed
from torch.utils.data import DataLoader

from ssit_dist import atomic
from ssit_dist.config import ConfigError, FinetuneConfig, save_config
from ssit_dist.data.grading_transforms import eval_transform, train_transform
from ssit_dist.data.index import read_index, sha256_file
from ssit_dist.data.labelled import LabelledShards, SplitSource, check_labels, collate_labelled
from ssit_dist.data.workers import worker_options
from ssit_dist.dist import (
    adopt_srun_environment,
    bind_gpu,
    broadcast_from_zero,
    mean_over_ranks,
    on_rank_zero,
    problems_on_ranks,
)
from ssit_dist.eval import report
from ssit_dist.eval.predict import evaluate
from ssit_dist.models.grader import Grader, load_grader, save_grader
from ssit_dist.models.pretrained import EncoderSource, load_encoder
from ssit_dist.train.checkpoint import latest_tag
from ssit_dist.train.finetune_state import load_state, read_state, save_state, unreadable
from ssit_dist.train.resume import ResumeError, ResumePlan, decide
from ssit_dist.train.schedule import learning_rate

log = logging.getLogger("ssit_dist.finetune")


def splits(cfg: FinetuneConfig) -> dict[str, SplitSource]:
    """train, val and (where there is one) test; val and test default to the train folder's splits."""
    train = SplitSource.parse(cfg.train, "train")
    sources = {
        "train": train,
        "val": SplitSource.parse(cfg.val, "val") if cfg.val else SplitSource(train.folder, "val"),
    }
    if cfg.test:
        sources["test"] = SplitSource.parse(cfg.test, "test")
    elif "test" in read_index(train.folder).splits:
        sources["test"] = SplitSource(train.folder, "test")
    return sources


def micro_batch(cfg: FinetuneConfig, processes: int) -> int:
    if cfg.global_batch % (processes * cfg.grad_accumulation):
        raise ConfigError(
            f"global_batch {cfg.global_batch} is not divisible by {processes} processes x grad_accumulation "
            f"{cfg.grad_accumulation}"
        )
    return cfg.global_batch // (processes * cfg.grad_accumulation)


def grader_meta(cfg: FinetuneConfig, grader: Grader, encoder_source: dict, mean: list[float], std: list[float]) -> dict:
    return {
        "arch": encoder_source["arch"],
        "timm_kwargs": encoder_source["timm_kwargs"],
        "img_size": cfg.img_size,
        "objective": cfg.objective,
        "num_classes": cfg.num_classes,
        "embed_dim": grader.encoder.embed_dim,
        "mean": mean,
        "std": std,
        "init": encoder_source,
    }


def train_one_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    optimizer: Any,
    scheduler: Any,
    accelerator: Accelerator,
    clip_grad: float | None,
    linear: bool,
) -> list[float]:
    """One epoch of fine-tuning through Accelerate (gradient accumulation, clipping, one scheduler step
    per optimizer step); the loss of each batch."""
    plain: Grader = accelerator.unwrap_model(model)
    model.train()
    if linear:
        plain.encoder.eval()  # frozen: no dropout, fixed features
    trainable = [p for p in plain.parameters() if p.requires_grad]
    losses = []
    for images, grades, _ in loader:
        with accelerator.accumulate(model):
            loss = plain.loss(model(images), grades)
            accelerator.backward(loss)
            if accelerator.sync_gradients and clip_grad is not None:
                accelerator.clip_grad_norm_(trainable, clip_grad)
            optimizer.step()
            if accelerator.sync_gradients:
                scheduler.step()
            optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def run_fingerprint(cfg: FinetuneConfig, processes: int, sources: dict[str, SplitSource], indexes: dict) -> dict:
    """What resuming a fine-tuning run depends on: its data, the encoder it started from, the
    optimisation (see train/resume.py)."""
    init = Path(cfg.init)
    fields = (
        "init",
        "arch",
        "timm_kwargs",
        "img_size",
        "objective",
        "num_classes",
        "linear",
        "epochs",
        "grad_accumulation",
        "warmup_epochs",
        "mixed_precision",
        "seed",
        "clip_grad",
    )
    # "batch": the key runs of 0.1 recorded, so that they still resume.
    return {
        **{name: getattr(cfg, name) for name in fields},
        "batch": cfg.global_batch,
        "processes": processes,
        "lr": cfg.resolved_lr,
        "weight_decay": cfg.resolved_weight_decay,
        "init_sha256": sha256_file(init) if init.is_file() else None,
        "data": {
            name: {"source": str(s), "sha256": indexes[name].splits[s.split].sha256} for name, s in sources.items()
        },
    }


def _decide(out: Path, fingerprint: dict, mode: str) -> ResumePlan | ResumeError:
    """Rank 0's resume decision for the fine-tuning run in `out`."""
    try:
        tag = latest_tag(out)
        state = read_state(out, tag) if tag else {}
        return decide(tag, int(state.get("epoch", 0)), state.get("fingerprint"), fingerprint, mode, out, 0)
    except ResumeError as e:
        return e


@dataclass(kw_only=True)
class Tuning:
    """A fine-tuning run, set up: what the epochs and the report need."""

    cfg: FinetuneConfig
    accelerator: Accelerator
    out: Path
    model: torch.nn.Module  # prepared by Accelerate
    plain: Grader  # the same, unwrapped
    optimizer: Any
    scheduler: Any
    loader: DataLoader
    order: torch.Generator  # the loader's shuffling, reseeded every epoch
    eval_sets: dict[str, LabelledShards]
    meta: dict[str, Any]  # written beside best/final weights
    source: EncoderSource
    fingerprint: dict[str, Any]


@dataclass
class Progress:
    """What the epochs carry forward (and a checkpoint restores)."""

    select_by: str
    best_score: float = -math.inf
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    start: int = 1


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Train, select, test; returns the report (also written to RUN_DIR/report.json on the main process)."""
    run = set_up(cfg)
    progress = restore(run)
    train_epochs(run, progress)
    return final_report(run, progress)


def set_up(cfg: FinetuneConfig) -> Tuning:
    """Accelerate, the data (checked before anything trains), the encoder and head, optimizer, schedule."""
    # cpu=True without CUDA: Accelerate then forms a gloo group from the launcher's environment (or
    # srun's). Every collective of ours goes through dist.py on accelerator.device, with the timeout below.
    adopt_srun_environment()
    bind_gpu()
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accumulation,
        cpu=not torch.cuda.is_available(),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.dist_timeout_s))],
    )
    set_seed(cfg.seed)
    sources = splits(cfg)
    indexes = {name: check_labels(s, cfg.num_classes) for name, s in sources.items()}  # fail before training
    micro = micro_batch(cfg, accelerator.num_processes)
    encoder, source = load_encoder(cfg.init, cfg.img_size, cfg.arch, cfg.timm_kwargs, cfg.trust_pickle)
    grader = Grader(encoder, cfg.objective, cfg.num_classes, head_init_std=0.01 if cfg.linear else None)
    if cfg.linear:
        grader.encoder.requires_grad_(False)

    mean, std = indexes["train"].mean, indexes["train"].std
    train_set = LabelledShards(sources["train"], train_transform(cfg.img_size, mean, std), cfg.num_classes)
    eval_sets = {
        name: LabelledShards(s, eval_transform(cfg.img_size, mean, std), cfg.num_classes)
        for name, s in sources.items()
        if name != "train"
    }
    if len(train_set) < micro * accelerator.num_processes:
        raise ConfigError(
            f"train split {sources['train']} has {len(train_set)} samples, fewer than one batch of {cfg.global_batch}"
        )
    log.info(
        "encoder from %s (%s), %d train / %s samples, micro batch %d x %d processes x %d accumulation",
        cfg.init,
        source.kind,
        len(train_set),
        {k: len(v) for k, v in eval_sets.items()},
        micro,
        accelerator.num_processes,
        cfg.grad_accumulation,
    )
    order = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(
        train_set,
        batch_size=micro,
        shuffle=True,
        drop_last=True,
        collate_fn=collate_labelled,
        generator=order,  # the same on every rank: the distributed sampler permutes alike, then splits
        **worker_options(cfg.workers, rank=accelerator.process_index),
    )
    trainable = [p for p in grader.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=cfg.resolved_lr, weight_decay=cfg.resolved_weight_decay)
    model, optimizer, loader = accelerator.prepare(grader, optimizer, loader)
    # Stepped here once per optimizer step (not through Accelerate, which steps it once per process).
    # Accelerate also steps on an epoch's last batch when the accumulation has not filled: ceil.
    steps = cfg.epochs * max(math.ceil(len(loader) / cfg.grad_accumulation), 1)
    warmup = cfg.warmup_epochs / cfg.epochs * steps
    # The one warmup-cosine of the project (train/schedule.py), in optimizer steps, as a factor of lr.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lambda s: learning_rate(s, 1.0, warmup, steps))
    return Tuning(
        cfg=cfg,
        accelerator=accelerator,
        out=Path(cfg.run_dir),
        model=model,
        plain=accelerator.unwrap_model(model),
        optimizer=optimizer,
        scheduler=scheduler,
        loader=loader,
        order=order,
        eval_sets=eval_sets,
        meta=grader_meta(cfg, grader, asdict(source), mean, std),
        source=source,
        fingerprint=run_fingerprint(cfg, accelerator.num_processes, sources, indexes),
    )


def restore(run: Tuning) -> Progress:
    """Rank 0 decides whether to resume (refusing a changed run), every process checks it can read the
    checkpoint, all load it; then the run folder gets the config and the history up to that epoch."""
    cfg, out, device = run.cfg, run.out, run.accelerator.device
    decision = _decide(out, run.fingerprint, cfg.resume) if run.accelerator.is_main_process else None
    plan = broadcast_from_zero(decision, device)
    if isinstance(plan, ResumeError):
        raise plan
    assert isinstance(plan, ResumePlan)
    # Every process checks the checkpoint rank 0 chose, and all agree before any loads it.
    failed = problems_on_ranks("; ".join(unreadable(out, plan.tag) if plan.tag else []) or None, device)
    if failed:
        raise ResumeError(f"checkpoint {plan.tag} in {out} cannot be read by every process:\n  " + "\n  ".join(failed))
    progress = Progress(select_by=cfg.select_by)
    if plan.mode == "force":
        log.warning("resume=force: resuming %s although the run changed:\n  %s", plan.tag, "\n  ".join(plan.changed))
    if plan.tag is not None:
        weights, optimizer_state, state = load_state(out, plan.tag)
        run.plain.load_state_dict(weights)
        run.optimizer.load_state_dict(optimizer_state)
        run.scheduler.load_state_dict(state["scheduler"])
        progress.best_score = state["best_score"] if state["best_score"] is not None else -math.inf
        progress.best_epoch, progress.history, progress.start = (
            state["best_epoch"],
            state["history"],
            state["epoch"] + 1,
        )
        log.info("resumed after epoch %d of %d", state["epoch"], cfg.epochs)

    def start_files() -> None:  # the config, and the history of the epochs the checkpoint holds, nothing after
        save_config(cfg, out)
        atomic.write_text(out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in progress.history))

    on_rank_zero(start_files, device, f"writing {out / 'config.yaml'}")
    return progress


def train_epochs(run: Tuning, progress: Progress) -> None:
    """From `progress.start` to the last epoch: train, validate, keep the best, checkpoint; then the
    final weights."""
    cfg, out, device, plain = run.cfg, run.out, run.accelerator.device, run.plain
    for epoch in range(progress.start, cfg.epochs + 1):
        started = time.perf_counter()
        # Augmentation in this process and dropout: a function of (seed, epoch, rank), other on every rank.
        rank = run.accelerator.process_index
        set_seed(int(np.random.SeedSequence([cfg.seed, epoch, rank]).generate_state(1)[0]))
        run.order.manual_seed(cfg.seed + epoch)
        losses = train_one_epoch(
            run.model, run.loader, run.optimizer, run.scheduler, run.accelerator, cfg.clip_grad, cfg.linear
        )
        train_loss = mean_over_ranks(float(np.mean(losses)), device)  # a NaN on any rank reaches all
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"non-finite training loss in epoch {epoch}; lower lr (now {cfg.resolved_lr})")
        val = evaluate(plain, run.eval_sets["val"], run.accelerator, cfg.eval_batch)["metrics"]
        if val[progress.select_by] is None:  # QWK is undefined on a split with one grade: select by accuracy
            progress.select_by = "accuracy" if progress.select_by == "qwk" else "qwk"
            log.warning(
                "validation %s is undefined (the split has %s); selecting the best epoch by %s",
                cfg.select_by,
                "one grade" if cfg.select_by == "qwk" else "no samples",
                progress.select_by,
            )
        score = val[progress.select_by] if val[progress.select_by] is not None else -math.inf
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "lr": run.scheduler.get_last_lr()[0],
            "val_accuracy": val["accuracy"],
            "val_qwk": val["qwk"],
            "val_macro_auc": val["macro_auc"],
            "seconds": round(time.perf_counter() - started, 2),
        }
        progress.history.append(row)
        improved = score > progress.best_score
        if improved:
            progress.best_score, progress.best_epoch = score, epoch
        on_rank_zero(
            partial(_end_epoch, run, progress, epoch, row, val, improved), device, f"saving epoch {epoch} under {out}"
        )
    on_rank_zero(
        lambda: save_grader(plain, out / "final.safetensors", {**run.meta, "epoch": cfg.epochs}),
        device,
        f"writing {out / 'final.safetensors'}",
    )


def _end_epoch(run: Tuning, progress: Progress, epoch: int, row: dict, val: dict, improved: bool) -> None:
    """Rank 0's files of an epoch (every rank hears if they failed): the metrics row, the best weights,
    the checkpoint."""
    out = run.out
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    log.info(
        "epoch %d: train loss %.4f, val qwk %s, accuracy %s", epoch, row["train_loss"], val["qwk"], val["accuracy"]
    )
    if improved:
        meta = {**run.meta, "epoch": epoch, "val": val, "select_by": progress.select_by}
        save_grader(run.plain, out / "best.safetensors", meta)
    state = {
        "scheduler": run.scheduler.state_dict(),
        "best_score": progress.best_score if math.isfinite(progress.best_score) else None,
        "best_epoch": progress.best_epoch,
        "history": progress.history,
        "fingerprint": run.fingerprint,
    }
    save_state(out, epoch, run.plain.state_dict(), run.optimizer.state_dict(), state)


def final_report(run: Tuning, progress: Progress) -> dict[str, Any]:
    """The best weights (and, as the reference reports both, the final ones) on every evaluation split;
    report.json, predictions.csv, confusion.png, curves.png and a summary table from rank 0."""
    cfg, out, accelerator = run.cfg, run.out, run.accelerator
    best, _ = load_grader(out / "best.safetensors")
    best.to(accelerator.device)
    results = {name: evaluate(best, data, accelerator, cfg.eval_batch) for name, data in run.eval_sets.items()}
    final_weights = {
        name: evaluate(run.plain, data, accelerator, cfg.eval_batch)["metrics"] for name, data in run.eval_sets.items()
    }
    result = {
        "best_epoch": progress.best_epoch,
        "select_by": progress.select_by,
        "select_by_asked": cfg.select_by,
        "init": asdict(run.source),
        "linear": cfg.linear,
        "objective": cfg.objective,
        "processes": accelerator.num_processes,
        "mixed_precision": accelerator.mixed_precision,
        **{name: r["metrics"] for name, r in results.items()},
        "final": final_weights,
    }

    def write_report() -> None:
        split = "test" if "test" in results else "val"
        shown, dataset = results[split], run.eval_sets[split]
        keys = [dataset.keys[i] for i in shown["indices"]]
        report.write_predictions(out / "predictions.csv", keys, shown["truth"], shown["predicted"], shown["scores"])
        matrix = np.array(shown["metrics"]["confusion_matrix"])
        report.confusion_png(
            out / "confusion.png", matrix, f"{out.resolve().name}: {split} split, best epoch {progress.best_epoch}"
        )
        history = progress.history
        report.curves_png(
            out / "curves.png",
            {
                "train loss": [(r["epoch"], r["train_loss"]) for r in history],
                "val qwk": [(r["epoch"], r["val_qwk"]) for r in history],
                "val accuracy": [(r["epoch"], r["val_accuracy"]) for r in history],
            },
            title=f"fine-tuning {out.resolve().name}",
        )
        atomic.write_json(out / "report.json", result)
        report.summary_table(
            f"{'linear probe' if cfg.linear else 'fine-tuned'} from {cfg.init}, best epoch {progress.best_epoch}",
            {name: r["metrics"] for name, r in results.items()},
        )
        report.summary_table(f"final weights (epoch {cfg.epochs})", final_weights)

    on_rank_zero(write_report, accelerator.device, f"writing the report under {out}")
    return result  # main's shutdown() tears the process group down


def main(argv: list[str] | None = None) -> int:
    """Entry point of launch/finetune.py: `--config FILE` and `field=value` overrides; exit codes as
    train/entry.py says."""
    from ssit_dist.train.entry import run_trainer

    return run_trainer(finetune, FinetuneConfig, "DR grading fine-tuning with Accelerate", argv)


if __name__ == "__main__":  # python -m / torchrun -m / deepspeed --module / accelerate launch -m
    sys.exit(main())
