"""DR grading with Accelerate: setting a fine-tuning (or linear-probe) run up, as MAE's main_finetune
does; the epochs are train/finetune_loop.py's, the checkpoints train/checkpoint_accelerate.py's, the report
files eval/grading_report.py's.

`finetune(cfg)` checks the labelled shards before anything trains, builds the encoder (from an export, a
reference checkpoint, timm weights or random) with its grading head, the loader, Adam and the
warmup-cosine schedule, resumes after the last complete epoch where a checkpoint is (refusing a changed
run), trains with model selection on the validation split, and evaluates the best weights on the test
split. In fp32 on the same process count a resumed run ends with the same weights as an unbroken one.
`python -m ssit_dist.train.finetune --config FILE [field=value]`.
"""

from __future__ import annotations

import logging
import math
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from ssit_dist import stop as stop_signals
from ssit_dist.config import ConfigError, FinetuneConfig
from ssit_dist.data.index import ShardIndex, read_index, sha256_file
from ssit_dist.data.loading.grading_transforms import eval_transform, train_transform
from ssit_dist.data.loading.labelled import LabelledShards, SplitSource, check_labels, collate_labelled
from ssit_dist.data.loading.workers import ignore_preemption, worker_options
from ssit_dist.dist import on_rank_zero
from ssit_dist.models.grader import Grader, regression_cuts
from ssit_dist.models.grader_files import packing_preprocessing
from ssit_dist.models.pretrained import load_encoder
from ssit_dist.stop import StopRequest
from ssit_dist.train import run as skeleton
from ssit_dist.train.checkpoint_accelerate import load_state, plan_resume
from ssit_dist.train.finetune_loop import FinetuneRun, Selection, final_report, train_epochs
from ssit_dist.train.report import metrics_from
from ssit_dist.train.schedule import learning_rate

log = logging.getLogger("ssit_dist.finetune")


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Train, select, test; returns the report (also written to RUN_DIR/report.json on the main process)."""
    run = set_up(cfg, stop_signals.install())
    selection = resume(run)
    train_epochs(run, selection)
    return final_report(run, selection)


def set_up(cfg: FinetuneConfig, stop: StopRequest) -> FinetuneRun:
    """Accelerate, the data (checked before anything trains), the grader, its loader and optimizer."""
    accelerator = skeleton.start_accelerate(cfg.mixed_precision, cfg.dist_timeout_s, cfg.seed, cfg.grad_accumulation)
    sources = splits(cfg)
    indexes = {name: check_labels(s, cfg.num_classes) for name, s in sources.items()}  # fail before training
    micro = micro_batch(cfg, accelerator.num_processes)
    encoder, source = load_encoder(cfg.init, cfg.img_size, cfg.arch, cfg.timm_kwargs, cfg.trust_pickle)
    grader = Grader(encoder, cfg.objective, cfg.num_classes, cfg.pool, head_init_std=0.01 if cfg.linear else None)
    if cfg.linear:
        grader.encoder.requires_grad_(False)
    train_set, eval_sets = open_splits(cfg, sources, indexes["train"])
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
        **worker_options(cfg.workers, ignore_preemption, rank=accelerator.process_index),
    )
    trainable = [p for p in grader.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=cfg.resolved_lr, weight_decay=cfg.resolved_weight_decay)
    model, optimizer, loader = accelerator.prepare(grader, optimizer, loader)
    return FinetuneRun(
        cfg=cfg,
        accelerator=accelerator,
        out=Path(cfg.run_dir),
        model=model,
        plain=accelerator.unwrap_model(model),
        optimizer=optimizer,
        scheduler=warmup_cosine(cfg, optimizer, len(loader)),
        loader=loader,
        train_set=train_set,
        order=order,
        eval_sets=eval_sets,
        meta=grader_meta(cfg, grader, asdict(source), indexes["train"]),
        source=source,
        fingerprint=run_fingerprint(cfg, accelerator.num_processes, sources, indexes),
        stop=stop,
    )


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


def open_splits(
    cfg: FinetuneConfig, sources: dict[str, SplitSource], train_index: ShardIndex
) -> tuple[LabelledShards, dict[str, LabelledShards]]:
    """The training split with the reference augmentation, the others with the evaluation transform; all
    normalised with the training shards' mean and std."""
    mean, std = train_index.mean, train_index.std
    train_set = LabelledShards(sources["train"], train_transform(cfg.img_size, mean, std), cfg.num_classes)
    eval_sets = {
        name: LabelledShards(s, eval_transform(cfg.img_size, mean, std), cfg.num_classes)
        for name, s in sources.items()
        if name != "train"
    }
    return train_set, eval_sets


def micro_batch(cfg: FinetuneConfig, processes: int) -> int:
    if cfg.global_batch % (processes * cfg.grad_accumulation):
        raise ConfigError(
            f"global_batch {cfg.global_batch} is not divisible by {processes} processes x grad_accumulation "
            f"{cfg.grad_accumulation}"
        )
    return cfg.global_batch // (processes * cfg.grad_accumulation)


def warmup_cosine(cfg: FinetuneConfig, optimizer: Any, batches_per_epoch: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The project's one warmup-cosine (train/schedule.py), in optimizer steps, as a factor of lr."""
    # Stepped by the loop once per optimizer step (not through Accelerate, which steps it once per
    # process). Accelerate also steps on an epoch's last batch when the accumulation has not filled: ceil.
    steps = cfg.epochs * max(math.ceil(batches_per_epoch / cfg.grad_accumulation), 1)
    warmup = cfg.warmup_epochs / cfg.epochs * steps
    return torch.optim.lr_scheduler.LambdaLR(optimizer.optimizer, lambda s: learning_rate(s, 1.0, warmup, steps))


def grader_meta(cfg: FinetuneConfig, grader: Grader, encoder_source: dict, train_index: ShardIndex) -> dict:
    """What is written beside the best and final weights: enough to rebuild them, to preprocess a new
    photograph as the training shards were packed and normalised, and to read the outputs as grades
    (models/grader_files.py reads it back)."""
    return {
        "arch": encoder_source["arch"],
        "timm_kwargs": encoder_source["timm_kwargs"],
        "img_size": cfg.img_size,
        "objective": cfg.objective,
        "num_classes": cfg.num_classes,
        "pool": cfg.pool,
        **({"thresholds": list(regression_cuts(cfg.num_classes))} if cfg.objective == "regression" else {}),
        "embed_dim": grader.encoder.embed_dim,
        "mean": train_index.mean,
        "std": train_index.std,
        "preprocessing": packing_preprocessing(train_index, cfg.train),
        "init": encoder_source,
    }


def run_fingerprint(cfg: FinetuneConfig, processes: int, sources: dict[str, SplitSource], indexes: dict) -> dict:
    """What resuming a fine-tuning run depends on: its data, the encoder it started from, the
    optimisation (train/run.py)."""
    init = Path(cfg.init)
    fields = (
        *("init", "arch", "timm_kwargs", "img_size", "objective", "num_classes", "linear", "epochs"),
        *("grad_accumulation", "warmup_epochs", "mixed_precision", "seed", "clip_grad"),
        *(("batch", "global_batch"), ("lr", "resolved_lr"), ("weight_decay", "resolved_weight_decay")),
    )  # "batch": the key runs of 0.1 recorded, so that they still resume
    data = {name: {"source": str(s), "sha256": indexes[name].splits[s.split].sha256} for name, s in sources.items()}
    init_sha256 = sha256_file(init) if init.is_file() else None
    # The pooling joined later: recorded only where it is not the default, so earlier runs still resume.
    pool = {} if cfg.pool == "cls+avg" else {"pool": cfg.pool}
    return skeleton.fingerprint(cfg, fields, processes=processes, init_sha256=init_sha256, data=data, **pool)


def resume(run: FinetuneRun) -> Selection:
    """Every process agrees on the resume plan (train/checkpoint.py) and loads the checkpoint it names;
    the metrics keep the epochs it holds."""
    cfg, out, device = run.cfg, run.out, run.accelerator.device
    plan = skeleton.agree_on_resume(
        cfg, run.fingerprint, lambda: plan_resume(out, run.fingerprint, cfg.resume, device, "epoch"), device
    )
    on_rank_zero(lambda: metrics_from(out, "epoch", plan.step), device, f"writing {out / 'metrics.jsonl'}")
    selection = Selection(select_by=cfg.select_by)
    if plan.tag is not None:
        weights, optimizer_state, state = load_state(out, plan.tag)
        run.plain.load_state_dict(weights)
        run.optimizer.load_state_dict(optimizer_state)
        run.scheduler.load_state_dict(state["scheduler"])
        selection.restore(state)
        within = f" and batch {selection.start_batch} of epoch {selection.start}" if selection.start_batch else ""
        log.info("resumed after epoch %d of %d%s", state["epoch"], cfg.epochs, within)
    return selection


def main(argv: list[str] | None = None) -> int:
    """Entry point of launch/finetune.py: `--config FILE` and `field=value` overrides; exit codes as
    train/run.py says."""
    return skeleton.main(finetune, FinetuneConfig, "DR grading fine-tuning with Accelerate", argv)


if __name__ == "__main__":  # python -m / torchrun -m / deepspeed --module / accelerate launch -m
    sys.exit(main())
