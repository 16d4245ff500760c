"""The run configs as typed dataclasses, and nothing else: each field's type, default, one-line help and
range live here (ssit_dist/fields.py checks them when a config is built); `ssit-dist config
pretrain|finetune` lists them. Reading files and overrides is config/loading.py's part, filling the
DeepSpeed JSON config/deepspeed.py's.

The batch size in `PretrainConfig` is global: the micro batch per rank and the gradient accumulation
follow from the world size (config/deepspeed.py: batch_layout).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from ssit_dist.data.loading.augment import VIEW1, VIEW2, ViewRecipe
from ssit_dist.fields import Checked, option, require
from ssit_dist.models.ssit import ModelConfig


@dataclass
class DataConfig(Checked):
    shards: list[str] = option(
        factory=lambda: ["shards/pretrain"],
        help=(
            "folders from `ssit-dist shard`, or brace patterns of tar URLs (/data/train-{000000..000099}.tar, "
            "pipe:..., https://...)"
        ),
    )
    split: str = option("train", "split of the folders to read; patterns name their shards themselves")
    mean: list[float] | None = option(None, "RGB mean in [0, 1]; null: from the shards' _info.json")
    std: list[float] | None = option(None, "RGB std in [0, 1]; null: from the shards' _info.json")
    augment_on: Literal["cpu", "gpu"] = option(
        "cpu",
        "where the pair augmentation runs: cpu (OpenCV in the loader workers) or gpu (workers only read the "
        "bytes; JPEG decoding and the recipe run batched on the training device, which keeps up with a GPU)",
    )
    workers: int = option(2, "loader processes per rank (0: load in the training process)", ge=0)
    prefetch: int = option(2, "batches each loader worker prepares ahead", ge=1)
    pin_memory: bool = option(
        False,
        "page-lock host batches, so that their copies to the GPU run beside compute (non_blocking); off on a CPU",
    )
    shuffle_buffer: int = option(1000, "samples held for shuffling, per loader worker", ge=1)
    piece_size: int = option(
        64,
        "consecutive samples of a shard read together: each epoch shuffles these pieces over all loader "
        "workers of all ranks (every sample once per epoch), then each worker's buffer shuffles samples",
        ge=1,
    )
    verify: Literal["size", "sha256", "none"] = option(
        "size", "before training check each local shard against _info.json: size, sha256 or none"
    )
    empty_timeout_s: float = option(300.0, "a source with no usable sample for this long ends the run, naming it", gt=0)
    stall_timeout_s: float | None = option(
        None,
        "a loader that delivers no batch for this long (a hung read, e.g. on NFS) counts as a failed loader: "
        "every rank stops at the next sync point, naming it; below dist_timeout_s (null: half of it, at most 600)",
        gt=0,
    )

    def validate(self) -> None:
        require(len(self.shards) > 0, "shards", self.shards, "name at least one folder or URL pattern")
        for name in ("mean", "std"):
            value = getattr(self, name)
            require(value is None or len(value) == 3, name, value, "expected three numbers (R, G, B in [0, 1])")
        require(self.std is None or all(v > 0 for v in self.std), "std", self.std, "must be positive")


@dataclass
class AugmentConfig(Checked):
    view1: ViewRecipe = option(factory=lambda: dataclasses.replace(VIEW1), help="the first (strongly cropped) view")
    view2: ViewRecipe = option(factory=lambda: dataclasses.replace(VIEW2), help="the second (nearly whole) view")


@dataclass
class RetrievalConfig(Checked):
    shards: str | None = option(
        None, "held-out shards FOLDER[:SPLIT] (split default: train) for view retrieval; null: not measured"
    )
    every: int = option(100, "steps between view-retrieval measurements (and one at the end)", ge=1)
    samples: int = option(128, "photographs of the held-out shards used (two fixed views each)", ge=2)


@dataclass
class OptimConfig(Checked):
    lr: float = option(1e-3, "peak learning rate at global batch 512, scaled linearly with the global batch", gt=0)
    weight_decay: float = option(0.1, "AdamW weight decay", ge=0)
    warmup_epochs: float = option(40.0, "linear warmup, then cosine decay to min_lr", ge=0)
    min_lr: float = option(0.0, "learning rate at the end of the cosine", ge=0)
    clip_grad: float = option(1.0, "maximum gradient norm", gt=0)

    def validate(self) -> None:
        require(self.min_lr <= self.lr, "min_lr", self.min_lr, f"must be in [0, lr = {self.lr}]")


@dataclass
class LossConfig(Checked):
    contrastive_weight: float = option(1.0, "weight of the contrastive loss", alias="cl_weight", ge=0)
    saliency_weight: float = option(10.0, "weight of the saliency segmentation loss", alias="ss_weight", ge=0)
    saliency_cosine_decay: bool = option(
        False, "decay the saliency weight to 0 along a cosine", alias="ss_cosine_decay"
    )
    momentum: float = option(0.99, "EMA momentum of the key network at the start; cosine ramp to 1", ge=0, le=1)


@dataclass
class PretrainConfig(Checked):
    """SSiT pretraining with DeepSpeed (launch/pretrain.py, ssit-dist pretrain)."""

    run_dir: str = option("runs/pretrain", "run folder: config, fingerprint, metrics, checkpoints")
    ds_config: str = option(
        "zero2_bf16",
        "DeepSpeed JSON: a shipped name (zero2_bf16, ...) or a path, relative to the config file that names it",
    )
    model: ModelConfig = option(factory=ModelConfig, help="the SSiT model")
    data: DataConfig = option(factory=DataConfig, help="shards and loading")
    augment: AugmentConfig = option(factory=AugmentConfig, help="the two views' augmentation (reference values)")
    retrieval: RetrievalConfig = option(factory=RetrievalConfig, help="view retrieval on held-out photographs")
    optim: OptimConfig = option(factory=OptimConfig, help="optimizer and schedule")
    loss: LossConfig = option(factory=LossConfig, help="loss weights and momentum")
    global_batch: int = option(512, "pairs per optimizer step over all ranks", ge=2)
    micro_batch: int | None = option(
        None, "pairs per rank and forward; null: global_batch / world (no accumulation)", ge=2
    )
    epochs: int = option(300, "training length in epochs", ge=1)
    steps_per_epoch: int | None = option(None, "null: training samples // global_batch", ge=1)
    seed: int = option(0, "seeds the model init and the data stream")
    log_every: int = option(
        10,
        "steps between reads of the losses on the host (metrics, progress, and the agreement on a non-finite "
        "loss, a stop signal or a failed loader); between them a step never waits for the device",
        ge=1,
    )
    checkpoint_every: int | None = option(
        500, "steps between checkpoints (also one at the end and on SIGTERM/SIGUSR1); null: by time only", ge=1
    )
    checkpoint_every_minutes: float | None = option(
        None,
        "also checkpoint at the first sync point (log_every) once this many minutes passed since the last "
        "checkpoint: on many GPUs a step count comes round every few seconds, and each save blocks every rank",
        gt=0,
    )
    keep_checkpoints: int = option(3, "checkpoints kept; older ones are deleted", ge=1)
    resume: Literal["auto", "force", "reshard"] = option(
        "auto",
        "auto: resume an unchanged run, refuse a changed one; force: resume anyway; "
        "reshard: another world size through DeepSpeed's universal checkpoint",
    )
    dist_timeout_s: float = option(1800.0, "a collective that waits longer ends the run with an error", gt=0)

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


@dataclass
class FinetuneConfig(Checked):
    """DR grading on labelled shards (ssit-dist finetune). Sources are FOLDER or FOLDER:SPLIT."""

    run_dir: str = option("runs/finetune", "run folder: config, metrics, checkpoints, weights, report", alias="out")
    train: str = option("shards/graded:train", "labelled shards to train on, FOLDER or FOLDER:SPLIT")
    val: str | None = option(None, "validation split; null: the train folder's val split")
    test: str | None = option(None, "test split; null: the train folder's test split, if it has one")
    init: str = option(
        "random", "encoder weights: an export .safetensors, a reference checkpoint, timm weights, or random"
    )
    arch: str | None = option(None, "timm architecture; null: the export's, else vit_small_patch16_224")
    timm_kwargs: dict[str, Any] | None = option(None, "timm overrides (patch_size, embed_dim, ...); null: the export's")
    trust_pickle: bool = option(False, "allow unpickling a reference epoch_N.pt module (only for files you trust)")
    img_size: int = option(384, "input size in pixels", gt=0)
    objective: Literal["regression", "classification"] = option(
        "regression", "regression (MSE + thresholds) or classification (cross-entropy)"
    )
    num_classes: int = option(5, "DR grades", ge=2)
    linear: bool = option(False, "linear probe: frozen encoder, linear head only")
    epochs: int = option(25, "training length in epochs", ge=1)
    global_batch: int = option(16, "samples per optimizer step over all processes", alias="batch", ge=1)
    grad_accumulation: int = option(1, "micro batches per optimizer step", ge=1)
    lr: float | None = option(None, "learning rate; null: 2e-5, linear probe 0.002", gt=0)
    weight_decay: float | None = option(None, "Adam weight decay; null: 1e-5, linear probe 0", ge=0)
    warmup_epochs: float = option(0.0, "linear warmup, then cosine decay", ge=0)
    mixed_precision: Literal["no", "bf16", "fp16"] = option("no", "no, bf16 or fp16 (through Accelerate)")
    select_by: Literal["qwk", "accuracy"] = option("qwk", "best checkpoint by validation qwk or accuracy")
    workers: int = option(2, "loader processes per process", ge=0)
    eval_batch: int = option(64, "batch size for evaluation", ge=1)
    seed: int = option(0, "seeds the head init, the data order and augmentation")
    clip_grad: float | None = option(
        1.0, "maximum gradient norm, as the reference's fine-tuning; null: no clipping", gt=0
    )
    resume: Literal["auto", "force"] = option(
        "auto", "auto: resume an unchanged run in run_dir, refuse a changed one; force: resume anyway"
    )
    dist_timeout_s: float = option(1800.0, "a collective that waits longer ends the run with an error", gt=0)

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (0.002 if self.linear else 2e-5)

    @property
    def resolved_weight_decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else (0.0 if self.linear else 1e-5)


@dataclass
class SegmentConfig(Checked):
    """`ssit-dist segment`: the paper's segmentation evaluation of an encoder (vessels, lesions): its patch
    tokens through a 1x1 convolution and PixelShuffle to per-pixel logits, fine-tuned or frozen."""

    run_dir: str = option("runs/segment", "run folder: config, metrics, checkpoint, report, pictures", alias="out")
    data: str = option(
        "data/segmentation", "folder with images/, masks/ (or masks/CLASS/) and fov/, as train/val/test folders"
    )
    splits: str | None = option(None, "CSV image,split for a folder without train/val/test folders")
    init: str = option(
        "random", "encoder weights: an export (.safetensors or timm folder), a reference checkpoint, or random"
    )
    arch: str | None = option(None, "timm architecture; null: the export's, else vit_small_patch16_224")
    timm_kwargs: dict[str, Any] | None = option(None, "timm overrides (patch_size, embed_dim, ...); null: the export's")
    trust_pickle: bool = option(False, "allow unpickling a reference epoch_N.pt module (only for files you trust)")
    img_size: int = option(256, "input size: training crops and inference windows", gt=0)
    resize: int = option(512, "images and masks resized to this side before cropping", gt=0)
    linear: bool = option(False, "frozen encoder: train the head only")
    iterations: int = option(2000, "optimizer steps", ge=1)
    warmup: int = option(200, "linear warmup steps, then cosine decay", ge=0)
    lr: float = option(1e-3, "Adam learning rate", gt=0)
    weight_decay: float = option(0.0, "Adam weight decay", ge=0)
    global_batch: int = option(8, "crops per step over all processes", alias="batch", ge=1)
    eval_every: int = option(200, "steps between validations (and checkpoints); one at the end", ge=1)
    threshold: float = option(0.5, "probability above which a pixel is foreground", gt=0, lt=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = option("no", "no, bf16 or fp16 (through Accelerate)")
    workers: int = option(2, "loader processes per process", ge=0)
    seed: int = option(0, "seeds the head init, the crops and augmentation")
    dist_timeout_s: float = option(1800.0, "a collective that waits longer ends the run with an error", gt=0)

    def validate(self) -> None:
        require(self.resize >= self.img_size, "resize", self.resize, f"expected at least img_size ({self.img_size})")
        require(
            self.warmup < self.iterations, "warmup", self.warmup, f"expected fewer than iterations ({self.iterations})"
        )
