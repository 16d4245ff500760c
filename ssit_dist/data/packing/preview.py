"""A PNG grid for checking saliency by eye: each packed image beside its saliency map and the patches
SSiT's key encoder keeps from it (ViT-S/16 at 224 px: a 14 x 14 grid, the least salient quarter
dropped, as with the default mask ratio 0.25)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch

from ssit_dist.data.decode import decode_bgr, decode_gray
from ssit_dist.data.salient_patches import salient_token_indices

TILE = 256
SAMPLES_PER_ROW = 2
GRID, PATCH, MASK_RATIO = 14, 16, 0.25
HEADER = 40


def kept_patches(
    saliency: np.ndarray, grid: int = GRID, patch: int = PATCH, mask_ratio: float = MASK_RATIO
) -> np.ndarray:
    """(grid, grid) bool: the patches the key encoder keeps for this saliency map (uint8, any size),
    resized to the encoder's input as the model sees it."""
    side = grid * patch
    resized = cv2.resize(saliency, (side, side), interpolation=cv2.INTER_AREA)
    maps = torch.from_numpy(resized).float().div(255).view(1, 1, side, side)
    keep = salient_token_indices(maps, patch, mask_ratio)[0, 1:] - 1  # patch indices, CLS left out
    mask = np.zeros(grid * grid, bool)
    mask[keep.numpy()] = True
    return mask.reshape(grid, grid)


def _triple(members: dict[str, bytes]) -> np.ndarray:
    image, sal = decode_bgr(members["jpg"]), decode_gray(members["sal.png"])
    assert image is not None and sal is not None, "preview tiles come from samples packed a moment ago"
    image = cv2.resize(image, (TILE, TILE), interpolation=cv2.INTER_AREA)
    heat = cv2.applyColorMap(cv2.resize(sal, (TILE, TILE), interpolation=cv2.INTER_AREA), cv2.COLORMAP_INFERNO)
    keep = cv2.resize(kept_patches(sal).astype(np.uint8), (TILE, TILE), interpolation=cv2.INTER_NEAREST)
    kept = np.where(keep[..., None] == 1, image, image // 5)  # dropped patches dimmed to a fifth
    return np.hstack([image, heat, kept])


def write_preview(path: Path, samples: list[dict[str, bytes]], source: str) -> Path:
    """Write image | saliency | kept-patches triples, SAMPLES_PER_ROW to a row, under a title that starts
    with `source` (the packed folder's name), to `path`."""
    if not samples:
        raise ValueError("no samples to preview")
    triples = [_triple(s) for s in samples]
    blank = np.full_like(triples[0], 255)
    triples += [blank] * (-len(triples) % SAMPLES_PER_ROW)
    rows = [np.hstack(triples[i : i + SAMPLES_PER_ROW]) for i in range(0, len(triples), SAMPLES_PER_ROW)]
    grid = np.vstack(rows)
    header = np.full((HEADER, grid.shape[1], 3), 255, np.uint8)
    title = (
        f"{source}: image | saliency (bright: salient) | patches the key encoder keeps "
        f"({GRID}x{GRID} grid, mask ratio {MASK_RATIO}; dropped patches dimmed)"
    )
    cv2.putText(header, title, (10, 26), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1)
    if not cv2.imwrite(str(path), np.vstack([header, grid])):
        raise OSError(f"could not write preview {path}")
    return path
