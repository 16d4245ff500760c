"""The sections the task configs share, each field with its one help text: the run (folder, seed,
timeout), the Accelerate runtime, the encoder a task starts from, and the head training of grading and
segmentation. A task config builds on them by inheritance, so that its keys stay flat (`run_dir`, not
`runtime.run_dir`: users' files, overrides and run fingerprints are unchanged); where a task's default
differs, it restates the field with `restate` (the help and range stay the section's).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from ssit_dist.configclass import configclass


@configclass
class Run:
    """What every training run has: its folder, its seed, how long a collective may wait."""

    run_dir: str = Field(
        default="runs/run", description="run folder: config, fingerprint, metrics, checkpoints, report"
    )
    seed: int = Field(default=0, description="seeds the model's initialisation, the data order and the augmentation")
    dist_timeout_s: float = Field(
        default=1800.0, description="a collective that waits longer ends the run with an error", gt=0
    )


@configclass
class AccelerateRun(Run):
    """A run under Accelerate (grading, segmentation): precision, loader processes, resume."""

    renamed: ClassVar[dict[str, str]] = {"out": "run_dir"}

    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        default="no", description="no, bf16 or fp16 (through Accelerate)"
    )
    workers: int = Field(default=2, description="loader processes per process", ge=0)
    resume: Literal["auto", "force"] = Field(
        default="auto",
        description="auto: resume an unchanged run in run_dir, refuse a changed one; force: resume anyway",
    )


@configclass
class EncoderSource:
    """The encoder a task starts from (grading, segmentation, kNN)."""

    init: str = Field(
        default="random",
        description="encoder weights: an export (.safetensors or a timm folder), a reference checkpoint, timm "
        "weights, or random",
    )
    arch: str | None = Field(
        default=None, description="timm architecture; null: the export's, else vit_small_patch16_224"
    )
    timm_kwargs: dict[str, Any] | None = Field(
        default=None, description='timm overrides, e.g. {"patch_size": 8, "embed_dim": 96}; null: the export\'s'
    )
    trust_pickle: bool = Field(
        default=False,
        description="allow unpickling a reference epoch_N.pt module (runs its code: only files you trust)",
    )
    img_size: int = Field(default=384, description="input size in pixels (positional embeddings are resampled)", gt=0)


@configclass
class HeadTraining:
    """How grading and segmentation train a head on the encoder (or the encoder with it)."""

    renamed: ClassVar[dict[str, str]] = {"batch": "global_batch"}

    linear: bool = Field(default=False, description="frozen encoder: train the head only (a linear probe)")
    global_batch: int = Field(default=16, description="samples per optimizer step over all processes", ge=1)
    lr: float | None = Field(
        default=None, description="peak Adam learning rate; null (grading): 2e-5, a linear probe 0.002", gt=0
    )
    weight_decay: float | None = Field(
        default=None, description="Adam weight decay; null (grading): 1e-5, a linear probe 0", ge=0
    )
