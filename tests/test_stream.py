"""Streaming pretraining pairs from real shards: shapes, exact resume, ranks, uneven shards, bad samples."""

from __future__ import annotations

import io
import itertools
import logging
import tarfile
from pathlib import Path

import pytest
import torch

from conftest import pack_real_subset
from ssit_dist.data.augment import PairAugment
from ssit_dist.data.index import ShardIndexError
from ssit_dist.data.stream import PairStream, open_shards, pair_loader


@pytest.fixture(scope="module")
def shards(graded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """23 real photographs at 64 px in uneven shards of 5 (5, 5, 5, 5, 3)."""
    return pack_real_subset(graded_dir, tmp_path_factory, 23, size=64, shard_size=5)


def make_stream(folder: Path, rank: int = 0, seed: int = 0) -> PairStream:
    shard_set = open_shards([folder])
    return PairStream(shard_set, PairAugment(32, shard_set.mean, shard_set.std), batch_size=4, seed=seed,
                      shuffle_buffer=8, rank=rank)


def take(stream: PairStream, n: int, workers: int) -> list[tuple[torch.Tensor, ...]]:
    return list(itertools.islice(iter(pair_loader(stream, workers=workers)), n))


def test_batches_have_the_right_shapes(shards: Path) -> None:
    shard_set = open_shards([shards])
    assert shard_set.num_samples == 23 and shard_set.lengths == [5, 5, 5, 5, 3]
    x1, x2, s1, s2 = take(make_stream(shards), 1, workers=0)[0]
    assert x1.shape == x2.shape == (4, 3, 32, 32) and s1.shape == s2.shape == (4, 1, 32, 32)
    assert s1.max() <= 1 and s1.min() >= 0 and s1.max() > 0


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_mid_epoch_replays_the_same_batches(shards: Path, workers: int) -> None:
    stream = make_stream(shards)
    stream.set_position(epoch=3)
    full = take(stream, 7, workers)
    stream.set_position(epoch=3, skip_batches=4)
    resumed = take(stream, 3, workers)
    for a, b in zip(full[4:], resumed):
        assert all(torch.equal(u, v) for u, v in zip(a, b))
    stream.set_position(epoch=4)
    assert not torch.equal(take(stream, 1, workers)[0][0], full[0][0])  # a new epoch, new data


def test_ranks_see_different_data_and_never_run_dry(shards: Path) -> None:
    # 2 ranks x 2 workers = 4 streams over 5 uneven shards: each stream resamples, none runs out.
    a = take(make_stream(shards, rank=0), 12, workers=2)
    b = take(make_stream(shards, rank=1), 12, workers=2)
    assert len(a) == len(b) == 12
    assert not torch.equal(a[0][0], b[0][0])


def test_a_bad_sample_is_logged_and_skipped(shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    bad_path = tmp_path / "bad.tar"
    with tarfile.open(shards / "train-000000.tar") as good, tarfile.open(bad_path, "w") as bad:
        for member in good.getmembers():
            data = good.extractfile(member).read()  # type: ignore[union-attr]
            if member.name.endswith(".jpg") and not list(bad.getmembers()):
                data = b"not a jpeg"
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            bad.addfile(info, io.BytesIO(data))
    shard_set = open_shards([shards])
    shard_set = type(shard_set)([str(bad_path)], [5], shard_set.mean, shard_set.std)
    stream = PairStream(shard_set, PairAugment(32, shard_set.mean, shard_set.std), batch_size=4, shuffle_buffer=1)
    with caplog.at_level(logging.WARNING):
        batches = take(stream, 3, workers=0)
    assert len(batches) == 3
    assert "skipping sample" in caplog.text and "undecodable" in caplog.text


def test_missing_folder_and_split_are_named(shards: Path, tmp_path: Path) -> None:
    with pytest.raises(ShardIndexError, match="not found"):
        open_shards([tmp_path / "nowhere"])
    with pytest.raises(ShardIndexError, match="no split 'val'"):
        open_shards([shards], split="val")
