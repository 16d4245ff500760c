"""Run configuration: files, overrides, batch layout and DeepSpeed config filling, with named errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ssit_dist.config import ConfigError, PretrainConfig, batch_layout, deepspeed_config, load_config, save_config
from ssit_dist.train.schedule import learning_rate, saliency_weight

DS = Path(__file__).resolve().parents[1] / "ds_configs"


def test_yaml_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"global_batch": 64, "optim": {"lr": 5e-4}, "model": {"arch": "vit_base_patch16_224"}}))
    cfg = load_config(path, ["optim.warmup_epochs=2", "data.shards=[a, b]", "model.timm_kwargs={depth: 2}"])
    assert cfg.global_batch == 64 and cfg.optim.lr == 5e-4 and cfg.optim.warmup_epochs == 2
    assert cfg.data.shards == ["a", "b"] and cfg.model.arch == "vit_base_patch16_224"
    assert cfg.model.timm_kwargs == {"depth": 2}
    assert cfg.scaled_lr() == pytest.approx(5e-4 * 64 / 512)
    saved = save_config(cfg, tmp_path / "run")
    assert load_config(saved) == cfg


def test_unknown_and_mistyped_fields_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown field optim\.learning_rate"):
        load_config(None, ["optim.learning_rate=1"])
    with pytest.raises(ConfigError, match=r"global_batch = 'many': expected int"):
        load_config(None, ["global_batch=many"])
    with pytest.raises(ConfigError, match="not FIELD=VALUE"):
        load_config(None, ["optim.lr"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="mask_ratio"):
        load_config(None, ["model.mask_ratio=1.5"])


def test_batch_layout() -> None:
    assert batch_layout(512, 8, None) == (64, 1)
    assert batch_layout(512, 8, 16) == (16, 4)
    with pytest.raises(ConfigError, match="global_batch 10 is not divisible by the world size 4"):
        batch_layout(10, 4, None)
    with pytest.raises(ConfigError, match="micro_batch 3 does not divide the per-rank batch 8"):
        batch_layout(16, 2, 3)
    with pytest.raises(ConfigError, match="at least 2"):
        batch_layout(4, 4, None)


@pytest.mark.parametrize("name", sorted(p.name for p in DS.glob("*.json")))
def test_every_shipped_ds_config_fills(name: str) -> None:
    cfg = PretrainConfig(global_batch=32, micro_batch=4)
    ds = deepspeed_config(DS / name, cfg, world=2)
    assert ds["train_batch_size"] == 32 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4 and ds["gradient_clipping"] == 1.0
    assert ds["optimizer"]["params"]["lr"] == pytest.approx(1e-3 * 32 / 512)
    assert "auto" not in json.dumps(ds)


def test_bad_ds_configs_fail_fast_naming_the_key(tmp_path: Path) -> None:
    cfg = PretrainConfig(global_batch=32)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimisation": {"stage": 2}}))
    with pytest.raises(ConfigError, match="unknown key 'zero_optimisation'"):
        deepspeed_config(bad, cfg, 2)
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2, "bogus": 1}}))
    with pytest.raises(ConfigError, match="bogus"):
        deepspeed_config(bad, cfg, 2)
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}}))
    with pytest.raises(ConfigError, match="offload_param needs stage 3"):
        deepspeed_config(bad, cfg, 2)
    bad.write_text(json.dumps({"train_batch_size": 64}))
    with pytest.raises(ConfigError, match="train_batch_size is 64 but the run config gives 32"):
        deepspeed_config(bad, cfg, 2)
    with pytest.raises(ConfigError, match="ds_config .* not found"):
        deepspeed_config(tmp_path / "nope.json", cfg, 2)


def test_schedules() -> None:
    assert learning_rate(0, 1.0, 10, 100) == 0 and learning_rate(5, 1.0, 10, 100) == pytest.approx(0.5)
    assert learning_rate(10, 1.0, 10, 100) == pytest.approx(1.0)
    assert learning_rate(55, 1.0, 10, 100) == pytest.approx(0.5)
    assert learning_rate(100, 1.0, 10, 100, min_lr=0.1) == pytest.approx(0.1)
    assert saliency_weight(50, 100, 10) == 10 and saliency_weight(50, 100, 10, True) == pytest.approx(5)
