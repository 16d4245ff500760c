"""The prefetching thread between the loader and the step (data/loading/prefetch.py): its failures, as the
trainer reports them. Real loader workers on real shards."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import pack_real_subset
from ssit_dist.data.loading.augment import PairAugment
from ssit_dist.data.loading.epoch import EpochPlan
from ssit_dist.data.loading.prefetch import Prefetcher
from ssit_dist.data.loading.sources import SourceError, open_shards
from ssit_dist.data.loading.stream import PairStream, pair_loader
from ssit_dist.data.loading.workers import start_batches


@pytest.fixture(scope="module")
def shards(graded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pack_real_subset(graded_dir, tmp_path_factory, 12, size=64, shard_size=4)


@pytest.mark.multiprocess
def test_a_worker_that_dies_before_its_batch_is_read_is_named_with_what_to_do(shards: Path) -> None:
    # The OOM killer ends a worker whose batches are already queued: the trainer fetches each one's shared
    # memory from the worker by a socket, which is refused. torch names the dead worker only once the
    # worker's exit has reached it (from the forkserver, its parent), which may come after that read:
    # the forkserver is held here until the read has failed, so the run meets exactly that order.
    source = open_shards([shards])
    plan = EpochPlan(tuple(source.lengths), 1, 1, 2, 6, piece_size=2, shuffle_buffer=4)  # type: ignore[arg-type]
    stream = PairStream(source, PairAugment(32, source.mean, source.std), plan, rank=0)
    batches = start_batches(pair_loader(stream))
    prefetcher = Prefetcher(batches, lambda batch: batch, torch.device("cpu"))
    try:
        next(prefetcher)
        worker = psutil.Process(batches._workers[0].pid)  # type: ignore[attr-defined]
        time.sleep(2)  # the worker has queued what it may ahead and waits
        forkserver = worker.parent()
        assert forkserver is not None
        forkserver.send_signal(signal.SIGSTOP)
        try:
            worker.kill()
            while worker.status() != psutil.STATUS_ZOMBIE:  # dead, and its parent may not notice
                time.sleep(0.01)
            with pytest.raises(SourceError) as caught:
                for _ in range(6):
                    next(prefetcher)
        finally:
            forkserver.send_signal(signal.SIGCONT)
    finally:
        prefetcher.close()
    message = str(caught.value)
    assert "a loader worker" in message and "died before its batch was read" in message, message
    assert "data.workers" in message and isinstance(caught.value.__cause__, ConnectionError)
