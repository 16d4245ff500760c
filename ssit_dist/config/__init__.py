"""Run configuration, in four parts: the checked config classes (schema.py), reading files and overrides
(loading.py), their JSON Schema (json_schema.py), and the DeepSpeed JSON filled from a run config
(deepspeed.py).

`from ssit_dist.config import PretrainConfig, load_config, ...` reaches all four.
"""

from ssit_dist.config.deepspeed import deepspeed_config
from ssit_dist.config.json_schema import json_schema
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
from ssit_dist.configclass import ConfigError
from ssit_dist.data.loading.batch_layout import batch_layout

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
    "json_schema",
    "load_config",
    "save_config",
    "shipped_ds_config",
]
