"""An encoder or a DR grader as a folder that timm loads as it is:
`timm.create_model("local-dir:FOLDER", pretrained=True)`.

The layout the Hugging Face Hub uses for timm models, so the same folder can be uploaded as it is:
    config.json        architecture, num_classes, model_args (img_size and the timm overrides that
                       rebuild it; a grader's global_pool), pretrained_cfg (input size, mean/std of the
                       photographs it was trained on, interpolation, crop 1.0), and under "ssit_dist"
                       ssit-dist's own description: the encoder's (models/encoder_meta.py, which
                       `load_encoder` reads back) or the grader's (models/grader_files.py `open_grader`);
    model.safetensors  the weights, timm key names: an encoder without classifier, a grader with head.*;
    README.md          the model card (written by the caller from the run).
The folder appears whole or not at all: it is written beside its final name and renamed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch

from ssit_dist import atomic
from ssit_dist.models.encoder_meta import EncoderMeta

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CARD = "README.md"


def timm_config(meta: EncoderMeta) -> dict:
    """config.json: what timm rebuilds the encoder from, and ssit-dist's own description beside."""
    size = meta.img_size
    return {
        "architecture": meta.arch,
        "num_classes": 0,
        "num_features": None,
        "model_args": {"img_size": size, **meta.timm_kwargs},
        "pretrained_cfg": {
            "input_size": [3, size, size],
            "fixed_input_size": True,
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": meta.mean,
            "std": meta.std,
            "num_classes": 0,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
        "ssit_dist": meta.to_json(),
    }


def grader_timm_config(meta: dict[str, Any], embed_dim: int) -> dict:
    """config.json of a grader (its JSON as models/grader_files.py GraderInfo.to_json gives it): a timm
    classifier with the grader's pooling and head, preprocessed as fine-tuning evaluated (eval_transform:
    a bilinear, antialiased resize of the whole square crop to img_size)."""
    pool = meta["pool"]
    if pool not in ("token", "avg"):
        raise ValueError(f"pool {pool!r}: timm pools token or avg")
    size, outputs = meta["img_size"], 1 if meta["objective"] == "regression" else meta["num_classes"]
    return {
        "architecture": meta["arch"],
        "num_classes": outputs,
        "num_features": embed_dim,
        "global_pool": pool,
        # fc_norm=False: the final norm before the pooling, as the grader was trained (timm's avg default
        # moves it after the pooling).
        "model_args": {"img_size": size, **meta["timm_kwargs"], "global_pool": pool}
        | ({"fc_norm": False} if pool == "avg" else {}),
        "pretrained_cfg": {
            "input_size": [3, size, size],
            "fixed_input_size": True,
            "interpolation": "bilinear",
            "crop_pct": 1.0,
            "crop_mode": "center",
            "mean": meta["mean"],
            "std": meta["std"],
            "num_classes": outputs,
            "pool_size": None,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
        "ssit_dist": meta,
    }


def save_timm_folder(folder: Path, state: dict[str, torch.Tensor], config: dict, card: str) -> Path:
    """Write the folder (weights, config.json from `timm_config` or `grader_timm_config`, README.md)
    under a temporary name, then rename it."""
    from safetensors.torch import save_file

    tmp = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
    (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    (tmp / CARD).write_text(card)
    atomic.replace_folder(tmp, folder)  # synced, then renamed: whole or absent
    return folder


def is_timm_folder(path: Path) -> bool:
    return path.is_dir() and (path / CONFIG).is_file()


def read_timm_folder(folder: Path) -> tuple[dict[str, torch.Tensor], EncoderMeta]:
    """The weights and the encoder description of a folder: ssit-dist's own, or, for a timm folder from
    elsewhere, the architecture, model_args and mean/std of its config.json."""
    from safetensors.torch import load_file

    config = json.loads((folder / CONFIG).read_text())
    if not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder / WEIGHTS} not found: a timm folder holds its weights as {WEIGHTS}")
    if "ssit_dist" in config:
        meta = EncoderMeta.from_json(config["ssit_dist"], str(folder / CONFIG))
    else:
        args = dict(config.get("model_args") or {})
        pretrained = config.get("pretrained_cfg") or {}
        size = int(args.pop("img_size", (pretrained.get("input_size") or [3, 224, 224])[-1]))
        body = {"arch": config["architecture"], "img_size": size, "timm_kwargs": args}
        meta = EncoderMeta.from_json(body | {k: pretrained[k] for k in ("mean", "std") if k in pretrained}, str(folder))
    return load_file(str(folder / WEIGHTS)), meta
