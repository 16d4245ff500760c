"""Streaming pretraining pairs from WebDataset shards, with an exactly resumable order.

Every (rank, loader worker) pair is one stream. A stream draws shards at random with replacement
(weighted by their sample counts), so any number of ranks and workers works with any number of shards,
uneven ones included, and every rank yields as many batches as it is asked for. Everything random is a
pure function of (seed, epoch, stream, sample index): the shard draws and the shuffle buffer use one
generator per (seed, epoch, stream), each sample's augmentation its own. Resuming at batch k of an epoch
therefore replays the same data: each stream skips the raw samples its first batches used, without
decoding them.
"""

from __future__ import annotations

import logging
import signal
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import base_plus_ext

from ssit_dist.data.augment import PairAugment
from ssit_dist.data.index import ShardIndexError, read_index
from ssit_dist.dist import rank as dist_rank

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ShardSet:
    """Shards of one or more packed folders, with what normalisation needs."""

    paths: list[str]
    lengths: list[int]
    mean: list[float]
    std: list[float]

    @property
    def num_samples(self) -> int:
        return sum(self.lengths)


def open_shards(folders: list[Path], split: str = "train") -> ShardSet:
    """The `split` shards of every folder (each written by `ssit-dist shard`). Mean/std are the
    sample-weighted average of the folders' statistics."""
    if not folders:
        raise ShardIndexError("no shard folders given")
    paths, lengths, means, stds, weights = [], [], [], [], []
    for folder in folders:
        index = read_index(Path(folder))
        paths += [str(p) for p in index.shard_paths(Path(folder), split)]
        lengths += index.splits[split].shard_lengths
        means.append(index.mean)
        stds.append(index.std)
        weights.append(index.splits[split].num_samples)
    w = np.array(weights, np.float64) / sum(weights)
    mean = (w[:, None] * np.array(means)).sum(0).round(6).tolist()
    std = (w[:, None] * np.array(stds)).sum(0).round(6).tolist()
    return ShardSet(paths, lengths, mean, std)


class PairStream(IterableDataset):
    """Infinite stream of augmented (x1, x2, s1, s2) pairs for one rank; see the module docstring."""

    def __init__(self, shards: ShardSet, augment: PairAugment, batch_size: int, seed: int = 0,
                 shuffle_buffer: int = 1000, rank: int | None = None):
        super().__init__()
        self.shards, self.augment = shards, augment
        self.batch_size, self.seed, self.shuffle_buffer = batch_size, seed, shuffle_buffer
        self.epoch, self.skip_batches = 0, 0
        self.rank = dist_rank() if rank is None else rank

    def set_position(self, epoch: int, skip_batches: int = 0) -> None:
        """Start the next iteration at batch `skip_batches` of `epoch` (call before iterating)."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def _raw_samples(self, rng: np.random.Generator) -> Iterator[dict]:
        p = np.array(self.shards.lengths, np.float64)
        p /= p.sum()
        while True:
            yield from read_shard(self.shards.paths[int(rng.choice(len(p), p=p))])

    def _shuffled(self, rng: np.random.Generator) -> Iterator[dict]:
        buffer: list[dict] = []
        for sample in self._raw_samples(rng):
            buffer.append(sample)
            if len(buffer) >= self.shuffle_buffer:
                k = int(rng.integers(len(buffer)))
                buffer[k], buffer[-1] = buffer[-1], buffer[k]
                yield buffer.pop()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        stream = self.rank * workers + worker
        rng = np.random.default_rng([self.seed, self.epoch, stream])
        # Loader batch j comes from worker j % workers: this worker's share of the skipped batches.
        skip = (self.skip_batches - worker + workers - 1) // workers * self.batch_size
        for i, sample in enumerate(self._shuffled(rng)):
            if i < skip:
                continue
            pair = self._decode_and_augment(sample, np.random.default_rng([self.seed, self.epoch, stream, i]))
            if pair is not None:
                yield pair

    def _decode_and_augment(self, sample: dict, rng: np.random.Generator) -> tuple[torch.Tensor, ...] | None:
        try:
            image = cv2.imdecode(np.frombuffer(sample["jpg"], np.uint8), cv2.IMREAD_COLOR)
            sal = cv2.imdecode(np.frombuffer(sample["sal.png"], np.uint8), cv2.IMREAD_UNCHANGED)
            if image is None or sal is None:
                raise ValueError("undecodable jpg or sal.png")
            return self.augment(image, sal, rng)
        except (KeyError, ValueError, cv2.error) as e:
            # One bad sample never stops a long run; it is named in the log, not dropped silently.
            log.warning("skipping sample %s from %s: %s", sample.get("__key__"), sample.get("__url__"), e)
            return None


def read_shard(path: str) -> Iterator[dict]:
    """Samples of one WebDataset tar, members grouped by key as webdataset does. The file closes when
    the generator does (webdataset's own reader leaves that to the garbage collector); a damaged tar is
    logged and read up to the damage."""
    sample: dict = {}
    try:
        with tarfile.open(path, "r|") as tar:
            for member in tar:
                split = base_plus_ext(member.name) if member.isfile() else None
                if split is None or split[0] is None:
                    continue
                key, ext = split
                if sample and sample["__key__"] != key:
                    yield sample
                    sample = {}
                sample.setdefault("__key__", key)
                sample["__url__"] = path
                sample[ext] = tar.extractfile(member).read()  # type: ignore[union-attr]
    except (tarfile.TarError, OSError) as e:
        log.warning("shard %s is damaged, reading stopped there: %s", path, e)
    if sample:
        yield sample


def _worker_init(_: int) -> None:
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    # SLURM signals every process of a job step; the trainer decides when to stop, so a loader worker
    # must not die on the preemption signal before the trainer has saved its checkpoint.
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


def pair_loader(stream: PairStream, workers: int = 2, prefetch: int = 2, pin_memory: bool = False) -> DataLoader:
    """Batches of `stream.batch_size` pairs; iterate it for as many steps as an epoch has."""
    # forkserver, not fork: a worker forked after OpenCV started its thread pool deadlocks in OpenCV.
    return DataLoader(stream, batch_size=stream.batch_size, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=prefetch if workers else None, worker_init_fn=_worker_init,
                      multiprocessing_context="forkserver" if workers else None, drop_last=True)
