"""Joint image + saliency augmentation on a real fundus photograph."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ssit_dist.data.loading.augment import PairAugment, augment_view, crop_box, rotate
from ssit_dist.data.loading.view_recipe import VIEW1, VIEW2
from ssit_dist.data.packing.saliency import saliency_map

MEAN, STD = [0.45, 0.3, 0.2], [0.28, 0.2, 0.17]


@pytest.fixture(scope="module")
def sample(retina: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    bgr = np.ascontiguousarray(np.asarray(retina.resize((256, 256)))[..., ::-1])
    return bgr, saliency_map(bgr)


def geometry_only(recipe):  # type: ignore[no-untyped-def]
    return dataclasses.replace(recipe, jitter_p=0.0, grey_p=0.0, blur_p=0.0, solarize_p=0.0)


@pytest.mark.parametrize("recipe", [VIEW1, VIEW2])
def test_saliency_follows_every_geometric_op(sample: tuple[np.ndarray, np.ndarray], recipe) -> None:  # type: ignore[no-untyped-def]
    _, sal = sample
    as_image = cv2.cvtColor(sal, cv2.COLOR_GRAY2BGR)  # an "image" identical to its saliency map
    for seed in range(20):
        image, out_sal = augment_view(as_image, sal, geometry_only(recipe), 96, np.random.default_rng(seed))
        assert image.shape == (96, 96, 3) and out_sal.shape == (96, 96)
        np.testing.assert_array_equal(image[..., 0], out_sal)


def test_rotation_by_a_right_angle_is_exact() -> None:
    grid = np.arange(64, dtype=np.uint8).reshape(8, 8)
    np.testing.assert_array_equal(rotate(grid, 90), np.rot90(grid))


def test_crop_areas_follow_the_recipes() -> None:
    rng = np.random.default_rng(0)
    big = [h * w / 512**2 for h, w in (crop_box(rng, 512, 512, VIEW2.scale, VIEW2.ratio)[2:] for _ in range(200))]
    small = [h * w / 512**2 for h, w in (crop_box(rng, 512, 512, VIEW1.scale, VIEW1.ratio)[2:] for _ in range(200))]
    assert min(big) > 0.78 and max(big) <= 1.0
    assert min(small) > 0.07 and max(small) < 0.82 and np.mean(small) < np.mean(big) - 0.3


def test_pairs_are_normalised_tensors_and_reproducible(sample: tuple[np.ndarray, np.ndarray]) -> None:
    bgr, sal = sample
    augment = PairAugment(64, MEAN, STD)
    x1, x2, s1, s2 = augment(bgr, sal, np.random.default_rng(7))
    assert x1.shape == x2.shape == (3, 64, 64) and s1.shape == s2.shape == (1, 64, 64)
    assert x1.dtype == s1.dtype == torch.float32
    assert 0 <= s1.min() and s1.max() <= 1 and s2.max() > 0.2
    pixels = x2 * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5
    again = augment(bgr, sal, np.random.default_rng(7))
    other = augment(bgr, sal, np.random.default_rng(8))
    assert all(torch.equal(a, b) for a, b in zip((x1, x2, s1, s2), again, strict=True))
    assert not torch.equal(x1, other[0])


def test_channels_leave_in_rgb_order() -> None:
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 2] = 255  # pure red in BGR
    recipe_free = PairAugment(32, [0, 0, 0], [1, 1, 1])
    view, _ = augment_view(red, np.zeros((64, 64), np.uint8), geometry_only(VIEW2), 32, np.random.default_rng(0))
    x, _ = recipe_free._tensors(view, np.zeros((32, 32), np.uint8))
    centre = x[:, 16, 16]
    assert centre.tolist() == [1.0, 0.0, 0.0]


def test_mismatched_saliency_is_refused(sample: tuple[np.ndarray, np.ndarray]) -> None:
    bgr, sal = sample
    with pytest.raises(ValueError, match="does not match image"):
        PairAugment(64, MEAN, STD)(bgr, sal[:100], np.random.default_rng(0))


def test_recipe_fields_change_the_views(sample: tuple[np.ndarray, np.ndarray]) -> None:
    # Whole image, square, no rotation, no photometric op: only the flips are left to chance.
    bgr, sal = sample
    still = dataclasses.replace(geometry_only(VIEW1), scale=[1.0, 1.0], ratio=[1.0, 1.0], rotation=0.0)
    whole = cv2.resize(bgr, (64, 64), interpolation=cv2.INTER_AREA)
    flips = [whole, whole[:, ::-1], whole[::-1], whole[::-1, ::-1]]
    for seed in range(8):
        view, _ = augment_view(bgr, sal, still, 64, np.random.default_rng(seed))
        assert any(np.array_equal(view, f) for f in flips)
    # The reference's rotation (up to 180 degrees, p 0.8) leaves black corners in most views.
    rotated = [
        augment_view(bgr, sal, dataclasses.replace(still, rotation=180.0, rotate_p=1.0), 64, rng)[0]
        for rng in (np.random.default_rng(s) for s in range(8))
    ]
    assert sum(not any(np.array_equal(v, f) for f in flips) for v in rotated) >= 7
