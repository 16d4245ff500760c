"""Typed configuration of pretraining and fine-tuning runs: dataclasses, file loading, overrides,
DeepSpeed configs. Each field's type, help and range live on its dataclass (ssit_dist/fields.py checks
them when a config is built); `ssit-dist config pretrain|finetune` lists them.

One `PretrainConfig` describes a run. It loads from YAML or JSON, takes `section.field=value` overrides
from the command line, and is saved into the run folder. The batch size in it is global: the micro batch
per rank and the gradient accumulation follow from the world size. DeepSpeed JSON files under
ds_configs/ carry ZeRO stage, precision, optimizer and offload; their batch, lr and weight-decay fields
are "auto" and filled from this config, so the two never disagree.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from ssit_dist import atomic
from ssit_dist.data.augment import VIEW1, VIEW2, ViewRecipe
from ssit_dist.fields import Checked, ConfigError, option, require
from ssit_dist.models.ssit import ModelConfig

__all__ = [
    "ConfigError",
    "DataConfig",
    "FinetuneConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "PretrainConfig",
    "load_config",
    "save_config",
    "batch_layout",
    "deepspeed_config",
]


def _shipped(in_wheel: str, in_source: str) -> Path:
    """The shipped configs: inside the package in an installed wheel, the top-level folders of a
    source checkout (editable install) otherwise."""
    package = Path(__file__).resolve().parent
    return package / in_wheel if (package / in_wheel).is_dir() else package.parent / in_source


DS_CONFIGS = _shipped("ds_configs", "ds_configs")
RUN_CONFIGS = _shipped("configs", "launch/configs")


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
    workers: int = option(2, "loader processes per rank (0: load in the training process)")
    prefetch: int = option(2, "batches each loader worker prepares ahead")
    pin_memory: bool = option(False, "pin host batches for faster copies to the GPU")
    shuffle_buffer: int = option(1000, "samples held for shuffling, per loader worker")
    piece_size: int = option(
        64,
        "consecutive samples of a shard read together: each epoch shuffles these pieces over all loader "
        "workers of all ranks (every sample once per epoch), then each worker's buffer shuffles samples",
    )
    verify: Literal["size", "sha256", "none"] = option(
        "size", "before training check each local shard against _info.json: size, sha256 or none"
    )
    empty_timeout_s: float = option(300.0, "a source with no usable sample for this long ends the run, naming it")
    stall_timeout_s: float | None = option(
        None,
        "a loader that delivers no batch for this long (a hung read, e.g. on NFS) counts as a failed loader: "
        "every rank stops at the next sync point, naming it; below dist_timeout_s (null: half of it, at most 600)",
    )

    def validate(self) -> None:
        require(len(self.shards) > 0, "data.shards", self.shards, "name at least one folder or URL pattern")
        for name in ("mean", "std"):
            value = getattr(self, name)
            require(
                value is None or len(value) == 3, f"data.{name}", value, "expected three numbers (R, G, B in [0, 1])"
            )
        require(self.std is None or all(v > 0 for v in self.std), "data.std", self.std, "must be positive")
        require(self.workers >= 0, "data.workers", self.workers, "must be 0 or more")
        require(self.prefetch >= 1, "data.prefetch", self.prefetch, "must be at least 1")
        require(self.shuffle_buffer >= 1, "data.shuffle_buffer", self.shuffle_buffer, "must be at least 1")
        require(self.piece_size >= 1, "data.piece_size", self.piece_size, "must be at least 1 (samples)")
        require(self.empty_timeout_s > 0, "data.empty_timeout_s", self.empty_timeout_s, "must be positive (seconds)")
        require(
            self.stall_timeout_s is None or self.stall_timeout_s > 0,
            "data.stall_timeout_s",
            self.stall_timeout_s,
            "must be positive (seconds), or null",
        )


@dataclass
class AugmentConfig(Checked):
    view1: ViewRecipe = option(factory=lambda: dataclasses.replace(VIEW1), help="the first (strongly cropped) view")
    view2: ViewRecipe = option(factory=lambda: dataclasses.replace(VIEW2), help="the second (nearly whole) view")


@dataclass
class RetrievalConfig(Checked):
    shards: str | None = option(
        None, "held-out shards FOLDER[:SPLIT] (split default: train) for view retrieval; null: not measured"
    )
    every: int = option(100, "steps between view-retrieval measurements (and one at the end)")
    samples: int = option(128, "photographs of the held-out shards used (two fixed views each)")

    def validate(self) -> None:
        require(self.every >= 1, "every", self.every, "must be at least 1")
        require(self.samples >= 2, "samples", self.samples, "must be at least 2")


@dataclass
class OptimConfig(Checked):
    lr: float = option(1e-3, "peak learning rate at global batch 512, scaled linearly with the global batch")
    weight_decay: float = option(0.1, "AdamW weight decay")
    warmup_epochs: float = option(40.0, "linear warmup, then cosine decay to min_lr")
    min_lr: float = option(0.0, "learning rate at the end of the cosine")
    clip_grad: float = option(1.0, "maximum gradient norm")

    def validate(self) -> None:
        require(self.lr > 0, "optim.lr", self.lr, "must be positive")
        require(self.weight_decay >= 0, "optim.weight_decay", self.weight_decay, "must be 0 or more")
        require(self.warmup_epochs >= 0, "optim.warmup_epochs", self.warmup_epochs, "must be 0 or more")
        require(0 <= self.min_lr <= self.lr, "optim.min_lr", self.min_lr, f"must be in [0, optim.lr = {self.lr}]")
        require(self.clip_grad > 0, "optim.clip_grad", self.clip_grad, "must be positive")


@dataclass
class LossConfig(Checked):
    contrastive_weight: float = option(1.0, "weight of the contrastive loss", alias="cl_weight")
    saliency_weight: float = option(10.0, "weight of the saliency segmentation loss", alias="ss_weight")
    saliency_cosine_decay: bool = option(
        False, "decay the saliency weight to 0 along a cosine", alias="ss_cosine_decay"
    )
    momentum: float = option(0.99, "EMA momentum of the key network at the start; cosine ramp to 1")

    def validate(self) -> None:
        require(self.contrastive_weight >= 0, "loss.contrastive_weight", self.contrastive_weight, "must be 0 or more")
        require(self.saliency_weight >= 0, "loss.saliency_weight", self.saliency_weight, "must be 0 or more")
        require(0 <= self.momentum <= 1, "loss.momentum", self.momentum, "must be in [0, 1]")


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
    global_batch: int = option(512, "pairs per optimizer step over all ranks")
    micro_batch: int | None = option(None, "pairs per rank and forward; null: global_batch / world (no accumulation)")
    epochs: int = option(300, "training length in epochs")
    steps_per_epoch: int | None = option(None, "null: training samples // global_batch")
    seed: int = option(0, "seeds the model init and the data stream")
    log_every: int = option(
        10,
        "steps between reads of the losses on the host (metrics, progress, and the agreement on a non-finite "
        "loss, a stop signal or a failed loader); between them a step never waits for the device",
    )
    checkpoint_every: int | None = option(
        500, "steps between checkpoints (also one at the end and on SIGTERM/SIGUSR1); null: by time only"
    )
    checkpoint_every_minutes: float | None = option(
        None,
        "also checkpoint at the first sync point (log_every) once this many minutes passed since the last "
        "checkpoint: on many GPUs a step count comes round every few seconds, and each save blocks every rank",
    )
    keep_checkpoints: int = option(3, "checkpoints kept; older ones are deleted")
    resume: Literal["auto", "force", "reshard"] = option(
        "auto",
        "auto: resume an unchanged run, refuse a changed one; force: resume anyway; "
        "reshard: another world size through DeepSpeed's universal checkpoint",
    )
    dist_timeout_s: float = option(1800.0, "a collective that waits longer ends the run with an error")

    def validate(self) -> None:
        require(self.global_batch >= 2, "global_batch", self.global_batch, "must be at least 2")
        require(
            self.micro_batch is None or self.micro_batch >= 2,
            "micro_batch",
            self.micro_batch,
            "must be at least 2 (BatchNorm in the projector), or null",
        )
        require(self.epochs >= 1, "epochs", self.epochs, "must be at least 1")
        require(
            self.steps_per_epoch is None or self.steps_per_epoch >= 1,
            "steps_per_epoch",
            self.steps_per_epoch,
            "must be at least 1, or null",
        )
        require(self.log_every >= 1, "log_every", self.log_every, "must be at least 1 (steps)")
        require(
            self.checkpoint_every is None or self.checkpoint_every >= 1,
            "checkpoint_every",
            self.checkpoint_every,
            "must be at least 1 (steps), or null",
        )
        require(
            self.checkpoint_every_minutes is None or self.checkpoint_every_minutes > 0,
            "checkpoint_every_minutes",
            self.checkpoint_every_minutes,
            "must be positive (minutes), or null",
        )
        require(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, "must be at least 1")
        require(self.dist_timeout_s > 0, "dist_timeout_s", self.dist_timeout_s, "must be positive (seconds)")
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
    img_size: int = option(384, "input size in pixels")
    objective: Literal["regression", "classification"] = option(
        "regression", "regression (MSE + thresholds) or classification (cross-entropy)"
    )
    num_classes: int = option(5, "DR grades")
    linear: bool = option(False, "linear probe: frozen encoder, linear head only")
    epochs: int = option(25, "training length in epochs")
    global_batch: int = option(16, "samples per optimizer step over all processes", alias="batch")
    grad_accumulation: int = option(1, "micro batches per optimizer step")
    lr: float | None = option(None, "learning rate; null: 2e-5, linear probe 0.002")
    weight_decay: float | None = option(None, "Adam weight decay; null: 1e-5, linear probe 0")
    warmup_epochs: float = option(0.0, "linear warmup, then cosine decay")
    mixed_precision: Literal["no", "bf16", "fp16"] = option("no", "no, bf16 or fp16 (through Accelerate)")
    select_by: Literal["qwk", "accuracy"] = option("qwk", "best checkpoint by validation qwk or accuracy")
    workers: int = option(2, "loader processes per process")
    eval_batch: int = option(64, "batch size for evaluation")
    seed: int = option(0, "seeds the head init, the data order and augmentation")
    clip_grad: float | None = option(1.0, "maximum gradient norm, as the reference's fine-tuning; null: no clipping")
    resume: Literal["auto", "force"] = option(
        "auto", "auto: resume an unchanged run in run_dir, refuse a changed one; force: resume anyway"
    )
    dist_timeout_s: float = option(1800.0, "a collective that waits longer ends the run with an error")

    def validate(self) -> None:
        require(self.dist_timeout_s > 0, "dist_timeout_s", self.dist_timeout_s, "must be positive (seconds)")
        require(
            self.clip_grad is None or self.clip_grad > 0,
            "clip_grad",
            self.clip_grad,
            "must be positive, or null for no clipping",
        )
        require(self.num_classes >= 2, "num_classes", self.num_classes, "need at least 2 grades")
        require(self.img_size > 0, "img_size", self.img_size, "must be positive")
        require(self.epochs >= 1, "epochs", self.epochs, "must be at least 1")
        require(self.global_batch >= 1, "global_batch", self.global_batch, "must be at least 1")
        require(self.grad_accumulation >= 1, "grad_accumulation", self.grad_accumulation, "must be at least 1")
        require(self.lr is None or self.lr > 0, "lr", self.lr, "must be positive, or null")
        require(
            self.weight_decay is None or self.weight_decay >= 0,
            "weight_decay",
            self.weight_decay,
            "must be 0 or more, or null",
        )
        require(self.warmup_epochs >= 0, "warmup_epochs", self.warmup_epochs, "must be 0 or more")
        require(self.workers >= 0, "workers", self.workers, "must be 0 or more")
        require(self.eval_batch >= 1, "eval_batch", self.eval_batch, "must be at least 1")

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (0.002 if self.linear else 2e-5)

    @property
    def resolved_weight_decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else (0.0 if self.linear else 1e-5)


class _Loader(yaml.SafeLoader):
    """YAML as users write numbers: YAML 1.1 reads `5e-4` and `1E-4` (no dot) as strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)


def _build(cls: type, values: dict[str, Any], where: str, base: Any = None) -> Any:
    """Dataclass `cls` from a dict, recursively, over the section's default `base` where it has one (the
    fields not given keep base's values: augment.view2 is not ViewRecipe()); errors name the dotted field."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    aliases = {f.metadata["alias"]: f.name for f in fields.values() if f.metadata.get("alias")}
    kwargs = {}
    for key, value in values.items():
        if key in aliases:
            warnings.warn(
                f"config field {where}{key} is now called {where}{aliases[key]}; the old name is read "
                "until the next release",
                FutureWarning,
                stacklevel=2,
            )
            key = aliases[key]
        if key not in fields:
            raise ConfigError(f"unknown field {where}{key} (known: {', '.join(fields)})")
        factory = fields[key].default_factory
        default = factory() if callable(factory) else None
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key} must be a section (a mapping), not {value!r}")
            value = _build(type(default), value, f"{where}{key}.", base=default)
        kwargs[key] = value
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ConfigError as e:
        message = str(e)
        raise ConfigError(
            message if message.startswith(where) or message.startswith("unknown") else where + message
        ) from None


def apply_override(values: dict[str, Any], override: str) -> None:
    """`optim.lr=5e-4` -> values["optim"]["lr"] = 5e-4 (the value is parsed as YAML)."""
    path, sep, text = override.partition("=")
    if not sep or not path:
        raise ConfigError(f"override {override!r} is not FIELD=VALUE (for example optim.lr=5e-4)")
    *parents, leaf = path.strip().split(".")
    target = values
    for part in parents:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    try:
        target[leaf] = parse_yaml(text)
    except yaml.YAMLError:
        target[leaf] = text


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, kind: type = PretrainConfig) -> Any:
    """A `kind` (PretrainConfig or FinetuneConfig) from a YAML/JSON file (a path, or the bare name of a
    shipped config) plus `a.b=value` overrides. A relative `ds_config` path in a file is taken relative
    to that file's folder; a bare name means the shipped DeepSpeed config (see `shipped_ds_config`)."""
    values: dict[str, Any] = {}
    if path:
        path = Path(path)
        shipped = RUN_CONFIGS / f"{path.name}.yaml"
        if not path.is_file() and path.parent == Path(".") and shipped.is_file():
            path = shipped  # a bare name: the shipped config (tiny_cpu, ssit_vit_s, ssit_vit_b)
        if not path.is_file():
            raise ConfigError(
                f"config file {path} not found (shipped: "
                f"{', '.join(sorted(p.stem for p in RUN_CONFIGS.glob('*.yaml')))})"
            )
        text = path.read_text()
        try:
            values = (json.loads(text) if path.suffix == ".json" else parse_yaml(text)) or {}
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise ConfigError(f"config file {path} cannot be read: {e}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of sections and fields")
        beside = path.parent / str(values.get("ds_config", ""))
        if (
            isinstance(values.get("ds_config"), str)
            and not Path(values["ds_config"]).is_absolute()
            and beside.is_file()
        ):
            values["ds_config"] = str(beside.resolve())  # relative to the file that names it
    for override in overrides or []:
        apply_override(values, override)
    return _build(kind, values, "")


def shipped_ds_config(name: str) -> Path:
    """`name` as given when that file exists; else a bare name (`zero2_bf16`, with or without .json) is
    the shipped DeepSpeed config of that name."""
    path = Path(name)
    shipped = DS_CONFIGS / (name if name.endswith(".json") else f"{name}.json")
    return shipped if not path.is_file() and "/" not in name and shipped.is_file() else path


def save_config(cfg: Any, run_dir: Path) -> Path:
    return atomic.write_text(run_dir / "config.yaml", yaml.safe_dump(asdict(cfg), sort_keys=False))


def batch_layout(global_batch: int, world: int, micro_batch: int | None) -> tuple[int, int]:
    """(micro batch per rank, gradient accumulation steps) with micro * accumulation * world = global."""
    if global_batch % world:
        raise ConfigError(f"global_batch {global_batch} is not divisible by the world size {world}")
    per_rank = global_batch // world
    micro = micro_batch or per_rank
    if per_rank % micro:
        raise ConfigError(
            f"micro_batch {micro} does not divide the per-rank batch {per_rank} "
            f"(global_batch {global_batch} over {world} ranks)"
        )
    if micro < 2:
        raise ConfigError(f"micro_batch {micro}: BatchNorm in the projector needs at least 2 samples per rank")
    return micro, per_rank // micro


DEEPSPEED_KEYS = {
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "optimizer",
    "scheduler",
    "fp16",
    "bf16",
    "zero_optimization",
    "steps_per_print",
    "wall_clock_breakdown",
    "activation_checkpointing",
    "torch_autocast",
    "communication_data_type",
    "prescale_gradients",
    "gradient_predivide_factor",
    "zero_allow_untested_optimizer",
    "flops_profiler",
    "compile",
    "data_types",
    "checkpoint",
    "tensorboard",
    "comms_logger",
    "seq_parallel_communication_data_type",
    "dump_state",
}


def deepspeed_config(path: str | Path, cfg: PretrainConfig, world: int) -> dict[str, Any]:
    """Load a ds_configs/ JSON, check its keys, and fill its "auto" fields from `cfg`."""
    path = shipped_ds_config(str(path))
    if not path.is_file():
        raise ConfigError(f"ds_config {path} not found")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"ds_config {path} is not valid JSON: {e}") from None
    unknown = sorted(set(ds) - DEEPSPEED_KEYS)
    if unknown:
        raise ConfigError(f"ds_config {path}: unknown key {unknown[0]!r} (DeepSpeed would ignore it silently)")
    zero = ds.get("zero_optimization", {})
    try:
        from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

        DeepSpeedZeroConfig(**zero)
    except Exception as e:  # pydantic's ValidationError names the offending key
        raise ConfigError(f"ds_config {path}: zero_optimization: {' '.join(str(e).split()[:12])}") from None
    stage = zero.get("stage", 0)
    if "offload_param" in zero and stage != 3:
        raise ConfigError(f"ds_config {path}: zero_optimization.offload_param needs stage 3 (stage is {stage})")
    if ds.get("fp16", {}).get("enabled") and ds.get("bf16", {}).get("enabled"):
        raise ConfigError(f"ds_config {path}: fp16 and bf16 are both enabled")
    micro, accumulation = batch_layout(cfg.global_batch, world, cfg.micro_batch)
    fills = {
        "train_batch_size": cfg.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": cfg.optim.clip_grad,
    }
    for key, value in fills.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ConfigError(
                f'ds_config {path}: {key} is {ds[key]} but the run config gives {value}; set it to "auto"'
            )
    params = ds.get("optimizer", {}).get("params", {})
    for key, value in (("lr", cfg.scaled_lr()), ("weight_decay", cfg.optim.weight_decay)):
        if params.get(key) == "auto":
            params[key] = value
    return ds
