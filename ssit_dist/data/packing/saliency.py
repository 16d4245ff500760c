"""Saliency maps of fundus photographs, computed as the SSiT paper did.

Pipeline for a (size, size) crop: Graham-style enhancement (subtract a wide Gaussian blur, x4, +128),
everything outside a circle of radius 0.98 * size / 2 set to grey, an optional JPEG round trip of the
enhanced image (the authors saved it as JPEG before detection; keep it to reproduce their maps), OpenCV's
static saliency on the BGR image, then a circular mask of radius 240/512 of the size.

The result is stored as uint8 with the same truncation the reference training loader applies
(`uint8(map * 255)`), so the 8-bit map here is exactly what training would have seen.
"""

from __future__ import annotations

import typing
from functools import lru_cache

import cv2
import numpy as np

from ssit_dist.data.decode import decode_bgr
from ssit_dist.data.packing.fundus import circle_mask
from ssit_dist.data.packing.options import SaliencyMethod

METHODS: tuple[str, ...] = typing.get_args(SaliencyMethod)


@lru_cache(maxsize=8)
def _enhance_region(size: int) -> np.ndarray:
    """(size, size, 1) bool: pixels kept by the enhancement (radius 0.98 * size / 2)."""
    return (circle_mask(size, size / 2 * 0.98) > 0)[..., None]


@lru_cache(maxsize=8)
def _output_mask(size: int) -> np.ndarray:
    """(size, size) bool: where the saliency map is kept (radius 240/512 of the size)."""
    return circle_mask(size, 240 / 512 * size) > 0


def enhance(bgr: np.ndarray) -> np.ndarray:
    """Graham enhancement of a square uint8 BGR crop; outside the disc circle becomes 128."""
    size = bgr.shape[0]
    weighted = cv2.addWeighted(bgr, 4, cv2.GaussianBlur(bgr, (0, 0), size / 30), -4, 128)
    return np.where(_enhance_region(size), weighted, np.uint8(128))


def saliency_map(
    bgr: np.ndarray, method: SaliencyMethod | str = "fine_grained", jpeg_roundtrip: bool = True
) -> np.ndarray:
    """Saliency of a square uint8 crop in OpenCV's BGR order, as a (size, size) uint8 map.

    BGR matters: the detectors convert to grey with BGR weights, as the authors' cv.imread input was.
    """
    if bgr.ndim != 3 or bgr.shape[0] != bgr.shape[1] or bgr.shape[2] != 3 or bgr.dtype != np.uint8:
        raise ValueError(f"expected a square uint8 BGR image, got shape {bgr.shape} {bgr.dtype}")
    size = bgr.shape[0]
    enhanced = enhance(bgr)
    if jpeg_roundtrip:
        # OpenCV's default JPEG quality (95), as the authors' script used.
        decoded = decode_bgr(cv2.imencode(".jpg", enhanced)[1].tobytes())
        assert decoded is not None, "OpenCV decodes the JPEG it just encoded"
        enhanced = decoded
    if method == "fine_grained":
        detector = cv2.saliency.StaticSaliencyFineGrained_create()  # type: ignore[attr-defined]  # contrib module, not in the stubs
    elif method == "spectral_residual":
        detector = cv2.saliency.StaticSaliencySpectralResidual_create()  # type: ignore[attr-defined]  # contrib module, not in the stubs
    else:
        raise ValueError(f"unknown saliency method {method!r}; choose one of {', '.join(METHODS)}")
    ok, raw = detector.computeSaliency(enhanced)
    if not ok:
        raise RuntimeError(f"OpenCV {method} saliency failed on a {size}x{size} image")
    if method == "spectral_residual":
        # Its output is not normalised; bring it to [0, 1] like the fine-grained map.
        raw = cv2.normalize(raw, None, 0.0, 1.0, cv2.NORM_MINMAX)  # dst None: a new array
    # float32 arithmetic and truncation, exactly as the reference stored and then loaded the map.
    raw = np.where(_output_mask(size), raw.astype(np.float32), np.float32(0))
    return (raw * np.float32(255)).astype(np.uint8)
