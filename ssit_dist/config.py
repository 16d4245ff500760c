"""Typed configuration of a pretraining run: dataclasses, file loading, overrides, DeepSpeed configs.

One `PretrainConfig` describes a run. It loads from YAML or JSON, takes `section.field=value` overrides
from the command line, and is saved into the run folder. The batch size in it is global: the micro batch
per rank and the gradient accumulation follow from the world size. DeepSpeed JSON files under
ds_configs/ carry ZeRO stage, precision, optimizer and offload; their batch, lr and weight-decay fields
are "auto" and filled from this config, so the two never disagree.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ssit_dist.models.ssit import ModelConfig


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field."""


@dataclass
class DataConfig:
    # Folders from `ssit-dist shard`, or brace patterns of tar URLs (/data/train-{000000..000099}.tar,
    # pipe:..., https://...).
    shards: list[str] = field(default_factory=lambda: ["shards/pretrain"])
    split: str = "train"  # of the folders; patterns name their shards themselves
    mean: list[float] | None = None  # RGB in [0, 1]; default: from the shards' _info.json
    std: list[float] | None = None
    workers: int = 2  # loader processes per rank
    prefetch: int = 2  # batches per loader worker
    pin_memory: bool = False
    shuffle_buffer: int = 1000
    # Before training, each local shard is checked against its _info.json: "size" (fast), "sha256"
    # (reads every byte) or "none".
    verify: str = "size"
    # A source that yields no usable sample for this long (every sample undecodable, a failing pipe:,
    # an http 404) ends the run with an error naming it.
    empty_timeout_s: float = 300.0


@dataclass
class OptimConfig:
    lr: float = 1e-3  # at global batch 512, scaled linearly with the global batch
    weight_decay: float = 0.1
    warmup_epochs: float = 10.0
    min_lr: float = 0.0
    clip_grad: float = 1.0


@dataclass
class LossConfig:
    cl_weight: float = 1.0
    ss_weight: float = 10.0
    ss_cosine_decay: bool = False
    momentum: float = 0.99  # EMA momentum at the start; cosine ramp to 1


@dataclass
class PretrainConfig:
    run_dir: str = "runs/pretrain"
    ds_config: str = "ds_configs/zero2_bf16.json"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    global_batch: int = 512
    micro_batch: int | None = None  # per rank and step; default global_batch / world (no accumulation)
    epochs: int = 100
    steps_per_epoch: int | None = None  # default: training samples // global_batch
    seed: int = 0
    checkpoint_every: int = 500  # steps
    keep_checkpoints: int = 3
    # auto: resume from the latest checkpoint when what it depends on (fingerprint.json) is unchanged,
    # refuse otherwise; force: resume although it changed; reshard: another world size through
    # DeepSpeed's universal checkpoint, keeping the optimizer state (README: resuming).
    resume: str = "auto"
    dist_timeout_s: float = 1800.0  # a collective that waits longer ends the run with an error

    def scaled_lr(self) -> float:
        return self.optim.lr * self.global_batch / 512


@dataclass
class FinetuneConfig:
    """DR grading on labelled shards (ssit-dist finetune). Sources are FOLDER or FOLDER:SPLIT."""

    out: str = "runs/finetune"
    train: str = "shards/graded:train"
    val: str | None = None  # default: the train folder's val split
    test: str | None = None  # default: the train folder's test split, if it has one
    init: str = "random"  # an export .safetensors, a reference checkpoint, timm weights, or "random"
    arch: str | None = None  # default: the export's, else vit_small_patch16_224
    timm_kwargs: dict[str, Any] | None = None
    trust_pickle: bool = False  # allow unpickling a reference epoch_N.pt module
    img_size: int = 384
    objective: str = "regression"  # regression (MSE + thresholds) or classification (cross-entropy)
    num_classes: int = 5
    linear: bool = False  # frozen encoder, linear head only
    epochs: int = 25
    batch: int = 16  # global; per process and step it is batch / (processes x grad_accumulation)
    grad_accumulation: int = 1
    lr: float | None = None  # default 2e-5, linear probe 0.002
    weight_decay: float | None = None  # default 1e-5, linear probe 0
    warmup_epochs: float = 0.0
    mixed_precision: str = "no"  # no | bf16 | fp16 (through Accelerate)
    select_by: str = "qwk"  # best checkpoint by validation qwk or accuracy
    workers: int = 2
    eval_batch: int = 64
    seed: int = 0
    clip_grad: float | None = 1.0  # max gradient norm, as the reference's fine-tuning; None: no clipping
    resume: str = "auto"  # auto: resume an unchanged run in `out`, refuse a changed one; force
    dist_timeout_s: float = 1800.0  # a collective that waits longer ends the run with an error

    def check(self) -> None:
        choices = {"objective": ("regression", "classification"), "mixed_precision": ("no", "bf16", "fp16"),
                   "select_by": ("qwk", "accuracy"), "resume": ("auto", "force")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} = {getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        if self.dist_timeout_s <= 0:
            raise ConfigError(f"dist_timeout_s = {self.dist_timeout_s}: must be positive (seconds)")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError(f"clip_grad = {self.clip_grad}: must be positive, or null for no clipping")
        if self.num_classes < 2:
            raise ConfigError(f"num_classes = {self.num_classes}: need at least 2 grades")

    @property
    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (0.002 if self.linear else 2e-5)

    @property
    def resolved_weight_decay(self) -> float:
        return self.weight_decay if self.weight_decay is not None else (0.0 if self.linear else 1e-5)


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    """Dataclass `cls` from a dict, recursively, naming any unknown or mistyped field."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"unknown field {where}{key} (known: {', '.join(known)})")
        f = known[key]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key} must be a section (a mapping), not {value!r}")
            kwargs[key] = _build(type(default), value, f"{where}{key}.")
            continue
        expected = type(default)
        if value is None and "None" in str(f.type):
            kwargs[key] = value
            continue
        if default is not None and not isinstance(value, expected) and not (expected is float and isinstance(value, int)):
            raise ConfigError(f"{where}{key} = {value!r}: expected {expected.__name__}")
        kwargs[key] = value
    return cls(**kwargs)


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


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
    target[leaf] = _parse_value(text)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, kind: type = PretrainConfig) -> Any:
    """A `kind` (PretrainConfig or FinetuneConfig) from a YAML/JSON file plus `a.b=value` overrides."""
    values: dict[str, Any] = {}
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        text = path.read_text()
        values = (json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{path} must hold a mapping of sections and fields")
    for override in overrides or []:
        apply_override(values, override)
    cfg = _build(kind, values, "")
    if isinstance(cfg, FinetuneConfig):
        cfg.check()
        return cfg
    cfg.model.check()
    choices = {"resume": (cfg.resume, ("auto", "force", "reshard")), "data.verify": (cfg.data.verify, ("size", "sha256", "none"))}
    for name, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{name} = {value!r}: expected one of {', '.join(allowed)}")
    for name, value in (("dist_timeout_s", cfg.dist_timeout_s), ("data.empty_timeout_s", cfg.data.empty_timeout_s)):
        if value <= 0:
            raise ConfigError(f"{name} = {value}: must be positive (seconds)")
    for name in ("mean", "std"):
        value = getattr(cfg.data, name)
        if value is not None and (len(value) != 3 or not all(isinstance(v, (int, float)) for v in value)):
            raise ConfigError(f"data.{name} = {value!r}: expected three numbers (R, G, B in [0, 1])")
    return cfg


def save_config(cfg: Any, run_dir: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
    tmp.replace(path)
    return path


def batch_layout(global_batch: int, world: int, micro_batch: int | None) -> tuple[int, int]:
    """(micro batch per rank, gradient accumulation steps) with micro * accumulation * world = global."""
    if global_batch % world:
        raise ConfigError(f"global_batch {global_batch} is not divisible by the world size {world}")
    per_rank = global_batch // world
    micro = micro_batch or per_rank
    if per_rank % micro:
        raise ConfigError(f"micro_batch {micro} does not divide the per-rank batch {per_rank} "
                          f"(global_batch {global_batch} over {world} ranks)")
    if micro < 2:
        raise ConfigError(f"micro_batch {micro}: BatchNorm in the projector needs at least 2 samples per rank")
    return micro, per_rank // micro


DEEPSPEED_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping",
    "optimizer", "scheduler", "fp16", "bf16", "zero_optimization", "steps_per_print", "wall_clock_breakdown",
    "activation_checkpointing", "torch_autocast", "communication_data_type", "prescale_gradients",
    "gradient_predivide_factor", "zero_allow_untested_optimizer", "flops_profiler", "compile", "data_types",
    "checkpoint", "tensorboard", "comms_logger", "seq_parallel_communication_data_type", "dump_state",
}


def deepspeed_config(path: str | Path, cfg: PretrainConfig, world: int) -> dict[str, Any]:
    """Load a ds_configs/ JSON, check its keys, and fill its "auto" fields from `cfg`."""
    path = Path(path)
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
    fills = {"train_batch_size": cfg.global_batch, "train_micro_batch_size_per_gpu": micro,
             "gradient_accumulation_steps": accumulation, "gradient_clipping": cfg.optim.clip_grad}
    for key, value in fills.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ConfigError(f"ds_config {path}: {key} is {ds[key]} but the run config gives {value}; set it to \"auto\"")
    params = ds.get("optimizer", {}).get("params", {})
    for key, value in (("lr", cfg.scaled_lr()), ("weight_decay", cfg.optim.weight_decay)):
        if params.get(key) == "auto":
            params[key] = value
    return ds
