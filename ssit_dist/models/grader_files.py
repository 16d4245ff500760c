"""Opening a DR grader in any form it is kept in, with what grading a new photograph needs.

Three forms hold a grader (models/grader.py):
    a fine-tuning run folder   RUN/best.safetensors (or final) with RUN/best.json beside it;
    a grader file              X.safetensors with X.json beside it (the same two files, moved);
    a timm grader folder       config.json + model.safetensors from `ssit-dist export --format timm`,
                               the grader's description under config.json's "ssit_dist".
`open_grader` reads each into the same Grader and GraderInfo: the model, how to preprocess a photograph
as it was packed and normalised for training, and how to read the outputs. An encoder without a grading
head (a pretraining run, an encoder export) is refused with what to do instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file

from ssit_dist.data.index import ShardIndex, ShardIndexError, read_index
from ssit_dist.data.loading.labelled import SplitSource
from ssit_dist.models.grader import Grader, load_grader, regression_cuts
from ssit_dist.models.timm_folder import CONFIG, WEIGHTS, is_timm_folder

CHECKPOINTS = ("best", "final")
FORMS = (
    "a fine-tuning run folder, a grader .safetensors (with its .json) or a folder of `ssit-dist export --format timm`"
)
# Keys of a grader's JSON that GraderInfo holds as fields; the rest is its `extra`.
FIELDS = ("arch", "timm_kwargs", "img_size", "objective", "num_classes", "pool", "mean", "std", "thresholds")


class GraderFileError(ValueError):
    """A path that holds no grader (or a broken one); the one-line message names it and what to do."""


@dataclass(frozen=True)
class GraderInfo:
    """What grading a photograph needs besides the weights, from any of the three forms."""

    arch: str
    timm_kwargs: dict[str, Any]
    img_size: int
    objective: str  # regression | classification
    num_classes: int
    pool: str  # models/grader.py POOLS
    mean: list[float]  # the training shards' normalisation
    std: list[float]
    crop_size: int  # the packing: fundus-disc crop to this side (never enlarged), then JPEG at this quality
    jpeg_quality: int
    thresholds: tuple[float, ...] | None  # regression: output cuts between grades; classification: None
    source: str  # the file or folder it was read from
    extra: dict[str, Any] = field(default_factory=dict)  # the rest of the meta: val metrics, init, epoch, ...

    @classmethod
    def from_meta(cls, meta: dict[str, Any], source: str, preprocessing: dict[str, Any]) -> GraderInfo:
        regression = meta["objective"] == "regression"
        return cls(
            arch=meta["arch"],
            timm_kwargs=dict(meta.get("timm_kwargs") or {}),
            img_size=int(meta["img_size"]),
            objective=meta["objective"],
            num_classes=int(meta["num_classes"]),
            pool=meta.get("pool", "cls+avg"),  # runs from before the choice pooled cls+avg
            mean=list(meta["mean"]),
            std=list(meta["std"]),
            crop_size=int(preprocessing["size"]),
            jpeg_quality=int(preprocessing["quality"]),
            thresholds=tuple(meta.get("thresholds") or regression_cuts(int(meta["num_classes"])))
            if regression
            else None,
            source=source,
            extra={k: v for k, v in meta.items() if k not in FIELDS},
        )

    def to_json(self) -> dict[str, Any]:
        """The grader's JSON (as fine-tuning writes it), complete even where the run's lacked the pooling,
        thresholds or preprocessing (older runs): what an export writes beside the weights."""
        fields = {name: getattr(self, name) for name in FIELDS if name != "thresholds"}
        thresholds = {"thresholds": list(self.thresholds)} if self.thresholds is not None else {}
        preprocessing = {"crop": "fundus_disc", "size": self.crop_size, "quality": self.jpeg_quality}
        return {**fields, **thresholds, **self.extra, "preprocessing": preprocessing}


def packing_preprocessing(index: ShardIndex, where: str = "the training shards") -> dict[str, Any]:
    """The preprocessing shards were packed with (_info.json's parameters), as a grader's meta records it."""
    params = index.parameters
    missing = [k for k in ("size", "quality") if k not in params]
    if missing:
        raise ShardIndexError(f"{where}: the index records no {' or '.join(missing)} of the packing")
    return {"crop": "fundus_disc", "size": int(params["size"]), "quality": int(params["quality"])}


def open_grader(path: Path, checkpoint: str = "best") -> tuple[Grader, GraderInfo]:
    """The grader at `path` (in eval mode) and its description. `checkpoint` (best or final) picks the
    weights of a run folder; the other forms hold one set."""
    path = Path(path)
    if not path.exists():
        raise GraderFileError(f"model {path} not found: give {FORMS}")
    if is_timm_folder(path):
        return _open_timm_folder(path)
    if path.is_dir():
        return _open_files(_run_weights(path, checkpoint))
    if path.suffix in (".safetensors", ".json"):
        return _open_files(path.with_suffix(".safetensors"))
    raise GraderFileError(f"{path} is not a grader: give {FORMS}")


def is_finetuning_run(folder: Path) -> bool:
    """A run folder of `ssit-dist finetune`: grader weights kept, or its config.yaml a fine-tuning one
    (a run that has not finished an epoch yet)."""
    kept = any((folder / f"{name}.safetensors").is_file() for name in CHECKPOINTS)
    return folder.is_dir() and (kept or "objective" in _run_config(folder))


def no_head(path: Path, pretraining_run: bool = False) -> GraderFileError:
    """The refusal of an encoder export or a pretraining run, with the steps that make it a grader."""
    if pretraining_run:
        steps = f"export it (`ssit-dist export {path} -o ENC`), then `ssit-dist finetune --init ENC.safetensors`"
    else:
        steps = f"fine-tune it first with `ssit-dist finetune --init {path}`"
    return GraderFileError(f"{path} holds an encoder without a grading head: {steps}; then give its run folder")


def _run_weights(folder: Path, checkpoint: str) -> Path:
    """RUN/<checkpoint>.safetensors of a fine-tuning run folder, or the error that says what `folder` is."""
    if checkpoint not in CHECKPOINTS:
        raise GraderFileError(f"checkpoint {checkpoint!r}: a fine-tuning run keeps {' and '.join(CHECKPOINTS)}")
    weights = folder / f"{checkpoint}.safetensors"
    if weights.is_file():
        return weights
    kept = [name for name in CHECKPOINTS if (folder / f"{name}.safetensors").is_file()]
    if kept:
        raise GraderFileError(f"{folder} has no {weights.name} (it has {kept[0]}.safetensors): choose {kept[0]}")
    config = _run_config(folder)
    if "ds_config" in config:  # the pretraining config's own field: a DeepSpeed pretraining run
        raise no_head(folder, pretraining_run=True)
    if "objective" in config:
        raise GraderFileError(f"{folder} has no {weights.name} yet: the fine-tuning run has not finished an epoch")
    raise GraderFileError(f"{folder} is neither a fine-tuning run (no {weights.name}) nor a timm folder: give {FORMS}")


def _run_config(folder: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def _open_files(weights: Path) -> tuple[Grader, GraderInfo]:
    """X.safetensors and X.json, as fine-tuning writes them (models/grader.py save_grader)."""
    description = weights.with_suffix(".json")
    for needed in (weights, description):
        if not needed.is_file():
            raise GraderFileError(f"{needed} not found: a grader is {weights.stem}.safetensors with its .json beside")
    meta = _read_json(description)
    if "objective" not in meta:
        raise no_head(weights)
    preprocessing = meta.get("preprocessing") or _preprocessing_of_run(weights.parent, description)
    try:
        grader, meta = load_grader(weights)
    except (KeyError, TypeError, ValueError, RuntimeError) as e:  # a missing field, mismatched weights
        raise GraderFileError(
            f"{weights} does not load as its {description.name} describes: {_first_line(e)}"
        ) from None
    return grader.eval(), GraderInfo.from_meta(meta, str(weights), preprocessing)


def _open_timm_folder(folder: Path) -> tuple[Grader, GraderInfo]:
    """A folder of `ssit-dist export --format timm`: timm key names (head.* the grading head)."""
    from ssit_dist.models.vit import create_encoder

    meta = _read_json(folder / CONFIG).get("ssit_dist") or {}
    if "objective" not in meta:  # an encoder export, or a timm folder from elsewhere
        raise no_head(folder)
    if not (folder / WEIGHTS).is_file():
        raise GraderFileError(f"{folder / WEIGHTS} not found: a timm folder holds its weights as {WEIGHTS}")
    if "preprocessing" not in meta:
        raise GraderFileError(f"{folder / CONFIG} records no preprocessing under ssit_dist: export the run again")
    state = load_file(str(folder / WEIGHTS))
    try:
        encoder = create_encoder(meta["arch"], meta["img_size"], **meta["timm_kwargs"])
        grader = Grader(encoder, meta["objective"], meta["num_classes"], meta.get("pool", "cls+avg"))
        grader.load_state_dict({k if k.startswith("head.") else f"encoder.{k}": v for k, v in state.items()})
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise GraderFileError(f"{folder} does not load as its {CONFIG} describes: {_first_line(e)}") from None
    return grader.eval(), GraderInfo.from_meta(meta, str(folder), meta["preprocessing"])


def _preprocessing_of_run(folder: Path, description: Path) -> dict[str, Any]:
    """For runs from before the meta recorded it: the packing of the training shards the run's
    fingerprint.json (or config.yaml) names, while they are still where the run read them."""
    source = _training_source(folder)
    if source is None:
        raise GraderFileError(
            f"{description} records no preprocessing and no fingerprint.json or config.yaml beside it names the "
            'training shards: add "preprocessing": {"crop": "fundus_disc", "size": S, "quality": Q} (their packing)'
        )
    shards = SplitSource.parse(source, "train").folder
    try:
        return packing_preprocessing(read_index(shards), str(shards))
    except ShardIndexError as e:
        raise GraderFileError(
            f"{description} records no preprocessing, and its training shards cannot tell it ({_first_line(e)}): "
            'add "preprocessing": {"crop": "fundus_disc", "size": S, "quality": Q} (their packing)'
        ) from None


def _training_source(folder: Path) -> str | None:
    """FOLDER[:SPLIT] of the training shards, as the run recorded it."""
    try:
        return str(json.loads((folder / "fingerprint.json").read_text())["data"]["train"]["source"])
    except (OSError, ValueError, KeyError, TypeError):
        train = _run_config(folder).get("train")
        return str(train) if train else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        body = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise GraderFileError(f"{path} cannot be read as JSON: {_first_line(e)}") from None
    if not isinstance(body, dict):
        raise GraderFileError(f"{path} is not a JSON object")
    return body


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
