"""View retrieval: a self-supervised health check that needs no labels.

Each of N held-out photographs is augmented into two views; an encoder embeds all 2N views, and a view
counts as retrieved when the most cosine-similar view of the other set is its own partner. The score is
the top-1 rate, averaged over both directions; chance is 1/N. A pretraining that learns moves it up
from chance long before labels can tell; a collapsed encoder (every view the same embedding) sits at
chance. The pairs are fixed by a seed, so runs and checkpoints are compared on the same views.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch

from ssit_dist.data.loading.augment import PairAugment
from ssit_dist.data.loading.sources import ShardSet
from ssit_dist.data.loading.stream import decode_and_augment
from ssit_dist.data.loading.tar_reader import read_shard


def fixed_pairs(shards: ShardSet, augment: PairAugment, count: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views (x1, x2) of each of the first `count` samples of `shards` that decode, in shard order,
    each augmented with its own seeded generator: the same tensors on every call, on every rank."""
    first: list[torch.Tensor] = []
    second: list[torch.Tensor] = []
    for url in shards.paths:
        with contextlib.closing(read_shard(url)) as samples:
            for sample in samples:
                pair = decode_and_augment(sample, augment, np.random.default_rng([seed, len(first)]))
                if pair is not None:
                    first.append(pair[0])
                    second.append(pair[1])
                if len(first) == count:
                    return torch.stack(first), torch.stack(second)
    if len(first) < 2:
        raise ValueError(
            f"view retrieval needs at least 2 samples that decode; {', '.join(shards.paths)} gave {len(first)}"
        )
    return torch.stack(first), torch.stack(second)


@torch.no_grad()
def retrieval_top1(
    embed: Callable[[torch.Tensor], torch.Tensor], x1: torch.Tensor, x2: torch.Tensor, batch: int = 64
) -> float:
    """Top-1 rate at which each view's nearest view (cosine) in the other set is its partner, averaged
    over both directions. `embed` maps a batch of views to one row each."""
    if len(x1) != len(x2) or len(x1) < 2:
        raise ValueError(f"need two equally long sets of at least 2 views, got {len(x1)} and {len(x2)}")

    def embed_all(views: torch.Tensor) -> torch.Tensor:
        rows = [embed(views[i : i + batch]).float().cpu() for i in range(0, len(views), batch)]
        return torch.nn.functional.normalize(torch.cat(rows), dim=1)

    similarity = embed_all(x1) @ embed_all(x2).T
    partner = torch.arange(len(x1))
    hits = int((similarity.argmax(dim=1) == partner).sum()) + int((similarity.argmax(dim=0) == partner).sum())
    return hits / (2 * len(x1))
