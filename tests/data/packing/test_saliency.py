"""Saliency maps against OpenCV called directly, step by step, as the paper's script did."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from opencv_reference import paper_saliency
from PIL import Image

from ssit_dist.data.packing.saliency import saliency_map


@pytest.fixture(scope="module")
def crop(retina: Image.Image) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(retina.resize((512, 512), Image.Resampling.LANCZOS))[..., ::-1])


def test_fine_grained_matches_the_paper_bit_for_bit(crop: np.ndarray) -> None:
    ours = saliency_map(crop)
    assert ours.dtype == np.uint8 and ours.shape == (512, 512)
    np.testing.assert_array_equal(ours, paper_saliency(crop))
    assert ours.max() == 255 and (ours > 0).mean() > 0.5  # a real map, not a blank one


def test_outside_the_disc_is_zero_and_roundtrip_matters(crop: np.ndarray) -> None:
    sal = saliency_map(crop)
    yy, xx = np.mgrid[:512, :512]
    assert sal[(yy - 256) ** 2 + (xx - 256) ** 2 > 242**2].max() == 0
    direct = saliency_map(crop, jpeg_roundtrip=False)
    assert (direct != sal).mean() > 0.01  # the option changes the map; it is not a no-op


def test_spectral_residual_is_normalised(crop: np.ndarray) -> None:
    sal = saliency_map(crop, "spectral_residual")
    assert sal.max() >= 250 and sal.min() == 0 and sal.shape == (512, 512)


def test_the_optic_disc_is_the_most_salient_region(crop: np.ndarray) -> None:
    # The optic disc is the brightest structure of a fundus photograph and the vessels converge on it.
    brightness = cv2.blur(crop.astype(np.float64).mean(axis=2), (41, 41))
    saliency = cv2.blur(saliency_map(crop).astype(np.float64), (41, 41))
    disc = np.array(np.unravel_index(brightness.argmax(), brightness.shape))
    peak = np.array(np.unravel_index(saliency.argmax(), saliency.shape))
    assert np.linalg.norm(disc - peak) < 30, (disc, peak)
    assert saliency.max() > 2 * saliency[64:448, 64:448].mean()


def test_rejects_non_square_and_unknown_method(crop: np.ndarray) -> None:
    with pytest.raises(ValueError, match="square uint8"):
        saliency_map(crop[:, :400])
    with pytest.raises(ValueError, match="unknown saliency method 'itti'"):
        saliency_map(crop, "itti")  # type: ignore[arg-type]
