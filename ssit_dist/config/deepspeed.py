"""The DeepSpeed side of a pretraining run: the ds_configs/ JSON checked and filled from the run config
(the batch layout over the ranks from data/loading/batch_layout.py). Its batch, lr and weight-decay
fields are "auto" and filled here, so the two never disagree.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ssit_dist.config.loading import shipped_ds_config
from ssit_dist.config.schema import PretrainConfig
from ssit_dist.configclass import ConfigError
from ssit_dist.data.loading.batch_layout import batch_layout

log = logging.getLogger(__name__)


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
    "timers",
}

# DeepSpeed's throughput timer syncs the device at the start and end of every micro-batch (from the
# second step on) unless the config turns it off; the run measures its own throughput without syncing
# (metrics.jsonl). Off unless a config asks for it.


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
    _check_timers(path, ds)
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


def _check_timers(path: Path, ds: dict[str, Any]) -> None:
    """`timers` checked as DeepSpeed reads it (only `throughput`, with its own fields), and filled with
    the timer off where the config does not mention it."""
    timers = ds.setdefault("timers", {"throughput": {"enabled": False}})
    if not isinstance(timers, dict) or set(timers) - {"throughput"}:
        raise ConfigError(f'ds_config {path}: timers must be {{"throughput": {{...}}}}, got {timers!r}')
    try:
        from deepspeed.utils.config import get_timers_config

        throughput = get_timers_config(ds)
    except Exception as e:  # pydantic's ValidationError names the offending key
        raise ConfigError(f"ds_config {path}: timers.throughput: {' '.join(str(e).split()[:12])}") from None
    if throughput.enabled and throughput.synchronized:
        log.warning(
            "ds_config %s turns DeepSpeed's throughput timer on: it syncs the device twice per micro-batch "
            '(GPU idle while the host prepares the next one); "timers": {"throughput": {"enabled": false}} '
            "turns it off, metrics.jsonl measures throughput without it",
            path,
        )
