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

if TYPE_CHECKING:  # what mypy and editors see; at run time __getattr__ imports each on first use
    from ssit_dist.config.deepspeed import deepspeed_config as deepspeed_config
    from ssit_dist.config.editor_schema import json_schema as json_schema
    from ssit_dist.config.loading import DS_CONFIGS as DS_CONFIGS
    from ssit_dist.config.loading import RUN_CONFIGS as RUN_CONFIGS
    from ssit_dist.config.loading import load_config as load_config
    from ssit_dist.config.loading import save_config as save_config
    from ssit_dist.config.loading import shipped_ds_config as shipped_ds_config
    from ssit_dist.config.schema import AugmentConfig as AugmentConfig
    from ssit_dist.config.schema import DataConfig as DataConfig
    from ssit_dist.config.schema import FinetuneConfig as FinetuneConfig
    from ssit_dist.config.schema import LossConfig as LossConfig
    from ssit_dist.config.schema import ModelConfig as ModelConfig
    from ssit_dist.config.schema import OptimConfig as OptimConfig
    from ssit_dist.config.schema import PretrainConfig as PretrainConfig
    from ssit_dist.config.schema import RetrievalConfig as RetrievalConfig
    from ssit_dist.config.schema import SegmentConfig as SegmentConfig
    from ssit_dist.configclass import ConfigError as ConfigError
    from ssit_dist.data.loading.batch_layout import batch_layout as batch_layout

_PARTS = {
    "ssit_dist.config.deepspeed": ("deepspeed_config",),
    "ssit_dist.config.editor_schema": ("json_schema",),
    "ssit_dist.config.loading": ("DS_CONFIGS", "RUN_CONFIGS", "load_config", "save_config", "shipped_ds_config"),
    "ssit_dist.config.schema": (
        "AugmentConfig DataConfig FinetuneConfig LossConfig ModelConfig OptimConfig PretrainConfig "
        "RetrievalConfig SegmentConfig"
    ).split(),
    "ssit_dist.configclass": ("ConfigError",),
    "ssit_dist.data.loading.batch_layout": ("batch_layout",),
}
_HOME = {name: module for module, names in _PARTS.items() for name in names}
__all__ = sorted(_HOME)


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = globals()[name] = getattr(importlib.import_module(_HOME[name]), name)
    return value
