"""Samples a remote-shard run reads per sample it uses, from the epoch plan alone; prints one JSON object.

A remote shard (`pipe:`, `https://`, `s3://`) cannot seek: to reach a sample the reader passes over
every sample before it in the tar, and going back means opening the shard again. For EyePACS-sized
sets and cluster layouts this counts, per epoch over all (rank, worker) streams, the samples passed over
or read against the samples used (every sample taken as equally large, so it is also bytes read per
byte used), both ways in one run:
- `pieces`: the plan local shards get (shards cut into 64-sample pieces dealt to all streams), read
  through a remote source: what ssit-dist did before remote shards were planned whole;
- `whole`: the plan for sequential shards (data/loading/epoch.py: one piece per shard, rotated so that
  the streams that split a shard pass over the smaller part).
No data is read: `ssit-dist data-plan` on a `pipe:` source measures real bytes for one run's layout.

Usage: python bench/perf/remote_reads.py
"""

from __future__ import annotations

import itertools
import json

import numpy as np

from ssit_dist.data.loading.epoch import EpochPlan

# (samples, shard size, ranks, workers per rank, global batch): EyePACS train (35,126) and all (88,702).
LAYOUTS = [
    (35126, 512, 8, 6, 512),
    (35126, 512, 16, 6, 512),
    (35126, 256, 16, 6, 512),
    (88702, 512, 8, 6, 512),
    (88702, 512, 64, 6, 4096),
    (88702, 128, 64, 6, 4096),
]


def passed_per_used(plan: EpochPlan, epoch: int) -> float:
    """Samples each stream's reader passes over or reads, per sample used, over all streams: a reader
    reads on within a shard and reopens it to go back or after another shard."""
    first = np.cumsum(plan.lengths) - plan.lengths
    passed = used = 0
    for rank, worker in itertools.product(range(plan.world), range(plan.streams_per_rank)):
        ids = np.fromiter(itertools.islice(plan.sequence(epoch, rank, worker), plan.share(worker)), np.int64)
        shards = np.searchsorted(first, ids, side="right") - 1
        shard, position = -1, 0  # the open shard and the next member it gives
        for s, member in zip(shards.tolist(), (ids - first[shards]).tolist(), strict=True):
            if s != shard or member < position:
                shard, position = s, 0
            passed += member - position + 1
            position = member + 1
        used += len(ids)
    return round(passed / used, 3)


def main() -> None:
    rows = []
    for samples, shard_size, world, workers, batch in LAYOUTS:
        lengths = tuple(
            [shard_size] * (samples // shard_size) + ([samples % shard_size] if samples % shard_size else [])
        )
        args = (lengths, world, workers, batch // world, samples // batch)
        pieces, whole = EpochPlan(*args), EpochPlan(*args, sequential=(True,) * len(lengths))
        rows.append(
            {
                "samples": samples,
                "shard_size": shard_size,
                "world": world,
                "workers": workers,
                "share_per_stream": whole.share(0),
                "pieces": [passed_per_used(pieces, epoch) for epoch in range(2)],
                "whole": [passed_per_used(whole, epoch) for epoch in range(2)],
            }
        )
    print(json.dumps({"what": "samples passed over or read per sample used, remote shards, epochs 0-1", "rows": rows}))


if __name__ == "__main__":
    main()
