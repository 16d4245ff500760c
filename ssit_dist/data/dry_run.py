"""What will my run read? The pretraining stream's own code (data/stream.py `read_stream`, the epoch plan
and the shard reader) run on tar headers only, for any world size, without training or decoding: per
epoch the samples read, how many distinct, how many twice, and the bytes read per byte used."""

from __future__ import annotations

import itertools
from typing import Any

from ssit_dist.config import batch_layout
from ssit_dist.data.epoch import EpochPlan
from ssit_dist.data.sources import ShardSet
from ssit_dist.data.stream import read_stream


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
    plan = EpochPlan(
        tuple(shards.lengths),  # type: ignore[arg-type]
        world,
        workers,
        micro,
        steps * accumulation,
        seed,
        piece_size,
        shuffle_buffer,
    )
    seen_ever: set[tuple[str, str]] = set()
    per_epoch = []
    orders = []
    for epoch in range(epochs):
        ids: list[tuple[str, str]] = []  # (shard, key) of every sample read, as the tar names it
        bytes_read = bytes_used = 0
        for rank, worker in itertools.product(range(world), range(plan.streams_per_rank)):
            reader = shards.reader(keys_only=True)
            taken = itertools.islice(read_stream(plan, epoch, rank, worker, 0, reader), plan.share(worker))
            ids += [(s["__url__"], s["__key__"]) for _, s in taken if s is not None]
            reader.close()
            bytes_read, bytes_used = bytes_read + reader.bytes_read, bytes_used + reader.bytes_used
        distinct = set(ids)
        seen_ever |= distinct
        orders.append(ids)
        per_epoch.append(
            {
                "epoch": epoch,
                "samples_read": len(ids),
                "distinct": len(distinct),
                "distinct_fraction": round(len(distinct) / n, 4),
                "read_twice_or_more": len(ids) - len(distinct),
                "not_read": n - len(distinct),
                "bytes_read_per_byte_used": round(bytes_read / max(bytes_used, 1), 4),
            }
        )
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
        "epochs": per_epoch,
        "distinct_fraction_over_all_epochs": round(len(seen_ever) / n, 4),
        "every_epoch_in_another_order": all(a != b for a, b in itertools.combinations(orders, 2)),
    }
