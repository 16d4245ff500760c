"""Floors: features of a fundus photograph computed from its pixels alone, with no pretraining.

A pretrained encoder is worth something only above what the plainest description of the image already
gives. Two such descriptions, evaluated by the same kNN and linear probe as the encoders' features:

- `colour_histogram`: 8 bins per RGB channel over the pixels inside the fundus circle, each channel's
  bins summing to 1 (3 x 8 = 24 values). It sees overall colour and brightness (haemorrhages darken,
  exudates brighten, camera and preprocessing differ), and nothing of where things are.
- `thumbnail`: the photograph shrunk to 16 x 16 pixels, RGB in [0, 1], flattened (768 values): coarse
  layout (disc, vessels' arcades, large lesions), little detail.

Each photograph is first cropped to its fundus disc and resized as the shards are packed
(data/packing/fundus.py), so that a floor sees what an encoder sees, not the camera's black margins.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from ssit_dist.data.decode import BadImage
from ssit_dist.data.packing.fundus import circle_mask, crop_to_disc

FLOORS = ("colour_histogram", "thumbnail")
WORKING_SIZE = 128  # the cropped disc's side in pixels: ample for 8-bin histograms and a 16-pixel thumbnail


def colour_histogram(rgb: np.ndarray, bins: int = 8) -> np.ndarray:
    """(3 * bins,) float32: each channel's histogram inside the circle inscribed in the square image,
    normalised to sum 1 per channel (the corners outside the fundus would only count black pixels)."""
    side = rgb.shape[0]
    inside = circle_mask(side, side / 2) > 0
    pixels = np.asarray(rgb, np.int64)[inside]  # (pixels, 3)
    histograms = [np.bincount(pixels[:, c] * bins // 256, minlength=bins) / len(pixels) for c in range(3)]
    return np.concatenate(histograms).astype(np.float32)


def thumbnail(rgb: np.ndarray, side: int = 16) -> np.ndarray:
    """(side * side * 3,) float32 in [0, 1]: the image averaged down to side x side pixels (area
    interpolation, so every pixel counts, nothing aliases), rows then columns then RGB."""
    small = cv2.resize(np.ascontiguousarray(rgb), (side, side), interpolation=cv2.INTER_AREA)
    return (small.astype(np.float32) / 255.0).reshape(-1)


def floor_features(data: bytes, bins: int = 8, side: int = 16) -> dict[str, np.ndarray]:
    """Both floors of one encoded photograph. Bytes that are not a usable photograph raise BadImage."""
    disc = crop_to_disc(data, WORKING_SIZE).image
    return {"colour_histogram": colour_histogram(disc, bins), "thumbnail": thumbnail(disc, side)}


def floor_features_of_files(paths: Sequence[str | Path], bins: int = 8, side: int = 16) -> dict[str, np.ndarray]:
    """{floor: (photographs, dim) float32} in the order of `paths`; a photograph that does not decode
    raises BadImage naming it (a floor with a row missing would misalign every grade after it)."""
    rows: dict[str, list[np.ndarray]] = {name: [] for name in FLOORS}
    for path in paths:
        try:
            features = floor_features(Path(path).read_bytes(), bins, side)
        except (BadImage, OSError) as e:
            raise BadImage(f"{path}: {e}") from None
        for name in FLOORS:
            rows[name].append(features[name])
    return {name: np.stack(rows[name]) for name in FLOORS}
