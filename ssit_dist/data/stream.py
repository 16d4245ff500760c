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
import time
from collections.abc import Iterator

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ssit_dist.data.augment import PairAugment
from ssit_dist.data.decode import decode_bgr, decode_gray
from ssit_dist.data.device_augment import collate_encoded
from ssit_dist.data.sources import ShardSet, SourceError, read_shard
from ssit_dist.data.workers import ignore_preemption, worker_options
from ssit_dist.dist import rank as dist_rank

log = logging.getLogger(__name__)


class PairStream(IterableDataset):
    """Infinite stream of augmented (x1, x2, s1, s2) pairs for one rank; see the module docstring."""

    def __init__(
        self,
        shards: ShardSet,
        augment: PairAugment,
        batch_size: int,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        rank: int | None = None,
        empty_timeout_s: float = 300.0,
        encoded: bool = False,
    ):
        """`encoded`: yield what the device-side augmentation takes (data/device_augment.py) instead of
        augmented pairs: the JPEG bytes, the decoded saliency map and both views' drawn parameters."""
        super().__init__()
        self.encoded = encoded
        self.shards, self.augment, self.empty_timeout_s = shards, augment, empty_timeout_s
        self._last_good = time.monotonic()
        self.batch_size, self.seed, self.shuffle_buffer = batch_size, seed, shuffle_buffer
        self.epoch, self.skip_batches = 0, 0
        self.rank = dist_rank() if rank is None else rank

    def set_position(self, epoch: int, skip_batches: int = 0) -> None:
        """Start the next iteration at batch `skip_batches` of `epoch` (call before iterating)."""
        self.epoch, self.skip_batches = epoch, skip_batches

    def _raw_samples(self, rng: np.random.Generator) -> Iterator[dict]:
        p = self.shards.weights()
        while True:
            url = self.shards.paths[int(rng.choice(len(p), p=p))]
            empty = True
            for sample in read_shard(url):
                empty = False
                yield sample
            if empty:
                self._starving(url)
                time.sleep(0.5)  # a source that yields nothing: do not spin on it

    def _starving(self, url: str) -> None:
        """Raise SourceError once no usable sample came for `empty_timeout_s` (progress resets it)."""
        if time.monotonic() - self._last_good > self.empty_timeout_s:
            raise SourceError(
                f"no usable sample for {self.empty_timeout_s:g} s from the shards of data.shards "
                f"(the last one tried: {url}): every sample was undecodable or lacked jpg/sal.png, "
                "or the source yields nothing (see the warnings above); check the shards and URLs"
            )

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
        self._last_good = time.monotonic()
        for i, sample in enumerate(self._shuffled(rng)):
            if i < skip:
                self._last_good = time.monotonic()
                continue
            rng = np.random.default_rng([self.seed, self.epoch, stream, i])
            pair = encode(sample, self.augment, rng) if self.encoded else decode_and_augment(sample, self.augment, rng)
            if pair is None:
                self._starving(sample.get("__url__", "?"))
                continue
            self._last_good = time.monotonic()
            yield pair


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


def encode(sample: dict, augment: PairAugment, rng: np.random.Generator) -> tuple | None:
    """(JPEG bytes, saliency map (1, H, W) uint8, view 1's and view 2's parameters, name) of one shard
    sample, the parameters drawn as the CPU path draws them; None for a sample that cannot be used. The
    JPEG itself is decoded on the training device (decode.decode_jpegs says what happens where it fails)."""
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
    return (
        torch.frombuffer(bytearray(jpeg), dtype=torch.uint8),
        torch.from_numpy(sal).unsqueeze(0),
        np.array(view1.row()),
        np.array(view2.row()),
        name,
    )


def pair_loader(stream: PairStream, workers: int = 2, prefetch: int = 2, pin_memory: bool = False) -> DataLoader:
    """Batches of `stream.batch_size` pairs; iterate it (with `start_batches`) for as many steps as an
    epoch has."""
    return DataLoader(
        stream,
        batch_size=stream.batch_size,
        pin_memory=pin_memory,
        drop_last=True,
        collate_fn=collate_encoded if stream.encoded else None,
        prefetch_factor=prefetch if workers else None,
        **worker_options(workers, ignore_preemption),
    )
