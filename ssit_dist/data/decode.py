"""Decoding the encoded images in shards (JPEG views, PNG saliency maps), in one place."""

from __future__ import annotations

import cv2
import numpy as np


def decode_bgr(data: bytes) -> np.ndarray | None:
    """An encoded colour image as an (H, W, 3) uint8 BGR array (OpenCV's order), or None where the
    bytes do not decode."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def decode_gray(data: bytes) -> np.ndarray | None:
    """An encoded single-channel image (a saliency map PNG) as (H, W), or None where it does not decode."""
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
