"""A PNG grid of packed images beside their saliency maps, for checking saliency by eye."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ssit_dist.data.decode import decode_bgr, decode_gray

TILE = 256
PAIRS_PER_ROW = 3


def _pair(members: dict[str, bytes]) -> np.ndarray:
    image, sal = decode_bgr(members["jpg"]), decode_gray(members["sal.png"])
    assert image is not None and sal is not None, "preview tiles come from samples packed a moment ago"
    image = cv2.resize(image, (TILE, TILE), interpolation=cv2.INTER_AREA)
    sal = cv2.applyColorMap(cv2.resize(sal, (TILE, TILE), interpolation=cv2.INTER_AREA), cv2.COLORMAP_INFERNO)
    return np.hstack([image, sal])


def write_preview(path: Path, samples: list[dict[str, bytes]]) -> Path:
    """Write image | saliency pairs, PAIRS_PER_ROW to a row, to `path` (PNG)."""
    if not samples:
        raise ValueError("no samples to preview")
    pairs = [_pair(s) for s in samples]
    blank = np.zeros_like(pairs[0])
    pairs += [blank] * (-len(pairs) % PAIRS_PER_ROW)
    rows = [np.hstack(pairs[i : i + PAIRS_PER_ROW]) for i in range(0, len(pairs), PAIRS_PER_ROW)]
    if not cv2.imwrite(str(path), np.vstack(rows)):
        raise OSError(f"could not write preview {path}")
    return path
