"""The device-side pair augmentation (data.augment_on: gpu), run on CPU tensors: the same recipe as the
OpenCV path, on real shards of real photographs and on scikit-image's CC0 retina."""

from __future__ import annotations

import dataclasses
import io
import itertools
import logging
import tarfile
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from conftest import pack_real_subset
from ssit_dist.data.decode import decode_bgr, decode_jpegs
from ssit_dist.data.loading.augment import PairAugment, ViewParams, apply_view, draw_view, rotate
from ssit_dist.data.loading.device_augment import DevicePairAugment, EncodedBatch, _hue, gaussian_blur, warp
from ssit_dist.data.loading.epoch import EpochPlan
from ssit_dist.data.loading.prefetch import Prefetcher
from ssit_dist.data.loading.sources import SourceError, open_shards
from ssit_dist.data.loading.stream import PairStream, pair_loader
from ssit_dist.data.loading.view_recipe import VIEW1, VIEW2
from ssit_dist.data.loading.workers import start_batches
from ssit_dist.data.packing.saliency import saliency_map

MEAN, STD = [0.45, 0.3, 0.2], [0.28, 0.2, 0.17]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def shards(graded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pack_real_subset(graded_dir, tmp_path_factory, 16, size=128, shard_size=8)


@pytest.fixture(scope="module")
def photo(retina: Image.Image) -> tuple[np.ndarray, np.ndarray]:
    rgb = np.array(retina.resize((128, 128)))
    return rgb, saliency_map(np.ascontiguousarray(rgb[..., ::-1]))


def batch_of(params: list[ViewParams]) -> np.ndarray:
    return np.array([p.row() for p in params])


def still(**fields: object) -> ViewParams:
    """A view of the whole 128 px photograph at 128 px with nothing random, `fields` aside."""
    return dataclasses.replace(ViewParams(0, 0, 128, 128, ()), **fields)


@pytest.mark.multiprocess
def test_the_device_path_makes_the_cpu_paths_views_on_real_shards(shards: Path) -> None:
    # Same seeds, same samples, same drawn parameters: the two paths differ only in interpolation (one
    # bilinear warp against a resize and a nearest-neighbour rotation) and in rounding to integers
    # between ops, which moves pixels at edges by a few grey levels. So each device view must be far
    # closer to its own CPU view than to any other sample's (a wrong crop, angle, flip or op order is as
    # far as another photograph), and correlate with it.
    index = open_shards([shards])
    augment = PairAugment(64, index.mean, index.std)
    plan = EpochPlan(tuple(index.lengths), 1, 0, 8, 2, shuffle_buffer=4)  # type: ignore[arg-type]
    cpu = next(iter(pair_loader(PairStream(index, augment, plan, rank=0))))
    plan = dataclasses.replace(plan, workers=1)  # the same samples in the same order from one worker process
    encoded = next(iter(pair_loader(PairStream(index, augment, plan, rank=0, encoded=True))))
    assert isinstance(encoded, EncodedBatch) and len(encoded.jpegs()) == 8 and encoded.saliency().dtype == torch.uint8
    device = DevicePairAugment(64, index.mean, index.std)(encoded, CPU)
    for ours, theirs in zip(device, cpu, strict=True):
        assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.float32
        distance = torch.cdist(ours.flatten(1), theirs.flatten(1), p=1)  # (device sample, CPU sample)
        others = distance + torch.diag(torch.full((8,), float("inf")))
        assert (distance.diagonal() < 0.5 * others.min(1).values).all(), distance
        for a, b in zip(ours, theirs, strict=True):
            assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.85
    s1 = device[2]
    assert s1.min() >= 0 and s1.max() <= 1 and s1.max() > 0.3


@pytest.mark.multiprocess
def test_a_worker_hands_a_batch_over_as_one_buffer_and_the_decoder_reads_it_in_place(shards: Path) -> None:
    index = open_shards([shards])
    augment = PairAugment(64, index.mean, index.std)
    plan = EpochPlan(tuple(index.lengths), 1, 1, 8, 2, shuffle_buffer=4)  # type: ignore[arg-type]
    batch = next(iter(pair_loader(PairStream(index, augment, plan, rank=0, encoded=True))))
    assert batch.data.is_shared() and batch.data.dtype == torch.uint8 and batch.data.dim() == 1  # one segment
    members = {}
    for shard in index.paths:
        with tarfile.open(shard) as tar:
            members |= {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    start, end = batch.data.data_ptr(), batch.data.data_ptr() + batch.data.numel()
    keys = [name.rsplit(":", 1)[1] for name in batch.names]
    for key, jpeg in zip(keys, batch.jpegs(), strict=True):
        assert start <= jpeg.data_ptr() < end and jpeg.is_contiguous()  # a view into the buffer, no copy
        assert bytes(jpeg.numpy()) == members[f"{key}.jpg"]
    maps = batch.saliency()
    assert maps.shape == (8, 1, 128, 128) and start <= maps.data_ptr() < end
    for key, sal in zip(keys, maps, strict=True):
        np.testing.assert_array_equal(
            sal[0].numpy(), cv2.imdecode(np.frombuffer(members[f"{key}.sal.png"], np.uint8), 0)
        )
    copies = [torch.frombuffer(bytearray(members[f"{key}.jpg"]), dtype=torch.uint8) for key in keys]
    assert torch.equal(decode_jpegs(batch.jpegs(), CPU), decode_jpegs(copies, CPU))


def _loader_batches(shards: Path, skip: int = 0) -> Iterator[EncodedBatch]:
    """The gpu path's batches of `shards` from a loader in this process, from batch `skip` of epoch 0."""
    index = open_shards([shards])
    plan = EpochPlan(tuple(index.lengths), 1, 0, 4, 4, shuffle_buffer=4)  # type: ignore[arg-type]
    stream = PairStream(index, PairAugment(48, index.mean, index.std), plan, rank=0, encoded=True)
    stream.set_position(0, skip_batches=skip)
    return start_batches(pair_loader(stream))


def test_prefetched_batches_are_the_loaders_in_order_and_a_resume_gets_the_same(shards: Path) -> None:
    # The thread changes where a batch is made ready, never which batch comes when: the same tensors, bit
    # for bit, as augmenting each loader batch on the spot; and a feed restarted at batch 2 (a resume)
    # continues with them.
    index = open_shards([shards])
    augment = DevicePairAugment(48, index.mean, index.std)
    direct = [augment(batch, CPU) for batch in itertools.islice(_loader_batches(shards), 4)]
    prefetched = Prefetcher(_loader_batches(shards), lambda batch: augment(batch, CPU), CPU)
    resumed = Prefetcher(_loader_batches(shards, skip=2), lambda batch: augment(batch, CPU), CPU)
    try:
        for expected, got in zip(direct, itertools.islice(prefetched, 4), strict=True):
            assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
        for expected, got in zip(direct[2:], itertools.islice(resumed, 2), strict=True):
            assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    finally:
        prefetched.close()
        resumed.close()
    assert not prefetched._thread.is_alive() and not resumed._thread.is_alive()  # closed, though ahead


def test_a_prefetched_failure_is_raised_at_its_own_batch(shards: Path) -> None:
    # A loader that fails after two good batches: the thread meets the failure a batch ahead of the
    # consumer, which must still get both good batches first, then the error at every later call.
    def failing_after_two() -> Iterator[EncodedBatch]:
        yield from itertools.islice(_loader_batches(shards), 2)
        raise SourceError("shard gone")

    index = open_shards([shards])
    augment = DevicePairAugment(48, index.mean, index.std)
    prefetched = Prefetcher(failing_after_two(), lambda batch: augment(batch, CPU), CPU)
    try:
        assert next(prefetched)[0].shape == next(prefetched)[0].shape == (4, 3, 48, 48)
        for _ in range(2):
            with pytest.raises(SourceError, match="shard gone"):
                next(prefetched)
    finally:
        prefetched.close()


def test_geometry_moves_image_and_map_alike(photo: tuple[np.ndarray, np.ndarray]) -> None:
    _, sal = photo
    rng = np.random.default_rng(0)
    params = batch_of([draw_view(rng, VIEW1, 128, 128) for _ in range(16)])
    same = torch.from_numpy(sal).expand(16, 4, -1, -1).contiguous()  # every channel the map
    warped, visible = warp(same, params, 48)
    for channel in range(1, 4):
        assert torch.equal(warped[:, channel], warped[:, 0])  # one warp, one grid for image and map
    assert warped.std() > 5 and 0.3 < visible.mean() < 1  # rotations hide corners, not everything


def test_a_right_angle_and_flips_are_exact(photo: tuple[np.ndarray, np.ndarray]) -> None:
    # A whole-photograph view at its own size samples pixel centres: bilinear weights are 0 or 1 up to
    # float32 rounding of the grid (under 1e-3 of a level).
    rgb, _ = photo
    image = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)
    for fields, expected in (
        ({"angle": 90.0}, rotate(rgb, 90)),
        ({"hflip": True}, rgb[:, ::-1]),
        ({"vflip": True}, rgb[::-1]),
        ({"angle": 90.0, "hflip": True}, rotate(rgb, 90)[:, ::-1]),
    ):
        warped, _ = warp(image, batch_of([still(**fields)]), 128)
        np.testing.assert_allclose(warped[0].permute(1, 2, 0).numpy(), expected, atol=1e-3, err_msg=str(fields))


def test_each_op_touches_only_the_samples_that_drew_it(photo: tuple[np.ndarray, np.ndarray]) -> None:
    rgb, sal = photo
    images = torch.from_numpy(rgb).permute(2, 0, 1).expand(4, -1, -1, -1).contiguous()
    pixels = torch.cat([images, torch.from_numpy(sal).expand(4, 1, -1, -1)], 1)
    augment = DevicePairAugment(128, MEAN, STD)
    plain_x, plain_s = augment.view(pixels, batch_of([still()] * 4))
    for fields in (
        {"solarize": True},
        {"grey": True},
        {"blur_sigma": 1.5},
        {"jitter_order": (3, 0), "hue": 0.25, "brightness": 1.3},
        {"jitter_order": (1, 2), "contrast": 0.5, "saturation": 0.2},
    ):
        x, s = augment.view(pixels, batch_of([still(**fields), still(), still(**fields), still()]))
        assert torch.equal(x[[1, 3]], plain_x[[1, 3]]) and torch.equal(s, plain_s), fields
        assert (x[[0, 2]] - plain_x[[0, 2]]).abs().mean() > 0.05, fields


def test_photometric_ops_follow_opencv(photo: tuple[np.ndarray, np.ndarray]) -> None:
    rgb, sal = photo
    pixels = torch.cat([torch.from_numpy(rgb).permute(2, 0, 1), torch.from_numpy(sal)[None]]).unsqueeze(0)
    augment = DevicePairAugment(128, [0.0] * 3, [1.0] * 3)  # views come out as value / 255
    rng = np.random.default_rng(3)
    for seed in range(6):
        # Jitter, greyscale, blur and solarize without geometry, against apply_view on the same numbers:
        # OpenCV rounds to integers after each op and quantises hue to 1/256 turn, a few levels at most.
        drawn = draw_view(rng, dataclasses.replace(VIEW2, jitter_p=1.0, blur_p=0.5, solarize_p=0.5), 128, 128)
        params = dataclasses.replace(drawn, top=0, left=0, height=128, width=128, angle=None, hflip=False, vflip=False)
        ours, _ = augment.view(pixels, batch_of([params]))
        theirs, _ = apply_view(np.ascontiguousarray(rgb[..., ::-1]), sal, params, 128)
        difference = np.abs(ours[0].permute(1, 2, 0).numpy() * 255 - theirs[..., ::-1])
        assert difference.mean() < 2.0 and np.percentile(difference, 99) < 12, (seed, params)


def test_hue_greyscale_solarize_blur_on_known_values() -> None:
    red = torch.tensor([255.0, 0.0, 0.0]).view(1, 3, 1, 1)
    green = _hue(red, torch.tensor(1 / 3).view(1, 1, 1, 1), torch.ones(1, 1, 1, 1))
    torch.testing.assert_close(green.flatten(), torch.tensor([0.0, 255.0, 0.0]), atol=1e-3, rtol=0)
    colours = torch.rand(2, 3, 8, 8) * 255
    torch.testing.assert_close(
        _hue(colours, torch.zeros(2, 1, 1, 1), torch.ones(2, 1, 8, 8)), colours, atol=1e-3, rtol=0
    )
    augment = DevicePairAugment(4, [0.0] * 3, [1.0] * 3)
    levels = torch.tensor([0, 127, 128, 255], dtype=torch.uint8).view(1, 1, 1, 4).expand(1, 3, 4, 4)
    pixels = torch.cat([levels, torch.zeros(1, 1, 4, 4, dtype=torch.uint8)], 1)  # RGB and an empty map
    x, _ = augment.view(pixels, batch_of([still(height=4, width=4, solarize=True)]))
    torch.testing.assert_close(x[0, :, 0, :] * 255, torch.tensor([0.0, 127, 127, 0]).expand(3, 4), atol=1e-3, rtol=0)
    flat = torch.full((2, 3, 16, 16), 77.0)
    torch.testing.assert_close(gaussian_blur(flat, np.array([0.3, 2.0])), flat, atol=1e-3, rtol=0)
    noise = torch.rand(1, 3, 32, 32) * 255
    blurred = gaussian_blur(noise, np.array([1.2]))
    reference = cv2.GaussianBlur(noise[0].permute(1, 2, 0).numpy(), (9, 9), 1.2, borderType=cv2.BORDER_REFLECT_101)
    torch.testing.assert_close(blurred[0].permute(1, 2, 0), torch.from_numpy(reference), atol=1e-2, rtol=0)


def test_recipe_statistics_of_the_shared_draw() -> None:
    # Both paths apply draw_view's parameters; their distribution is the recipe's. Binomial bounds at
    # 5 standard deviations over 4,000 draws: a wrong probability by 0.05 fails, chance never does.
    rng, n = np.random.default_rng(11), 4000
    for recipe in (VIEW1, VIEW2):
        views = [draw_view(rng, recipe, 512, 512) for _ in range(n)]
        for rate, p in (
            (np.mean([len(v.jitter_order) > 0 for v in views]), recipe.jitter_p),
            (np.mean([v.grey for v in views]), recipe.grey_p),
            (np.mean([v.blur_sigma > 0 for v in views]), recipe.blur_p),
            (np.mean([v.solarize for v in views]), recipe.solarize_p),
            (np.mean([v.angle is not None for v in views]), recipe.rotate_p),
            (np.mean([v.hflip for v in views]), 0.5),
            (np.mean([v.vflip for v in views]), 0.5),
        ):
            assert abs(rate - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-9, (recipe, rate, p)
        areas = np.array([v.height * v.width / 512**2 for v in views])
        assert areas.min() >= recipe.scale[0] - 0.01 and areas.max() <= recipe.scale[1] + 0.01
        sigmas = [v.blur_sigma for v in views if v.blur_sigma > 0]
        assert min(sigmas) >= 0.1 and max(sigmas) <= 2.0


def test_decode_jpegs_names_and_blackens_what_does_not_decode(
    photo: tuple[np.ndarray, np.ndarray], caplog: pytest.LogCaptureFixture
) -> None:
    rgb, _ = photo
    encoded = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]))[1]
    good = torch.from_numpy(encoded.copy())
    broken = torch.cat([good[:600], torch.arange(256, dtype=torch.uint8).repeat(4), good[1624:]])
    with caplog.at_level(logging.WARNING):
        images = decode_jpegs([good, broken, good], "cpu", ["a", "b", "c"])
    assert images.shape == (3, 3, 128, 128) and images.dtype == torch.uint8
    assert (images[1] == 0).all() and torch.equal(images[0], images[2])
    assert "JPEG b does not decode" in caplog.text and "JPEG a" not in caplog.text
    # libjpeg in torchvision and in OpenCV: the same decoder, at most a level apart.
    opencv = decode_bgr(encoded.tobytes())[..., ::-1]  # type: ignore[index]
    assert np.abs(images[0].permute(1, 2, 0).numpy().astype(int) - opencv).max() <= 1
    smaller = torch.from_numpy(cv2.imencode(".jpg", rgb[:50])[1].copy())
    with pytest.raises(ValueError, match=r"different sizes .*\(50, 128\).*\(128, 128\)"):
        decode_jpegs([good, smaller], "cpu")


def test_the_encoded_stream_skips_and_names_a_truncated_jpeg(
    shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # nvjpeg decodes a truncated JPEG to garbage without an error, so the workers must refuse it, as the
    # CPU path's OpenCV does: skipped, named by key and shard in the log.
    bad_path = tmp_path / "bad.tar"
    with tarfile.open(shards / "train-000000.tar") as good, tarfile.open(bad_path, "w") as bad:
        for member in good.getmembers():
            data = good.extractfile(member).read()  # type: ignore[union-attr]
            if member.name.endswith(".jpg") and not bad.getmembers():
                data, truncated = data[: len(data) // 2], member.name.removesuffix(".jpg")
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            bad.addfile(info, io.BytesIO(data))
    index = open_shards([shards])
    one_shard = type(index)([str(bad_path)], [8], index.mean, index.std, [None], [None], [None])
    plan = EpochPlan((8,), 1, 0, 3, 2, shuffle_buffer=1)
    stream = PairStream(one_shard, PairAugment(48, index.mean, index.std), plan, rank=0, encoded=True)
    with caplog.at_level(logging.WARNING):
        batch = next(iter(pair_loader(stream)))
    assert f"skipping sample {truncated} from {bad_path}" in caplog.text and "not a whole JPEG" in caplog.text
    assert len(batch.jpegs()) == 3 and all(bytes(j[-2:].tolist()) == b"\xff\xd9" for j in batch.jpegs())


def test_the_draw_order_is_pinned() -> None:
    # Both paths draw through draw_view, and augment_view is apply_view(draw_view(...)). The generator's
    # use is pinned: the values the pre-split augment_view drew for seed 0 on a 512 px image (its views
    # were compared bit for bit before and after the split). A changed draw order changes every view of
    # every run and breaks resuming a run across versions.
    view1, view2 = PairAugment(64, MEAN, STD).draw(np.random.default_rng(0), 512, 512)
    assert view1.row() == PINNED_VIEW1 and view2.row() == PINNED_VIEW2
    assert len(view1.row()) == ViewParams.ROW


# fmt: off
PINNED_VIEW1 = [
    34.0, 6.0, 401.0, 352.0, 1.0, 2.0, 0.0, 3.0, 1.0348999931723382, 1.085308620613744, 1.0917986243935993,
    0.08701448475755366, 0.0, 1.7290681255163818, 0.0, -116.76397658307876, 0.0, 0.0,
]
PINNED_VIEW2 = [
    25.0, 19.0, 485.0, 464.0, 2.0, 3.0, 0.0, 1.0, 0.9069420434095067, 1.3977679486313688, 1.0588758046297,
    0.023077022296250777, 0.0, 0.0, 0.0, -39.988287367522645, 1.0, 0.0,
]
# fmt: on
