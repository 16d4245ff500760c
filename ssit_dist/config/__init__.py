"""Run configuration, in four parts: the checked config classes (schema.py), reading files and overrides
(loading.py), their JSON Schema (editor_schema.py), and the DeepSpeed JSON filled from a run config
(deepspeed.py).

`from ssit_dist.config import PretrainConfig, load_config, ...` reaches all four. Each name imports its
part when first asked for: the config classes import the model (timm, torch), which a command that only
reads a config of its own (`ssit-dist shard`) should not wait seconds for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ssit_dist.config.deepspeed import deepspeed_config
    from ssit_dist.config.editor_schema import json_schema
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

_HOME = {
    "deepspeed_config": "ssit_dist.config.deepspeed",
    "json_schema": "ssit_dist.config.editor_schema",
    **dict.fromkeys(
        ("DS_CONFIGS", "RUN_CONFIGS", "load_config", "save_config", "shipped_ds_config"), "ssit_dist.config.loading"
    ),
    **dict.fromkeys(
        (
            "AugmentConfig",
            "DataConfig",
            "FinetuneConfig",
            "LossConfig",
            "ModelConfig",
            "OptimConfig",
            "PretrainConfig",
            "RetrievalConfig",
            "SegmentConfig",
        ),
        "ssit_dist.config.schema",
    ),
    "ConfigError": "ssit_dist.configclass",
    "batch_layout": "ssit_dist.data.loading.batch_layout",
}
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


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(_HOME[name]), name)
    return value
