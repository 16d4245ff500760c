"""What a pretraining run reads, checked before any engine is built (`check_inputs`, the first thing every
rank of the trainer runs): each wrong field, file or DeepSpeed key stops the run with an error naming it.
In one process on real shards; test_pretrain.py pins that the trainer exits 2 with the message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from imports import heavy_imports_after
from ssit_dist.config import ConfigError, load_config
from ssit_dist.data.index import ShardIndexError
from ssit_dist.train.pretrain_inputs import check_inputs
from tiny_runs import config, ds_config


def refused(cfg: Path, error: type[Exception] = ConfigError) -> str:
    with pytest.raises(error) as caught:
        check_inputs(load_config(cfg), world=2)
    return str(caught.value)


def test_a_good_config_passes_with_the_shards_statistics(shards: Path, tmp_path: Path) -> None:
    inputs = check_inputs(load_config(config(tmp_path, shards, "good", ds_config(tmp_path, 0))), world=2)
    index = json.loads((shards / "_info.json").read_text())
    assert (inputs.micro, inputs.accumulation) == (2, 2)  # global batch 8 over 2 ranks in micro batches of 2
    assert inputs.mean == index["mean"] and inputs.std == index["std"]
    assert inputs.shards.num_samples == 24 and inputs.held_out is None
    assert inputs.ds_config["train_batch_size"] == 8 and inputs.ds_config["zero_optimization"]["stage"] == 0


@pytest.mark.multiprocess
def test_the_check_the_launcher_runs_imports_no_model(shards: Path, tmp_path: Path) -> None:
    # `ssit-dist pretrain` runs check_inputs once before it starts any rank: the model side (timm, and
    # torch's compiler under it) would cost it seconds of CPU before the first rank starts.
    cfg = config(tmp_path, shards, "good", ds_config(tmp_path, 0))
    script = (
        "from ssit_dist.config import load_config\n"
        "from ssit_dist.train.pretrain_inputs import check_inputs\n"
        f"assert check_inputs(load_config({str(cfg)!r}), world=2).shards.num_samples == 24\n"
    )
    # The shards' reader and decoder, and DeepSpeed's own check of the ZeRO section; no timm.
    assert heavy_imports_after(script) == "['cv2', 'deepspeed', 'torch']"


def test_wrong_batch_shards_and_retrieval_fields_are_named(shards: Path, tmp_path: Path) -> None:
    ds = ds_config(tmp_path, 0)
    assert "global_batch 7" in refused(config(tmp_path, shards, "odd", ds, global_batch=7))
    nowhere = tmp_path / "nowhere"
    assert str(nowhere) in refused(
        config(tmp_path, shards, "missing", ds, data__shards=[str(nowhere)]), ShardIndexError
    )
    elsewhere = tmp_path / "elsewhere"
    message = refused(config(tmp_path, shards, "held_out", ds, retrieval__shards=str(elsewhere)), ShardIndexError)
    assert str(elsewhere) in message
    bare = tmp_path / "bare"  # the tars without the _info.json beside them
    bare.mkdir()
    for tar in shards.glob("train-*.tar"):
        (bare / tar.name).symlink_to(tar)
    pattern = f"{bare}/train-{{000000..000002}}.tar"
    assert "data.mean / data.std" in refused(config(tmp_path, shards, "bare", ds, data__shards=[pattern]))
    stats = {"data__mean": [0.5] * 3, "data__std": [0.25] * 3}
    counted = check_inputs(load_config(config(tmp_path, shards, "counted", ds, data__shards=[pattern], **stats)), 2)
    assert counted.shards.lengths == [8, 8, 8]  # local tars are counted from their headers
    remote = [f"pipe:cat {pattern}"]
    message = refused(config(tmp_path, shards, "uncounted", ds, data__shards=remote, **stats), ShardIndexError)
    assert "pipe:cat" in message and "sample count" in message


@pytest.mark.parametrize(
    "body, message",
    [
        ({"zero_optimization": {"stage": 3}, "fp16": {"enabled": True}, "bf16": {"enabled": True}}, "fp16 and bf16"),
        ({"zero_optimization": {"stage": 1, "offload_param": {"device": "cpu"}}}, "offload_param needs stage 3"),
        ({"zero_optimisation": {"stage": 2}}, "zero_optimisation"),
    ],
)
def test_wrong_deepspeed_configs_are_named(shards: Path, tmp_path: Path, body: dict, message: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(body))
    assert message in refused(config(tmp_path, shards, "bad", bad))


def test_the_config_file_itself_is_checked_first(shards: Path, tmp_path: Path) -> None:
    cfg = config(tmp_path, shards, "typo", ds_config(tmp_path, 0))
    body = yaml.safe_load(cfg.read_text())
    body["optim"]["learning_rate"] = 0.1
    cfg.write_text(yaml.safe_dump(body))
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(cfg)
