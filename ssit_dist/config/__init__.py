"""Run configuration, in three parts: the typed dataclasses (schema.py), reading files and overrides
(loading.py), and the DeepSpeed JSON filled from a run config (deepspeed.py).

`from ssit_dist.config import PretrainConfig, load_config, ...` reaches all three.
"""

from ssit_dist.config.deepspeed import batch_layout, deepspeed_config
from ssit_dist.config.loading import DS_CONFIGS, RUN_CONFIGS, load_config, save_config, shipped_ds_config
from ssit_dist.config.schema import (
    AugmentConfig,
    DataConfig,
    FinetuneConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    PretrainConfig,
    RetrievalConfig,
    SegmentConfig,
)
from ssit_dist.fields import ConfigError

__all__ = [
    "DS_CONFIGS",
    "RUN_CONFIGS",
    "AugmentConfig",
    "ConfigError",
    "DataConfig",
    "FinetuneConfig",
    "LossConfig",
    "ModelConfig",
    "OptimConfig",
    "PretrainConfig",
    "RetrievalConfig",
    "SegmentConfig",
    "batch_layout",
    "deepspeed_config",
    "load_config",
    "save_config",
    "shipped_ds_config",
]
