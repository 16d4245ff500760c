"""The resume fingerprint, built by one function (train/run.py) for every trainer, is the one runs on disk
already recorded: a run started before it resumes after it. The expected dictionaries are what ssit-dist
73c1bd5 (three fingerprint functions) recorded for these inputs and the default configs."""

from __future__ import annotations

from pathlib import Path

from ssit_dist.config import FinetuneConfig, PretrainConfig
from ssit_dist.data.index import ShardIndex, SplitInfo
from ssit_dist.data.loading.labelled import SplitSource
from ssit_dist.data.loading.sources import ShardSet
from ssit_dist.train.checkpoint import changed_fields
from ssit_dist.train.finetune import run_fingerprint as finetune_fingerprint
from ssit_dist.train.pretrain import run_fingerprint as pretrain_fingerprint
from ssit_dist.train.pretrain_inputs import RunInputs

RECORDED_PRETRAIN = {
    "data_order": {"piece_size": 64, "shuffle_buffer": 1000, "workers": 2},
    "ds_config": {
        "bf16": {"enabled": True},
        "gradient_accumulation_steps": 4,
        "train_batch_size": 512,
        "train_micro_batch_size_per_gpu": 64,
        "zero_optimization": {"stage": 2},
    },
    "epochs": 300,
    "global_batch": 512,
    "gradient_accumulation": 4,
    "micro_batch": 64,
    "model": {
        "arch": "vit_small_patch16_224",
        "attention": "auto",
        "compile": False,
        "grad_checkpointing": False,
        "img_size": 224,
        "init": None,
        "mask_ratio": 0.25,
        "pool": "max",
        "proj_dim": 256,
        "proj_hidden": 4096,
        "saliency": True,
        "saliency_threshold": 0.5,
        "temperature": 0.2,
        "timm_kwargs": {},
    },
    "optimizer_groups": ["encoder+projector", "predictor+saliency_head"],
    "seed": 0,
    "shards": [
        {"bytes": 1000, "samples": 64, "sha256": "ab" * 32, "url": "shards/a/train-000000.tar"},
        {"bytes": 600, "samples": 36, "sha256": "cd" * 32, "url": "shards/a/train-000001.tar"},
    ],
    "steps_per_epoch": 25,
    "world_size": 2,
}

RECORDED_FINETUNE = {
    "arch": None,
    "batch": 16,
    "clip_grad": 1.0,
    "data": {
        "train": {"sha256": ["traintraintraintraintraintraintraintrain"], "source": "shards/graded:train"},
        "val": {"sha256": ["valvalvalvalvalvalvalval"], "source": "shards/graded:val"},
    },
    "epochs": 25,
    "grad_accumulation": 1,
    "img_size": 384,
    "init": "random",
    "init_sha256": None,
    "linear": False,
    "lr": 2e-05,
    "mixed_precision": "no",
    "num_classes": 5,
    "objective": "regression",
    "processes": 2,
    "seed": 0,
    "timm_kwargs": None,
    "warmup_epochs": 0.0,
    "weight_decay": 1e-05,
}


def test_pretrainings_fingerprint_is_the_one_runs_recorded() -> None:
    paths = ["shards/a/train-000000.tar", "shards/a/train-000001.tar"]
    shards = ShardSet(paths, [64, 36], [0.5] * 3, [0.2] * 3, [1000, 600], ["ab" * 32, "cd" * 32], [None, None])
    ds_config = {
        "train_batch_size": 512,
        "train_micro_batch_size_per_gpu": 64,
        "gradient_accumulation_steps": 4,
        "zero_optimization": {"stage": 2},
        "bf16": {"enabled": True},
        "timers": {"throughput": {"enabled": True}},  # changes no number of the run: never fingerprinted
    }
    inputs = RunInputs(64, 4, ds_config, shards, [0.5] * 3, [0.2] * 3, None, 25)
    assert changed_fields(RECORDED_PRETRAIN, pretrain_fingerprint(PretrainConfig(), 2, inputs)) == []


def test_finetunings_fingerprint_is_the_one_runs_recorded() -> None:
    folder = Path("shards/graded")
    sources = {"train": SplitSource(folder, "train"), "val": SplitSource(folder, "val")}
    splits = {name: SplitInfo(name, 10, ["x.tar"], [10], [name * 8]) for name in ("train", "val")}
    index = ShardIndex("0.3", {}, splits, [0.5] * 3, [0.2] * 3)
    current = finetune_fingerprint(FinetuneConfig(), 2, sources, {"train": index, "val": index})
    assert changed_fields(RECORDED_FINETUNE, current) == []
    linear = finetune_fingerprint(FinetuneConfig(linear=True), 2, sources, {"train": index, "val": index})
    assert changed_fields(current, linear) == [
        "linear: false -> true",
        "lr: 2e-05 -> 0.002",
        "weight_decay: 1e-05 -> 0.0",
    ]
