"""Streaming pretraining pairs from WebDataset shards: each epoch a pass over the data, exactly resumable.

Every (rank, loader worker) pair is one stream; data/loading/epoch.py says which samples each stream reads in an
epoch (every sample once over all streams, for any number of shards against any number of streams) and in
which order. Everything random is a pure function of (seed, epoch, stream, position): the epoch's order,
the shuffle buffer, and each sample's augmentation (its own generator). Resuming at batch k of an epoch
therefore replays the same data: each stream drops the positions its first batches used, unread.

A sample that cannot be used (an undecodable image, a missing member, a shard that ends early) keeps its
position: a black stand-in takes its place in the batch. Were it dropped, the stream's later batches would
each move up a sample, and a resume, which skips batch-count positions, would read another epoch than the
uninterrupted run (the displaced samples twice). Stand-ins wait for the stream's next usable sample
(whose size they take), so a source with no usable sample yields nothing and `empty_timeout_s` names it.
"""

from __future__ import annotations

import functools
import itertools
import logging
import time
from collections.abc import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ssit_dist.data.decode import decode_bgr, decode_gray
from ssit_dist.data.loading.augment import PairAugment
from ssit_dist.data.loading.device_augment import collate_encoded
from ssit_dist.data.loading.epoch import EpochPlan
from ssit_dist.data.loading.sources import ShardSet, SourceError
from ssit_dist.data.loading.tar_reader import ShardReader
from ssit_dist.data.loading.workers import ignore_preemption, worker_options
from ssit_dist.dist import rank as dist_rank

log = logging.getLogger(__name__)


class PairStream(IterableDataset):
    """Infinite stream of augmented (x1, x2, s1, s2) pairs for one rank; see the module docstring."""

    def __init__(
        self,
        shards: ShardSet,
        augment: PairAugment,
        plan: EpochPlan,
        rank: int | None = None,
        empty_timeout_s: float = 300.0,
        encoded: bool = False,
    ):
        """`plan` must count the loader's workers (`plan.workers`). `encoded`: yield what the device-side
        augmentation takes (data/loading/device_augment.py) instead of augmented pairs: the JPEG bytes, the
        decoded saliency map and both views' drawn parameters."""
        super().__init__()
        if list(plan.lengths) != shards.lengths or plan.sequential != shards.sequential:
            raise ValueError("the epoch plan was made for other shards")
        self.shards, self.augment, self.plan, self.encoded = shards, augment, plan, encoded
        self.empty_timeout_s = empty_timeout_s
        self.batch_size = plan.micro_batch
        self.epoch, self.skip_batches = 0, 0
        self.rank = dist_rank() if rank is None else rank

    def set_position(self, epoch: int, skip_batches: int = 0) -> None:
        """Start the next iteration at batch `skip_batches` of `epoch` (call before iterating)."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def _worker(self) -> int:
        """The stream this loader worker plays. Loader batch j comes from worker j % workers; a loader
        resumed at batch k must give batch k first, so its worker w plays stream (w + k) % workers."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (0, 0)
        if workers != self.plan.workers:
            raise ValueError(f"the loader has {workers} workers, its epoch plan {self.plan.workers}")
        return (worker + self.skip_batches) % self.plan.streams_per_rank

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        worker = self._worker()
        stream = self.rank * self.plan.streams_per_rank + worker
        reader = self.shards.reader()
        last_good = time.monotonic()
        unusable: list[tuple[int, dict | None]] = []  # (position, sample) waiting for a usable sample's size
        try:
            samples = read_stream(self.plan, self.epoch, self.rank, worker, self.skip_batches, reader)
            for position, sample in samples:
                pair = None if sample is None else self._prepare(sample, stream, position)
                if sample is None or pair is None:
                    unusable.append((position, sample))
                    if time.monotonic() - last_good > self.empty_timeout_s:
                        raise SourceError(
                            f"no usable sample for {self.empty_timeout_s:g} s from the shards of data.shards (the "
                            f"last one tried: {sample.get('__url__') if sample else '?'}): every sample was "
                            "undecodable or lacked jpg/sal.png, or the shards end early (see the warnings above); "
                            "check the shards"
                        )
                    continue
                last_good = time.monotonic()
                for bad_position, bad in unusable:
                    standing = self._prepare(stand_in(bad, sample), stream, bad_position)
                    assert standing is not None  # a black photograph and an empty map always decode
                    yield standing
                unusable.clear()
                yield pair
        finally:
            reader.close()

    def _prepare(self, sample: dict, stream: int, position: int) -> tuple | None:
        """What the loader yields for one sample, drawn from the position's own generator; None where the
        sample cannot be used (logged)."""
        rng = np.random.default_rng([self.plan.seed, self.epoch, stream, position])
        if self.encoded:
            return jpeg_and_draws(sample, self.augment, rng)
        return decode_and_augment(sample, self.augment, rng)


def stand_in(bad: dict | None, like: dict) -> dict:
    """A black photograph with an empty saliency map, as large as the usable sample `like`, named as the
    unusable sample `bad` (None: the reader found none) whose place it takes (see the module docstring)."""
    names = {k: v for k, v in (bad or {}).items() if k in ("__key__", "__url__")}
    log.warning("a black stand-in takes the place of sample %s from %s", names.get("__key__"), names.get("__url__"))
    sal = decode_gray(like["sal.png"])
    jpg, png = _black(*sal.shape)  # type: ignore[union-attr]  # `like` was usable: its map decodes
    return {"__key__": "?", "__url__": "?", **names, "jpg": jpg, "sal.png": png}


@functools.cache
def _black(height: int, width: int) -> tuple[bytes, bytes]:
    """A black JPEG and an all-zero PNG of height x width, encoded once per size."""
    jpg, png = (
        cv2.imencode(".jpg", np.zeros((height, width, 3), np.uint8)),
        cv2.imencode(".png", np.zeros((height, width), np.uint8)),
    )
    return jpg[1].tobytes(), png[1].tobytes()


def read_stream(
    plan: EpochPlan, epoch: int, rank: int, worker: int, skip_batches: int, reader: ShardReader
) -> Iterator[tuple[int, dict | None]]:
    """(position, sample) in the order stream (rank, worker) yields them from batch `skip_batches` of the
    rank on: read in the plan's reading order, held until the shuffle buffer lets them out, those before
    `skip_batches` never read. None where the reader found no sample (it logs why)."""
    per_rank = plan.streams_per_rank
    # Batch j of an epoch comes from stream j % workers: this stream's share of the skipped batches.
    skip = (skip_batches - worker + per_rank - 1) // per_rank * plan.micro_batch
    order = plan.emitted(epoch, rank, worker)
    skipped = set(itertools.islice(order, skip))
    sequence = plan.sequence(epoch, rank, worker)
    held: dict[int, dict | None] = {}
    read = 0  # positions of `sequence` read (or passed over) so far
    for position in order:
        while read <= position:
            global_id = next(sequence)
            if read in skipped:
                skipped.discard(read)
            else:
                held[read] = reader.read(global_id)
            read += 1
        yield position, held.pop(position)


def decode_and_augment(sample: dict, augment: PairAugment, rng: np.random.Generator) -> tuple[torch.Tensor, ...] | None:
    """(x1, x2, s1, s2) of one shard sample, or None for a sample that does not decode."""
    try:
        image, sal = decode_bgr(sample["jpg"]), decode_gray(sample["sal.png"])
        if image is None or sal is None:
            raise ValueError("undecodable jpg or sal.png")
        return augment(image, sal, rng)
    except (KeyError, ValueError, cv2.error) as e:
        # One bad sample never stops a long run; it is named in the log, not dropped silently.
        log.warning("skipping sample %s from %s: %s", sample.get("__key__"), sample.get("__url__"), e)
        return None


def jpeg_and_draws(sample: dict, augment: PairAugment, rng: np.random.Generator) -> tuple | None:
    """(JPEG bytes, saliency map (H, W) uint8, view 1's and view 2's parameters, name) of one shard sample,
    the parameters drawn as the CPU path draws them; None for a sample that cannot be used. No tensor per
    sample: collate_encoded puts a batch in one buffer. The JPEG itself is decoded on the training device
    (decode.decode_jpegs says what happens where it fails)."""
    name = f"{sample.get('__url__')}:{sample.get('__key__')}"
    try:
        jpeg, sal = sample["jpg"], decode_gray(sample["sal.png"])
        # A truncated JPEG lacks the end marker: OpenCV refuses it, nvjpeg decodes garbage without a word.
        if sal is None or not (jpeg.startswith(b"\xff\xd8") and jpeg.endswith(b"\xff\xd9")):
            raise ValueError("undecodable sal.png, or a jpg that is not a whole JPEG")
    except (KeyError, ValueError, cv2.error) as e:
        log.warning("skipping sample %s from %s: %s", sample.get("__key__"), sample.get("__url__"), e)
        return None
    view1, view2 = augment.draw(rng, *sal.shape)
    return jpeg, sal, np.array(view1.row()), np.array(view2.row()), name


def pair_loader(
    stream: PairStream, prefetch: int = 2, pin_memory: bool = False, stall_timeout_s: float = 0
) -> DataLoader:
    """Batches of `stream.batch_size` pairs from `stream.plan.workers` processes; iterate it (with
    `start_batches`) for as many batches as an epoch has. With workers, waiting longer than
    `stall_timeout_s` (0: forever) for a batch raises (torch's RuntimeError)."""
    workers = stream.plan.workers
    return DataLoader(
        stream,
        batch_size=stream.batch_size,
        pin_memory=pin_memory,
        timeout=stall_timeout_s if workers else 0,
        drop_last=True,
        collate_fn=collate_encoded if stream.encoded else None,
        prefetch_factor=prefetch if workers else None,
        **worker_options(workers, ignore_preemption),
    )
