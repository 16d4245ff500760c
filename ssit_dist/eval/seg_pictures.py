"""The segmentation overlays: per photograph, the photograph | its truth | the prediction, under a title."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from ssit_dist.eval.report import write_png

ROW = 200  # pixels per row


def _resized_mask(mask: np.ndarray, width: int) -> np.ndarray:
    union: np.ndarray = np.where(mask.any(axis=0), 255, 0).astype(np.uint8)
    return cv2.resize(union, (width, ROW), interpolation=cv2.INTER_NEAREST)


def overlays_png(path: Path, rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], title: str) -> None:
    """rows: (name, uint8 RGB photograph, bool truth (classes, H, W), bool prediction (classes, H, W));
    the classes of a mask drawn together (white). Written as one PNG, `title` on top."""
    panels = []
    for name, image, truth, predicted in rows:
        h, w = image.shape[:2]
        width = round(w * ROW / h)
        photo = cv2.resize(image, (width, ROW), interpolation=cv2.INTER_AREA)
        masks = [_resized_mask(m, width) for m in (truth, predicted)]
        row = np.concatenate([photo, *(np.repeat(m[..., None], 3, 2) for m in masks)], 1)
        cv2.putText(row, name[:40], (6, 18), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 0), 1)
        panels.append(row)
    width = max((p.shape[1] for p in panels), default=600)
    header = np.full((34, width, 3), 255, np.uint8)
    cv2.putText(header, title[:90], (8, 23), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1)
    body = [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0))) for p in panels]
    write_png(path, cv2.cvtColor(np.concatenate([header, *body]), cv2.COLOR_RGB2BGR))
