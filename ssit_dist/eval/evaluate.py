"""`ssit-dist evaluate`: what an encoder's frozen features know about DR grades, with honest uncertainty.

Every labelled photograph of the given shard folders (every split: the protocol makes its own folds) goes
through each encoder once, in eval mode; its CLS features, and the two floors computed from the pixels
alone (floors.py), are judged by crossval.py: patient-grouped, grade-stratified cross-validation of a kNN
and a logistic-probe read-out with hyper-parameters chosen inside the training folds, patient-bootstrap
intervals, each encoder's paired difference to the others and to the floors, and the chance floor (the
grade mix alone). Patients come from the shards (packed with `ssit-dist shard --group-by patient`); a
photograph packed without one is its own patient. Made for small labelled sets (IDRiD has 516
photographs), where a single split's number says little.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass as plain_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from ssit_dist.eval.crossval import Protocol, evaluate_features

if TYPE_CHECKING:  # torch and the data stack load when features are computed: `--help` reads the config
    import torch
    from accelerate import Accelerator
    from timm.models.vision_transformer import VisionTransformer


@dataclass(config=ConfigDict(extra="forbid"), kw_only=True)
class EvaluateConfig(Protocol):
    """What `ssit-dist evaluate` judges, on what, and how (the protocol's fields are crossval.Protocol's)."""

    encoders: list[str] = Field(
        min_length=1,
        description="encoders: an export .safetensors, a timm folder, a reference checkpoint, timm weights, or random",
    )
    data: list[str] = Field(min_length=1, description="labelled shard folders; every split of each is evaluated")
    img_size: int | None = Field(
        default=None, gt=0, description="input size in pixels (default: the export's own, else 224)"
    )
    arch: str | None = Field(default=None, description="the timm architecture (default: the export's)")
    timm_kwargs: dict[str, Any] | None = Field(default=None, description="overrides of the timm model's arguments")
    trust_pickle: bool = Field(default=False, description="allow a pickled epoch_N.pt (runs its code)")
    batch: int = Field(default=64, ge=1, description="images per encoder forward")
    floors: bool = Field(default=True, description="also judge the pixel floors (colour histogram, 16x16 thumbnail)")
    save_features: str | None = Field(default=None, description="also write the features as an .npz (features_file.py)")

    def protocol(self) -> Protocol:
        return Protocol(**{name: getattr(self, name) for name in Protocol.__dataclass_fields__})


@plain_dataclass
class Photographs:
    """Every labelled photograph of the folders, in shard order: key (FOLDER/sample key), grade, patient
    (FOLDER/group, None where the shards carry none) and, where asked for, the pixel floors' features."""

    keys: list[str]
    grades: list[int]
    patients: list[str | None]
    floors: dict[str, list[np.ndarray]]


def labelled_photographs(folders: list[Path], num_classes: int, floors: bool) -> Photographs:
    """The grades, patients and floors of every split of every folder, read from the shards themselves."""
    from ssit_dist.data.index import read_index
    from ssit_dist.data.loading.labelled import SplitSource, check_labels
    from ssit_dist.eval.floors import FLOORS

    found = Photographs([], [], [], {name: [] for name in FLOORS} if floors else {})
    for folder in folders:
        for split in read_index(folder).splits:
            for shard in check_labels(SplitSource(folder, split), num_classes).shard_paths(folder, split):
                _read_shard(shard, folder.name, found)
    return found


def _read_shard(shard: Path, prefix: str, found: Photographs) -> None:
    """Append each sample of one shard to `found` (members of a sample are adjacent, as the packer writes)."""
    from ssit_dist.eval.floors import floor_features

    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(shard) as tar:
        for member in tar:
            key, _, ext = member.name.partition(".")
            if ext in ("cls", "json") or (ext == "jpg" and found.floors):
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    for key, members in samples.items():
        found.keys.append(f"{prefix}/{key}")
        found.grades.append(int(members["cls"]))
        group = json.loads(members.get("json", b"{}")).get("group")
        found.patients.append(f"{prefix}/{group}" if group is not None else None)
        if found.floors:
            for name, row in floor_features(members["jpg"]).items():
                found.floors[name].append(row)


def evaluate_encoders(config: EvaluateConfig) -> dict[str, Any]:
    """Frozen features of every encoder of `config` on every labelled photograph of `config.data`, and
    crossval.py's report on them beside the floors: see the module docstring. JSON-ready."""
    import torch
    from accelerate import Accelerator

    from ssit_dist.data.index import ShardIndexError

    folders = [Path(folder) for folder in config.data]
    photos = labelled_photographs(folders, config.num_classes, config.floors)
    if not photos.keys:
        raise ShardIndexError(f"{', '.join(config.data)}: no labelled photographs to evaluate")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    features, encoders, lost = {}, {}, set()
    for name, init in _method_names(config.encoders).items():
        got, encoders[name] = _encoder_features(config, init, folders, accelerator)
        index = {key: i for i, key in enumerate(got.keys)}
        lost |= set(got.missing)
        features[name] = (got.features, index)
    kept = [i for i, key in enumerate(photos.keys) if key not in lost]
    methods = {name: x[[index[photos.keys[i]] for i in kept]] for name, (x, index) in features.items()}
    methods |= {name: np.stack(rows)[kept] for name, rows in photos.floors.items()}
    if config.save_features:
        from ssit_dist.eval.features_file import save_features

        save_features(config.save_features, [photos.keys[i] for i in kept], methods)
    encoder_names = list(encoders)
    pairs = [(a, b) for i, a in enumerate(encoder_names) for b in encoder_names[i + 1 :]]
    pairs += [(a, floor) for a in encoder_names for floor in photos.floors]
    grades = [photos.grades[i] for i in kept]
    report = evaluate_features(methods, grades, [photos.patients[i] for i in kept], pairs, config.protocol())
    return {"data": config.data, "encoders": encoders, "missing": sorted(lost), **report}


def _method_names(inits: list[str]) -> dict[str, str]:
    """{name in the report: encoder}: the file's stem ("random" for a random init), numbered if repeated."""
    names: dict[str, str] = {}
    for i, init in enumerate(inits):
        stem = "random" if init == "random" else Path(init).stem
        names[stem if stem not in names else f"{stem}_{i}"] = init
    return names


def _encoder_features(
    config: EvaluateConfig, init: str, folders: list[Path], accelerator: Accelerator
) -> tuple[FrozenFeatures, dict[str, Any]]:
    """(FrozenFeatures of one encoder, what it was): at the export's own size and normalisation where it
    carries them, else at 224 px (or `img_size`) with the first folder's mean/std."""
    from ssit_dist.data.index import read_index
    from ssit_dist.models.pretrained import load_encoder

    meta = _export_meta(init)
    img_size = config.img_size or (meta["img_size"] if meta else 224)
    stats = read_index(folders[0])
    mean, std = (meta["mean"], meta["std"]) if meta and meta.get("mean") else (stats.mean, stats.std)
    encoder, source = load_encoder(init, img_size, config.arch, config.timm_kwargs, config.trust_pickle)
    got = frozen_features(encoder, folders, img_size, mean, std, accelerator, config.batch)
    return got, {"init": init, "kind": source.kind, "arch": source.arch, "img_size": img_size, "mean": mean, "std": std}


def _export_meta(init: str) -> dict[str, Any] | None:
    """The description `ssit-dist export` writes beside an encoder (OUT.json), where there is one."""
    description = Path(init).with_suffix(".json")
    if init == "random" or Path(init).suffix != ".safetensors" or not description.is_file():
        return None
    return json.loads(description.read_text())


@plain_dataclass(frozen=True)
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
    pretraining data's, as the encoder saw it). Rows are keyed FOLDER_NAME/sample key, the names a
    features file (features_file.py) carries; a photograph that did not decode has no row and is named in
    `missing`."""
    from ssit_dist.data.index import read_index
    from ssit_dist.data.loading.grading_transforms import eval_transform
    from ssit_dist.data.loading.labelled import LabelledShards, SplitSource
    from ssit_dist.eval.over_split import missing, run_over_split

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
