"""Segmentation data (`ssit-dist segment`): photographs with per-class masks, checked before training.

A folder in one of two layouts (DRIVE, CHASE_DB1 and IDRiD convert to either: see the README):
    ROOT/{train,val,test}/images/NAME.*, .../masks/NAME.* or .../masks/CLASS/NAME.*, [.../fov/NAME.*]
    ROOT/images/..., ROOT/masks/..., [ROOT/fov/...] and a CSV `image,split` naming each image's split
A mask is matched to its image by file stem, is 8-bit with 255 for foreground and 0 elsewhere, and has
its image's size; several classes (lesion types) have a mask folder each. A field-of-view mask (fov/)
limits the metrics to the pixels inside it; without one every pixel counts. Anything else is refused
before training, naming the file.

Training reads random crops of the model's input size from each photograph resized to `resize`, a crop
that holds foreground wherever the masks have any (tried up to eight times, as the reference does with
its foreground-biased crops), then flips, a shift-scale-rotate and brightness/contrast jitter.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ssit_dist.data.decode import BadImage, decode_rgb

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".gif", ".ppm"}
SPLITS = ("train", "val", "test")


class SegmentationDataError(ValueError):
    """The segmentation folder cannot be used as it is; the message names the file and the fix."""


@dataclass(frozen=True)
class SegSample:
    name: str  # the image's file stem
    image: Path
    masks: tuple[Path, ...]  # one per class, in `classes` order
    fov: Path | None


@dataclass(frozen=True)
class SegmentationSet:
    root: Path
    classes: tuple[str, ...]
    splits: dict[str, list[SegSample]]


def _files(folder: Path) -> dict[str, Path]:
    return (
        {p.stem: p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES} if folder.is_dir() else {}
    )


def _classes(masks: Path) -> tuple[str, ...]:
    """Mask class folders under masks/, or ("foreground",) where the masks lie in masks/ itself."""
    folders = tuple(sorted(p.name for p in masks.iterdir() if p.is_dir())) if masks.is_dir() else ()
    return folders or ("foreground",)


def _samples(base: Path, classes: tuple[str, ...], names: list[str] | None = None) -> list[SegSample]:
    images = _files(base / "images")
    if not images:
        raise SegmentationDataError(f"{base / 'images'}: no images; expected images/, masks/ and optional fov/")
    mask_files = {c: _files(base / "masks" / c if c != "foreground" else base / "masks") for c in classes}
    fov = _files(base / "fov")
    out = []
    for name in names if names is not None else list(images):
        if name not in images:
            raise SegmentationDataError(f"the splits CSV names {name}, which is not an image in {base / 'images'}")
        lacking = [c for c in classes if name not in mask_files[c]]
        if lacking:
            where = base / "masks" / (lacking[0] if lacking[0] != "foreground" else "")
            raise SegmentationDataError(f"{images[name]} has no mask in {where} (a file named {name}.png or .gif)")
        out.append(SegSample(name, images[name], tuple(mask_files[c][name] for c in classes), fov.get(name)))
    return out


def discover_segmentation(root: Path, splits_csv: Path | None = None) -> SegmentationSet:
    """Every sample of each split, masks matched; refuses what training could not use."""
    if not root.is_dir():
        raise SegmentationDataError(f"segmentation data folder {root} not found")
    split_dirs = [s for s in SPLITS if (root / s / "images").is_dir()]
    if split_dirs:
        classes = _classes(root / split_dirs[0] / "masks")
        splits = {s: _samples(root / s, classes) for s in split_dirs}
    elif splits_csv is not None:
        classes = _classes(root / "masks")
        names: dict[str, list[str]] = {}
        with open(splits_csv, newline="", encoding="utf-8-sig") as f:
            for line, row in enumerate(csv.DictReader(f), start=2):
                if row.get("split") not in SPLITS or not row.get("image"):
                    raise SegmentationDataError(
                        f"{splits_csv}:{line}: expected image,split with split train, val or test"
                    )
                names.setdefault(row["split"], []).append(Path(row["image"]).stem)
        splits = {s: _samples(root, classes, n) for s, n in names.items()}
    else:
        raise SegmentationDataError(f"{root}: no train/val/test folders; give them, or a splits CSV (image,split)")
    if "train" not in splits or "val" not in splits:
        raise SegmentationDataError(f"{root}: needs a train and a val split (found {sorted(splits)})")
    return SegmentationSet(root, classes, splits)


def read_sample(sample: SegSample) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uint8 RGB image, bool masks (classes, H, W), bool field of view (H, W)), each mask checked."""
    try:
        image = np.asarray(decode_rgb(sample.image.read_bytes())[0])
    except (OSError, BadImage) as e:
        raise SegmentationDataError(f"{sample.image}: {e}") from None
    h, w = image.shape[:2]
    masks = np.stack([_binary(path, (h, w), sample.image) for path in sample.masks])
    fov = _binary(sample.fov, (h, w), sample.image, any_nonzero=True) if sample.fov else np.ones((h, w), bool)
    return image, masks, fov


def _binary(path: Path, size: tuple[int, int], image: Path, any_nonzero: bool = False) -> np.ndarray:
    try:  # Pillow: it reads GIF (DRIVE's masks) and 1-bit masks, as 0 / 255
        with Image.open(path) as opened:
            mask = np.asarray(opened.convert("L"))
    except (OSError, ValueError) as e:
        raise SegmentationDataError(f"{path}: cannot read the mask: {e}") from None
    if mask.shape != size:
        raise SegmentationDataError(f"{path} is {mask.shape[1]}x{mask.shape[0]}, its image {image} {size[1]}x{size[0]}")
    values = np.unique(mask)
    if not any_nonzero and not set(values.tolist()) <= {0, 255}:
        raise SegmentationDataError(
            f"{path} is not a binary mask (values {values[:6].tolist()}...): "
            "use 0 for background and 255 for foreground"
        )
    return mask > 0


def resize_sample(image: np.ndarray, masks: np.ndarray, fov: np.ndarray, side: int) -> tuple[np.ndarray, ...]:
    """Image (area/cubic) and masks (nearest) to side x side."""
    interp = cv2.INTER_AREA if max(image.shape[:2]) > side else cv2.INTER_CUBIC
    image = cv2.resize(image, (side, side), interpolation=interp)
    masks = np.array([cv2.resize(m.astype(np.uint8), (side, side), interpolation=cv2.INTER_NEAREST) > 0 for m in masks])
    masks = masks.reshape(-1, side, side)  # no class: (0, side, side)
    fov = cv2.resize(fov.astype(np.uint8), (side, side), interpolation=cv2.INTER_NEAREST) > 0
    return image, masks, fov


def normalise(image: np.ndarray, mean: list[float], std: list[float]) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


class SegmentationCrops(Dataset):
    """Random augmented training crops: `length` draws over the split's photographs, each resized once
    (cached per worker), every draw seeded by (seed, index) so a resumed run sees the same crops."""

    def __init__(
        self,
        samples: list[SegSample],
        img_size: int,
        resize: int,
        mean: list[float],
        std: list[float],
        seed: int,
        length: int,
    ):
        self.samples, self.img_size, self.resize, self.mean, self.std = samples, img_size, resize, mean, std
        self.seed, self.length = seed, length
        self._cache: dict[int, tuple[np.ndarray, ...]] = {}

    def __len__(self) -> int:
        return self.length

    def _resized(self, i: int) -> tuple[np.ndarray, ...]:
        if i not in self._cache:
            self._cache[i] = resize_sample(*read_sample(self.samples[i]), self.resize)
        return self._cache[i]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, index])
        image, masks, _ = self._resized(int(rng.integers(len(self.samples))))
        image, masks = _crop(image, masks, self.img_size, rng)
        image, masks = _jitter(image, masks, rng)
        return normalise(image, self.mean, self.std), torch.from_numpy(masks.astype(np.float32))


def _crop(image: np.ndarray, masks: np.ndarray, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    side = image.shape[0]
    for _ in range(8):
        y, x = (int(v) for v in rng.integers(0, side - size + 1, 2))
        crop = masks[:, y : y + size, x : x + size]
        if crop.any() or not masks.any():
            break
    return image[y : y + size, x : x + size], crop


def _jitter(image: np.ndarray, masks: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Flips, a shift-scale-rotate (image linear, masks nearest), brightness and contrast."""
    if rng.random() < 0.5:
        image, masks = image[:, ::-1], masks[:, :, ::-1]
    if rng.random() < 0.5:
        image, masks = image[::-1], masks[:, ::-1]
    size = image.shape[0]
    turn = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(-30, 30), rng.uniform(0.9, 1.1))
    turn[:, 2] += rng.uniform(-0.0625, 0.0625, 2) * size

    def warp(x: np.ndarray, flags: int) -> np.ndarray:
        return cv2.warpAffine(np.ascontiguousarray(x), turn, (size, size), flags=flags, borderMode=cv2.BORDER_REFLECT)

    image = warp(image, cv2.INTER_LINEAR)
    masks = np.stack([warp(m.astype(np.uint8), cv2.INTER_NEAREST) > 0 for m in masks])
    contrast, brightness = rng.uniform(0.8, 1.2), rng.uniform(-0.2, 0.2) * 255
    image = np.clip(image.astype(np.float32) * contrast + brightness, 0, 255).astype(np.uint8)
    return image, masks
