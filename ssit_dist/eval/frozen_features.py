"""Frozen CLS features of every photograph in labelled shard folders, one row per photograph.

The evaluations that judge an encoder by its features (the cross-validated probes of eval/crossval.py,
on this CPU or from the GPU run) need one matrix over all graded photographs, whatever split each was
packed into. Rows are keyed `FOLDER_NAME/sample key`, the names a features file (eval/features_file.py)
carries; a photograph that did not decode has no row and is named in `missing`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from timm.models.vision_transformer import VisionTransformer

from ssit_dist.data.index import read_index
from ssit_dist.data.loading.grading_transforms import eval_transform
from ssit_dist.data.loading.labelled import LabelledShards, SplitSource
from ssit_dist.eval.predict import missing, run_over_split


@dataclass(frozen=True)
class FrozenFeatures:
    keys: list[str]  # FOLDER_NAME/sample key, in folder order, then split order, then shard order
    features: np.ndarray  # (len(keys), width) float32
    missing: list[str]  # keys of photographs that did not decode


def frozen_features(
    encoder: VisionTransformer,
    folders: list[Path],
    img_size: int,
    mean: list[float],
    std: list[float],
    accelerator: Accelerator,
    batch_size: int = 64,
) -> FrozenFeatures:
    """The CLS token of `encoder` (in eval mode, under `accelerator`'s autocast) for every sample of every
    split of each labelled shard folder, resized to `img_size` and normalised with `mean`/`std` (give the
    pretraining data's, as the encoder saw it)."""
    encoder.to(accelerator.device).eval()
    transform = eval_transform(img_size, mean, std)

    def embed(x: torch.Tensor) -> torch.Tensor:
        with accelerator.autocast():
            return encoder.forward_features(x)[:, 0]

    keys: list[str] = []
    rows: list[np.ndarray] = []
    lost: list[str] = []
    for folder in folders:
        for split in read_index(folder).splits:
            data = LabelledShards(SplitSource(folder, split), transform)
            indices, features = run_over_split(embed, data, accelerator, batch_size)
            keys += [f"{folder.name}/{data.keys[i]}" for i in indices]
            rows += list(features)
            lost += [f"{folder.name}/{key}" for key in missing(data, indices)]
    width = rows[0].shape[0] if rows else 0
    return FrozenFeatures(keys, np.stack(rows) if rows else np.zeros((0, width), np.float32), lost)
