"""What will my run read? The pretraining stream's own code (data/loading/stream.py `read_stream`, the epoch plan
and the shard reader) run on tar headers only, for any world size, without training or decoding: per
epoch the samples read, how many distinct, how many twice, and the bytes read per byte used. A remote
source (`pipe:`, `https://`) cannot skip bytes: it is read through, as the run would read it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, cast

from ssit_dist.data.loading.batch_layout import batch_layout
from ssit_dist.data.loading.epoch import EpochPlan
from ssit_dist.data.loading.sources import ShardSet
from ssit_dist.data.loading.stream import read_stream


def dry_run(
    shards: ShardSet,
    world: int,
    workers: int,
    global_batch: int,
    epochs: int = 1,
    micro_batch: int | None = None,
    steps_per_epoch: int | None = None,
    seed: int = 0,
    piece_size: int = 64,
    shuffle_buffer: int = 1000,
) -> dict[str, Any]:
    """The report `ssit-dist data-plan` prints; the batch layout and steps per epoch as pretraining
    derives them from the same fields."""
    shards.check_counted()
    micro, accumulation = batch_layout(global_batch, world, micro_batch)
    n = shards.num_samples or 0
    steps = steps_per_epoch or max(n // global_batch, 1)
    lengths = tuple(cast(list[int], shards.lengths))  # check_counted refused any unknown length
    plan = EpochPlan(
        lengths, world, workers, micro, steps * accumulation, seed, piece_size, shuffle_buffer, shards.sequential
    )
    reads = [_read_epoch(shards, plan, epoch) for epoch in range(epochs)]
    seen_ever = set().union(*(read.ids for read in reads))
    return {
        "samples": n,
        "shards": len(shards.paths),
        "world": world,
        "workers_per_rank": workers,
        "streams": plan.streams,
        "global_batch": global_batch,
        "micro_batch": micro,
        "gradient_accumulation": accumulation,
        "steps_per_epoch": steps,
        "samples_per_epoch": plan.samples_used,
        "left_over_per_epoch": max(n - plan.samples_used, 0),
        "piece_size": piece_size,
        "shuffle_buffer": shuffle_buffer,
        "epochs": [read.report(n) for read in reads],
        "distinct_fraction_over_all_epochs": round(len(seen_ever) / n, 4),
        "every_epoch_in_another_order": all(a.ids != b.ids for a, b in itertools.combinations(reads, 2)),
    }


@dataclass(frozen=True)
class _EpochRead:
    """What every stream of every rank read in one epoch."""

    epoch: int
    ids: list[tuple[str, str]]  # (shard, key) of every sample read, as the tar names it
    bytes_read: int
    bytes_used: int

    def report(self, n: int) -> dict[str, Any]:
        """The epoch's line of the report, for a set of `n` samples."""
        distinct = len(set(self.ids))
        return {
            "epoch": self.epoch,
            "samples_read": len(self.ids),
            "distinct": distinct,
            "distinct_fraction": round(distinct / n, 4),
            "read_twice_or_more": len(self.ids) - distinct,
            "not_read": n - distinct,
            "bytes_read_per_byte_used": round(self.bytes_read / max(self.bytes_used, 1), 4),
        }


def _read_epoch(shards: ShardSet, plan: EpochPlan, epoch: int) -> _EpochRead:
    """Run every (rank, worker) stream of `epoch` on tar headers, each for its share of the samples."""
    ids: list[tuple[str, str]] = []
    bytes_read = bytes_used = 0
    for rank, worker in itertools.product(range(plan.world), range(plan.streams_per_rank)):
        reader = shards.reader(keys_only=True)
        taken = itertools.islice(read_stream(plan, epoch, rank, worker, 0, reader), plan.share(worker))
        ids += [(s["__url__"], s["__key__"]) for _, s in taken if s is not None]
        reader.close()
        bytes_read, bytes_used = bytes_read + reader.bytes_read, bytes_used + reader.bytes_used
    return _EpochRead(epoch, ids, bytes_read, bytes_used)
