"""The paper's saliency computation written out with plain OpenCV calls, to test against."""

from __future__ import annotations

import cv2
import numpy as np


def paper_saliency(bgr: np.ndarray) -> np.ndarray:
    """The authors' sequence for a 512 px BGR crop, with float64 3-channel masks as they wrote it."""
    mask = np.zeros(bgr.shape)
    cv2.circle(mask, (bgr.shape[1] // 2, bgr.shape[0] // 2), int(512 / 2 * 0.98), (1, 1, 1), -1, 8, 0)
    weighted = cv2.addWeighted(bgr, 4, cv2.GaussianBlur(bgr, (0, 0), 512 / 30), -4, 128)
    enhanced = (weighted * mask + 128 * (1 - mask)).astype(np.uint8)
    enhanced = cv2.imdecode(cv2.imencode(".jpeg", enhanced)[1], cv2.IMREAD_COLOR)
    _, raw = cv2.saliency.StaticSaliencyFineGrained_create().computeSaliency(enhanced)
    raw *= cv2.circle(np.zeros((512, 512)), (256, 256), 240, 1, -1)
    return np.uint8(raw * 255)  # how their training loader turned the saved map into an image
