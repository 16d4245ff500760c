"""Tiny pretraining runs for the trainer tests: run and DeepSpeed configs, and launches of the real
trainer (launch/pretrain.py) under torchrun on CPU ranks; comparisons of two runs' weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from ssit_dist.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def ds_config(tmp: Path, stage: int, bf16: bool = False, eps: float = 1e-8) -> Path:
    path = tmp / f"zero{stage}{'_bf16' if bf16 else ''}_eps{eps:g}.json"
    body = {
        "train_batch_size": "auto",
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": 1.0,
        "steps_per_print": 10**6,
        "zero_optimization": {"stage": stage},
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True, "eps": eps},
        },
    }
    if bf16:
        body["bf16"] = {"enabled": True}
    path.write_text(json.dumps(body))
    return path


def config(tmp: Path, shards: Path, name: str, ds: Path, **extra: object) -> Path:
    body = {
        "run_dir": str(tmp / name),
        "ds_config": str(ds),
        "global_batch": 8,
        "micro_batch": 2,
        "epochs": 2,
        "steps_per_epoch": 4,
        "checkpoint_every": 2,
        "log_every": 2,  # the losses are read every other step: the sync points are what these tests stop at
        "keep_checkpoints": 4,
        "seed": 3,
        "model": {
            "arch": "vit_small_patch16_224",
            "img_size": 32,
            "proj_hidden": 64,
            "proj_dim": 32,
            "timm_kwargs": {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3},
        },
        # No loader workers unless a test is about them (stopping, resuming after a kill, SLURM): each
        # rank's forkserver costs a second or two of imports, the workers more each epoch.
        "data": {"shards": [str(shards)], "workers": 0, "shuffle_buffer": 16},
        "optim": {"warmup_epochs": 0.5, "lr": 0.005},
    }
    for key, value in extra.items():
        section, _, field = key.partition("__")
        (body.setdefault(section, {}) if field else body)[field or section] = value
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def torchrun(cfg: Path, nproc: int = 2) -> list[str]:
    return [
        str(TORCHRUN),
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        str(ROOT / "launch" / "pretrain.py"),
        "--config",
        str(cfg),
    ]


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    e["OMP_NUM_THREADS"] = "1"
    return e


def train(cfg: Path, nproc: int = 2) -> list[dict]:
    result = subprocess.run(torchrun(cfg, nproc), capture_output=True, text=True, timeout=300, env=env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = Path(yaml.safe_load(cfg.read_text())["run_dir"])
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def launch(cfg: Path, *overrides: str, nproc: int = 2, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        torchrun(cfg, nproc) + list(overrides), capture_output=True, text=True, timeout=timeout, env=env()
    )


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def short(tmp: Path, shards: Path, name: str, **extra: object) -> Path:
    body = {"epochs": 1, "steps_per_epoch": 2, "checkpoint_every": 1, "dist_timeout_s": 60, **extra}
    return config(tmp, shards, name, ds_config(tmp, 2), **body)


def assert_same_encoders(tmp: Path, a: str, b: str) -> None:
    """`ssit-dist export` of the run folders tmp/a and tmp/b give bit-identical encoders."""
    from safetensors.torch import load_file

    from ssit_dist.train.export import export_encoder

    weights = []
    for name in (a, b):
        export_encoder(tmp / name, tmp / f"{name}_export" / "encoder", None, False, "query", "files")
        weights.append(load_file(str(tmp / f"{name}_export" / "encoder.safetensors")))
    assert_same_weights(*weights)


def assert_same_weights(a: dict, b: dict) -> None:
    """Two state dicts with the same keys and bit-identical tensors."""
    import torch

    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
