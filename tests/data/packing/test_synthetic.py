"""Synthetic fundus photographs: deterministic, fundus-shaped, lesions that follow the grade."""

from __future__ import annotations

import numpy as np
import pytest

from ssit_dist.data.packing.fundus import crop_to_disc
from ssit_dist.data.packing.synthetic import LESIONS, synthetic_fundus


def _yellow_white(image: np.ndarray) -> int:
    r, g, b = (image[..., i].astype(int) for i in range(3))
    return int(((r > 200) & (g > 180) & (b > 80)).sum())


def test_same_seed_same_image_other_seed_other_image() -> None:
    a, b = synthetic_fundus(2, seed=5), synthetic_fundus(2, seed=5)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, synthetic_fundus(2, seed=6))
    assert not np.array_equal(a, synthetic_fundus(3, seed=5))


def test_round_field_of_view_on_black() -> None:
    image = synthetic_fundus(0, seed=1, size=256)
    assert image.dtype == np.uint8 and image.shape[0] == 256 and image.shape[2] == 3
    height, width = image.shape[:2]
    assert image[:8, :8].max() < 20 and image[-8:, -8:].max() < 20  # corners outside the circle
    centre = image[height // 2 - 10 : height // 2 + 10, width // 2 - 10 : width // 2 + 10]
    assert centre[..., 0].mean() > 60 and centre[..., 0].mean() > centre[..., 2].mean()  # red-orange retina


def test_same_seed_is_the_same_eye_and_lesions_grow_with_grade() -> None:
    """One seed, five grades: the same eye and camera, so every changed pixel is a lesion. Averaged over
    10 eyes the changed area grows from grade 1 to 3 and grade 4 adds to grade 3's; grade 0 is untouched
    by lesions; grades 2 and 3 add yellow-white (exudates, cotton-wool spots) that grade 1 does not (grade 4's new
    vessels darken the disc)."""
    changed = np.zeros(5)
    bright = np.zeros(5)
    for seed in range(10):
        images = [synthetic_fundus(g, seed) for g in range(5)]
        assert all(i.shape == images[0].shape for i in images)
        for g, image in enumerate(images):
            diff = np.abs(image.astype(int) - images[0].astype(int)).max(axis=2)
            changed[g] += (diff > 40).sum()
            bright[g] += _yellow_white(image) - _yellow_white(images[0])
    assert changed[0] == 0
    assert 0 < changed[1] < changed[2] < changed[3] < changed[4]
    assert bright[1] == 0 and bright[2] > 0 and bright[3] > bright[2]


def test_lesion_table_follows_the_icdr_order() -> None:
    assert not any(LESIONS[0].__dict__[k] != (0, 0) for k in ("microaneurysms", "haemorrhages"))
    assert LESIONS[1].haemorrhages == (0, 0) and LESIONS[1].microaneurysms[0] > 0
    assert LESIONS[4].proliferative and not any(LESIONS[g].proliferative for g in range(4))


def test_packs_like_a_photograph() -> None:
    """The disc crop of the packer finds the field of view, also on a wide camera frame."""
    import cv2

    for seed in range(20):
        image = synthetic_fundus(1, seed)
        ok, data = cv2.imencode(".jpg", image[..., ::-1])
        assert ok
        cropped = crop_to_disc(data.tobytes(), 128)
        assert cropped.image.shape == (128, 128, 3)
        box = cropped.box
        assert box[2] - box[0] <= image.shape[1] and (box[2] - box[0]) >= 0.8 * image.shape[0]


def test_unknown_grade_is_an_error() -> None:
    with pytest.raises(ValueError, match="grade 5"):
        synthetic_fundus(5, seed=0)
