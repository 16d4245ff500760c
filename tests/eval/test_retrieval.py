"""View retrieval (ssit_dist.eval.retrieval): exact on constructed embeddings, fixed pairs on real shards."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import pack_real_subset
from ssit_dist.data.loading.augment import PairAugment
from ssit_dist.data.loading.sources import open_shards
from ssit_dist.eval.retrieval import fixed_pairs, retrieval_top1


def flatten(x: torch.Tensor) -> torch.Tensor:
    return x.flatten(1)


def test_each_partner_is_found_and_only_its_own() -> None:
    views = torch.randn(10, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert retrieval_top1(flatten, views, views.clone()) == 1.0
    # Partners shuffled but for 4 fixed points: only those 4 are retrieved, in both directions.
    order = torch.tensor([0, 1, 2, 3, 5, 6, 7, 8, 9, 4])
    assert retrieval_top1(flatten, views, views[order], batch=3) == 0.4


def test_a_collapsed_encoder_sits_at_chance() -> None:
    views = torch.randn(8, 3, 4, 4)
    assert retrieval_top1(lambda x: torch.ones(len(x), 5), views, views) == 1 / 8


def test_mismatched_or_too_few_views_are_refused() -> None:
    with pytest.raises(ValueError, match="equally long"):
        retrieval_top1(flatten, torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="at least 2"):
        retrieval_top1(flatten, torch.randn(1, 3), torch.randn(1, 3))


@pytest.fixture(scope="module")
def shards(graded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pack_real_subset(graded_dir, tmp_path_factory, 9, size=64, shard_size=4)


def test_pairs_are_fixed_two_different_views_of_each_photograph(shards: Path) -> None:
    shard_set = open_shards([shards])
    augment = PairAugment(32, shard_set.mean, shard_set.std)
    x1, x2 = fixed_pairs(shard_set, augment, 7)
    again = fixed_pairs(shard_set, augment, 7)
    assert x1.shape == x2.shape == (7, 3, 32, 32)
    assert torch.equal(x1, again[0]) and torch.equal(x2, again[1])  # the same views every call
    assert not any(torch.equal(a, b) for a, b in zip(x1, x2, strict=True))
    assert not torch.equal(fixed_pairs(shard_set, augment, 7, seed=1)[0], x1)
    everything, _ = fixed_pairs(shard_set, augment, 100)  # fewer samples than asked: all of them
    assert len(everything) == 9 and torch.equal(everything[:7], x1)


def test_a_source_without_two_samples_is_named(shards: Path, tmp_path: Path) -> None:
    one = tmp_path / "train-000000.tar"
    one.write_bytes((shards / "train-000002.tar").read_bytes())  # the last shard holds one sample
    shard_set = open_shards([str(one)])
    with pytest.raises(ValueError, match=rf"at least 2 samples that decode; {one} gave 1"):
        fixed_pairs(shard_set, PairAugment(32, [0.5] * 3, [0.25] * 3), 5)
