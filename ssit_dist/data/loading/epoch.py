"""Which samples each loader stream reads in an epoch: a pass over the data, as torch's
DistributedSampler makes one for a map-style dataset, for shards that are read as streams.

The data is N samples in shards; a sample is named by its global id (shard offset + index in shard).
Each epoch cuts every shard into pieces of `piece_size` consecutive samples, at an offset drawn per
shard and epoch so that pieces differ between epochs, shuffles the pieces and lays them end to end: the
epoch's order. Stream s = rank * streams_per_rank + worker takes the next `share(rank, worker)` samples
of that order, streams in order, so the shares tile the first U = batches_per_rank * world * micro_batch
samples exactly once; the N - U samples that do not fill a global batch wait for the next epoch's other
order. A stream reads its share in order (a seek per piece, then consecutive tar members) and shuffles
it through a buffer of positions, so the buffer holds bytes only for samples already read.

A shard that can only be read from its start (a remote source: `pipe:`, `https://`, `s3://`) is one
piece, never cut: a stream reads its part of the shard in one pass. Where a share boundary splits such a
shard, its samples are rotated so that the larger part starts the tar (or the part this epoch uses, where
the other is left over): the stream holding the other part skips the fewer samples. A stream's reads
per sample used then stay near 1 where its share spans several shards (`ssit-dist data-plan` says how
near); local shards keep their pieces and seeks.

After its share a stream goes on, where a prefetch ran ahead of the epoch's end: first through its own
part of the N - U left-over samples, then around the order again. Everything is a pure function of
(seed, epoch, stream), so a resumed stream drops the positions its first batches used without reading
them.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

_PIECES = 0x5EED  # separates the pieces' generator from the streams' (seed, epoch, stream) ones


@dataclass(frozen=True)
class EpochPlan:
    lengths: tuple[int, ...]  # samples per shard
    world: int
    workers: int  # loader workers per rank; 0 loads in the trainer: one stream per rank
    micro_batch: int
    batches_per_rank: int  # loader batches each rank takes per epoch: steps_per_epoch * accumulation
    seed: int = 0
    piece_size: int = 64
    shuffle_buffer: int = 1000
    sequential: tuple[bool, ...] = ()  # per shard: readable only from its start (remote); () for none

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 0 or sum(self.lengths) == 0:
            raise ValueError(f"an epoch needs shards with samples; the shard lengths are {list(self.lengths)[:8]}")
        # One spelling per plan, so that equal plans compare (and hash) equal.
        object.__setattr__(self, "sequential", tuple(map(bool, self.sequential)) or (False,) * len(self.lengths))
        if len(self.sequential) != len(self.lengths):
            raise ValueError(f"EpochPlan.sequential names {len(self.sequential)} shards, lengths {len(self.lengths)}")
        for name in ("world", "micro_batch", "batches_per_rank", "piece_size", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"EpochPlan.{name} must be at least 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ValueError(f"EpochPlan.workers must be 0 or more, got {self.workers}")

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)

    @property
    def streams_per_rank(self) -> int:
        return max(self.workers, 1)

    @property
    def streams(self) -> int:
        return self.world * self.streams_per_rank

    @property
    def samples_used(self) -> int:
        """U: the samples all ranks take per epoch."""
        return self.batches_per_rank * self.world * self.micro_batch

    def share(self, worker: int) -> int:
        """Samples one stream takes per epoch: loader batch j of a rank comes from worker j % workers."""
        per_rank = self.streams_per_rank
        return (self.batches_per_rank - worker + per_rank - 1) // per_rank * self.micro_batch

    def start(self, rank: int, worker: int) -> int:
        """Where stream (rank, worker)'s share begins in the epoch's order (before wrapping round it)."""
        return rank * self.batches_per_rank * self.micro_batch + sum(self.share(w) for w in range(worker))

    def order(self, epoch: int) -> np.ndarray:
        """Global ids of all N samples in the epoch's order: shuffled pieces of consecutive samples."""
        if any(self.sequential):
            return _rotated(self, epoch)
        return _order(self.lengths, self.piece_size, self.seed, epoch, self.sequential)

    def sequence(self, epoch: int, rank: int, worker: int) -> Iterator[int]:
        """The global ids stream (rank, worker) reads, in reading order: its share, then on (infinite)."""
        order = self.order(epoch)
        n, stream = len(order), rank * self.streams_per_rank + worker
        start = self.start(rank, worker)
        for position in range(start, start + self.share(worker)):
            yield int(order[position % n])
        left_over = max(n - self.samples_used, 0)
        position = self.samples_used + stream * left_over // self.streams
        while True:
            yield int(order[position % n])
            position += 1

    def emitted(self, epoch: int, rank: int, worker: int) -> Iterator[int]:
        """Positions in `sequence` in the order the stream yields them: its share through the shuffle
        buffer (drained at the share's end, so no sample of the continuation mixes into the epoch), then
        the continuation in reading order. The i-th position yielded is below i + shuffle_buffer: a reader
        that reads in order holds at most shuffle_buffer samples it has not yielded yet."""
        rng = np.random.default_rng([self.seed, epoch, rank * self.streams_per_rank + worker])
        yield from shuffled(range(self.share(worker)), rng, self.shuffle_buffer)
        position = self.share(worker)
        while True:
            yield position
            position += 1


def shuffled(items: Sequence[int], rng: np.random.Generator, buffer_size: int) -> Iterator[int]:
    """`items` through a shuffle buffer of `buffer_size`, as WebDataset's shuffle does."""
    buffer: list[int] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= buffer_size:
            k = int(rng.integers(len(buffer)))
            buffer[k], buffer[-1] = buffer[-1], buffer[k]
            yield buffer.pop()
    rng.shuffle(buffer)
    yield from buffer


@functools.lru_cache(maxsize=2)  # every stream of a process (a dry run plans them all) shares its epoch's order
def _order(
    lengths: tuple[int, ...], piece_size: int, seed: int, epoch: int, sequential: tuple[bool, ...]
) -> np.ndarray:
    counts = np.asarray(lengths, np.int64)
    whole = np.asarray(sequential, bool)
    rng = np.random.default_rng([seed, epoch, _PIECES])
    shift = rng.integers(0, piece_size, size=len(counts))  # where each shard's pieces are cut, this epoch
    shift[whole] = 0  # a shard read from its start is one piece
    size = np.where(whole, np.maximum(counts, 1), piece_size)
    shard_of = np.repeat(np.arange(len(counts)), counts)
    ids = np.arange(int(counts.sum()))
    local = ids - (np.cumsum(counts) - counts)[shard_of]
    pieces_per_shard = np.where(counts > 0, (counts - 1 + shift) // size + 1, 0)
    piece = (np.cumsum(pieces_per_shard) - pieces_per_shard)[shard_of] + (local + shift[shard_of]) // size[shard_of]
    rank_of_piece = rng.permutation(int(pieces_per_shard.sum()))
    order = ids[np.argsort(rank_of_piece[piece], kind="stable")]  # stable: a piece stays in shard order
    order.flags.writeable = False  # shared by every caller
    return order


@functools.lru_cache(maxsize=2)
def _rotated(plan: EpochPlan, epoch: int) -> np.ndarray:
    """The epoch's order with each sequential shard's samples rotated so that the streams sharing it pass
    over the fewest: a stream reads its part of such a shard from the tar's start, skipping what precedes.
    A shard that fills the whole order (the only one) has the part that starts its tar drawn instead:
    otherwise the same samples would be left over every epoch."""
    order = _order(plan.lengths, plan.piece_size, plan.seed, epoch, plan.sequential)
    n, used = len(order), plan.samples_used
    cuts = {plan.start(rank, worker) % n for rank in range(plan.world) for worker in range(plan.streams_per_rank)}
    cuts.add(used % n)  # the left-over begins: positions from here on are read only where shares wrap
    where = np.empty(n, np.int64)
    where[order] = np.arange(n)
    rotated = order.copy()
    firsts = np.cumsum(plan.lengths) - plan.lengths
    for shard in np.flatnonzero(plan.sequential):
        count, first = plan.lengths[shard], int(firsts[shard])
        if count < 2:
            continue
        a = int(where[first])  # one piece, in shard order: order[a : a + count] is first, first + 1, ...
        starts = sorted({0} | {c - a for c in cuts if a < c < a + count})  # where each stream's part begins
        if count == n:
            start = starts[np.random.default_rng([plan.seed, epoch, _PIECES, 1]).integers(len(starts))]
        else:
            start = _best_start(starts, [used >= n or a + part < used for part in starts], count)
        rotated[a : a + count] = first + (np.arange(count) - start) % count
    rotated.flags.writeable = False
    return rotated


def _best_start(starts: list[int], read: list[bool], count: int) -> int:
    """Of the parts of a shard of `count` samples (each from its start to the next), the start of the one
    to put first in the tar: the one for which the parts that are read pass over the fewest samples."""

    def passed_over(first: int) -> int:
        return sum((start - first) % count for start, r in zip(starts, read, strict=True) if r)

    return min(starts, key=lambda first: (passed_over(first), first))
