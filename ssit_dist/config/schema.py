"""The run configs as checked dataclasses, and nothing else: each field's type, default, one-line help
and range live here (`@configclass`, ssit_dist/configclass.py; the sections the tasks share in
ssit_dist/sections.py); `ssit-dist config pretrain|finetune|segment` lists them and `--schema` prints them
as JSON Schema. Reading files and overrides is config/loading.py's part, filling the DeepSpeed JSON
config/deepspeed.py's.

The batch size in `PretrainConfig` is global: the micro batch per rank and the gradient accumulation
follow from the world size (data/loading/batch_layout.py).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from pydantic import Field

from ssit_dist.configclass import configclass, require, restate
from ssit_dist.data.loading.view_recipe import VIEW1, VIEW2, ViewRecipe
from ssit_dist.models.model_config import ModelConfig
from ssit_dist.sections import AccelerateRun, EncoderSource, HeadTraining, Run


@configclass
class DataConfig:
    shards: list[str] = Field(
        default_factory=lambda: ["shards/pretrain"],
        description="folders from `ssit-dist shard`, or brace patterns of tar URLs "
        "(/data/train-{000000..000099}.tar, pipe:..., https://...)",
    )
    split: str = Field(
        default="train", description="split of the folders to read; patterns name their shards themselves"
    )
    mean: list[float] | None = Field(default=None, description="RGB mean in [0, 1]; null: from the shards' _info.json")
    std: list[float] | None = Field(default=None, description="RGB std in [0, 1]; null: from the shards' _info.json")
    augment_on: Literal["cpu", "gpu"] = Field(
        default="cpu",
        description="where the pair augmentation runs: cpu (OpenCV in the loader workers) or gpu (workers only "
        "read the bytes; JPEG decoding and the recipe run batched on the training device, which keeps up with a "
        "GPU)",
    )
    workers: int = Field(default=2, description="loader processes per rank (0: load in the training process)", ge=0)
    prefetch: int = Field(default=2, description="batches each loader worker prepares ahead", ge=1)
    pin_memory: bool = Field(
        default=False,
        description="page-lock host batches, so that their copies to the GPU run beside compute (non_blocking); "
        "off on a CPU",
    )
    shuffle_buffer: int = Field(default=1000, description="samples held for shuffling, per loader worker", ge=1)
    piece_size: int = Field(
        default=64,
        description="consecutive samples of a shard read together: each epoch shuffles these pieces over all "
        "loader workers of all ranks (every sample once per epoch), then each worker's buffer shuffles samples",
        ge=1,
    )
    verify: Literal["size", "sha256", "none"] = Field(
        default="size", description="before training check each local shard against _info.json: size, sha256 or none"
    )
    empty_timeout_s: float = Field(
        default=300.0, description="a source with no usable sample for this long ends the run, naming it", gt=0
    )
    stall_timeout_s: float | None = Field(
        default=None,
        description="a loader that delivers no batch for this long (a hung read, e.g. on NFS) counts as a failed "
        "loader: every rank stops at the next sync point, naming it; below dist_timeout_s (null: half of it, at "
        "most 600)",
        gt=0,
    )

    def validate(self) -> None:
        require(len(self.shards) > 0, "shards", self.shards, "name at least one folder or URL pattern")
        for name in ("mean", "std"):
            value = getattr(self, name)
            require(value is None or len(value) == 3, name, value, "expected three numbers (R, G, B in [0, 1])")
        require(self.std is None or all(v > 0 for v in self.std), "std", self.std, "must be positive")


@configclass
class AugmentConfig:
    view1: ViewRecipe = Field(
        default_factory=lambda: dataclasses.replace(VIEW1), description="the first (strongly cropped) view"
    )
    view2: ViewRecipe = Field(
        default_factory=lambda: dataclasses.replace(VIEW2), description="the second (nearly whole) view"
    )


@configclass
class RetrievalConfig:
    shards: str | None = Field(
        default=None,
        description="held-out shards FOLDER[:SPLIT] (split default: train) for view retrieval; null: not measured",
    )
    every: int = Field(default=100, description="steps between view-retrieval measurements (and one at the end)", ge=1)
    samples: int = Field(
        default=128, description="photographs of the held-out shards used (two fixed views each)", ge=2
    )


@configclass
class OptimConfig:
    lr: float = Field(
        default=1e-3, description="peak learning rate at global batch 512, scaled linearly with the global batch", gt=0
    )
    weight_decay: float = Field(default=0.1, description="AdamW weight decay", ge=0)
    warmup_epochs: float = Field(default=40.0, description="linear warmup, then cosine decay to min_lr", ge=0)
    min_lr: float = Field(default=0.0, description="learning rate at the end of the cosine", ge=0)
    clip_grad: float = Field(default=1.0, description="maximum gradient norm", gt=0)

    def validate(self) -> None:
        require(self.min_lr <= self.lr, "min_lr", self.min_lr, f"must be in [0, lr = {self.lr}]")


@configclass
class LossConfig:
    renamed: ClassVar[dict[str, str]] = {
        "cl_weight": "contrastive_weight",
        "ss_weight": "saliency_weight",
        "ss_cosine_decay": "saliency_cosine_decay",
    }

    contrastive_weight: float = Field(default=1.0, description="weight of the contrastive loss", ge=0)
    saliency_weight: float = Field(default=10.0, description="weight of the saliency segmentation loss", ge=0)
    saliency_cosine_decay: bool = Field(default=False, description="decay the saliency weight to 0 along a cosine")
    momentum: float = Field(
        default=0.99, description="EMA momentum of the key network at the start; cosine ramp to 1", ge=0, le=1
    )


@configclass
class PretrainConfig(Run):
    """SSiT pretraining with DeepSpeed (launch/pretrain.py, ssit-dist pretrain)."""

    run_dir: str = restate(Run, "run_dir", "runs/pretrain")
    ds_config: str = Field(
        default="zero2_bf16",
        description="DeepSpeed JSON: a shipped name (zero2_bf16, ...) or a path, relative to the config file "
        "that names it",
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="the SSiT model")
    data: DataConfig = Field(default_factory=DataConfig, description="shards and loading")
    augment: AugmentConfig = Field(
        default_factory=AugmentConfig, description="the two views' augmentation (reference values)"
    )
    retrieval: RetrievalConfig = Field(
        default_factory=RetrievalConfig, description="view retrieval on held-out photographs"
    )
    optim: OptimConfig = Field(default_factory=OptimConfig, description="optimizer and schedule")
    loss: LossConfig = Field(default_factory=LossConfig, description="loss weights and momentum")
    global_batch: int = Field(default=512, description="pairs per optimizer step over all ranks", ge=2)
    micro_batch: int | None = Field(
        default=None, description="pairs per rank and forward; null: global_batch / world (no accumulation)", ge=2
    )
    epochs: int = Field(default=300, description="training length in epochs", ge=1)
    steps_per_epoch: int | None = Field(default=None, description="null: training samples // global_batch", ge=1)
    log_every: int = Field(
        default=10,
        description="steps between reads of the losses on the host (metrics, progress, and the agreement on a "
        "non-finite loss, a stop signal or a failed loader); between them a step never waits for the device",
        ge=1,
    )
    checkpoint_every: int | None = Field(
        default=500,
        description="steps between checkpoints (also one at the end and on SIGTERM/SIGUSR1); null: by time only",
        ge=1,
    )
    checkpoint_every_minutes: float | None = Field(
        default=None,
        description="also checkpoint at the first sync point (log_every) once this many minutes passed since the "
        "last checkpoint: on many GPUs a step count comes round every few seconds, and each save blocks every rank",
        gt=0,
    )
    keep_checkpoints: int = Field(default=3, description="checkpoints kept; older ones are deleted", ge=1)
    resume: Literal["auto", "force", "reshard"] = Field(
        default="auto",
        description="auto: resume an unchanged run, refuse a changed one; force: resume anyway; "
        "reshard: another world size through DeepSpeed's universal checkpoint",
    )

    def validate(self) -> None:
        require(
            self.data.stall_timeout_s is None or self.data.stall_timeout_s < self.dist_timeout_s,
            "data.stall_timeout_s",
            self.data.stall_timeout_s,
            f"must be below dist_timeout_s ({self.dist_timeout_s:g}): the other ranks wait that long in a collective",
        )

    def stall_timeout_s(self) -> float:
        """data.stall_timeout_s, or its default: half of dist_timeout_s, at most 10 minutes."""
        return self.data.stall_timeout_s or min(600.0, self.dist_timeout_s / 2)

    def scaled_lr(self) -> float:
        return self.optim.lr * self.global_batch / 512


@configclass
class FinetuneConfig(HeadTraining, EncoderSource, AccelerateRun):
    """DR grading on labelled shards (ssit-dist finetune). Sources are FOLDER or FOLDER:SPLIT."""

    run_dir: str = restate(Run, "run_dir", "runs/finetune")
    train: str = Field(default="shards/graded:train", description="labelled shards to train on, FOLDER or FOLDER:SPLIT")
    val: str | None = Field(default=None, description="validation split; null: the train folder's val split")
    test: str | None = Field(default=None, description="test split; null: the train folder's test split, if it has one")
    objective: Literal["regression", "classification"] = Field(
        default="regression", description="regression (MSE + thresholds) or classification (cross-entropy)"
    )
    num_classes: int = Field(default=5, description="DR grades", ge=2)
    pool: Literal["cls+avg", "token", "avg"] = Field(
        default="cls+avg",
        description="features the head reads: cls+avg (CLS token and mean patch token, the paper's), token or avg; "
        "only token and avg export as a plain timm classifier",
    )
    epochs: int = Field(default=25, description="training length in epochs", ge=1)
    grad_accumulation: int = Field(default=1, description="micro batches per optimizer step", ge=1)
    warmup_epochs: float = Field(default=0.0, description="linear warmup, then cosine decay", ge=0)
    select_by: Literal["qwk", "accuracy"] = Field(
        default="qwk", description="best checkpoint by validation qwk or accuracy"
    )
    eval_batch: int = Field(default=64, description="batch size for evaluation", ge=1)
    clip_grad: float | None = Field(
        default=1.0, description="maximum gradient norm, as the reference's fine-tuning; null: no clipping", gt=0
    )

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (0.002 if self.linear else 2e-5)

    @property
    def resolved_weight_decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else (0.0 if self.linear else 1e-5)


@configclass
class SegmentConfig(HeadTraining, EncoderSource, AccelerateRun):
    """`ssit-dist segment`: the paper's segmentation evaluation of an encoder (vessels, lesions): its patch
    tokens through a 1x1 convolution and PixelShuffle to per-pixel logits, fine-tuned or frozen."""

    run_dir: str = restate(Run, "run_dir", "runs/segment")
    img_size: int = restate(EncoderSource, "img_size", 256)  # training crops and inference windows
    global_batch: int = restate(HeadTraining, "global_batch", 8)
    lr: float = restate(HeadTraining, "lr", 1e-3)
    weight_decay: float = restate(HeadTraining, "weight_decay", 0.0)
    data: str = Field(
        default="data/segmentation",
        description="folder with images/, masks/ (or masks/CLASS/) and fov/, as train/val/test folders",
    )
    splits: str | None = Field(default=None, description="CSV image,split for a folder without train/val/test folders")
    resize: int = Field(default=512, description="images and masks resized to this side before cropping", gt=0)
    iterations: int = Field(default=2000, description="optimizer steps", ge=1)
    warmup: int = Field(default=200, description="linear warmup steps, then cosine decay", ge=0)
    eval_every: int = Field(
        default=200, description="steps between validations (and checkpoints); one at the end", ge=1
    )
    threshold: float = Field(default=0.5, description="probability above which a pixel is foreground", gt=0, lt=1)

    def validate(self) -> None:
        require(self.resize >= self.img_size, "resize", self.resize, f"expected at least img_size ({self.img_size})")
        require(
            self.warmup < self.iterations, "warmup", self.warmup, f"expected fewer than iterations ({self.iterations})"
        )
