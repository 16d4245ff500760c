"""Loader worker processes and the preemption signals: workers start by forkserver with one OpenCV and
one torch thread each, end with the process that started them however that one ends (an OOM kill
included), and, in pretraining, leave SLURM's preemption signals to the trainer.

forkserver, not fork: a worker forked after OpenCV started its thread pool deadlocks in OpenCV. torch's
own orphan check compares a worker's parent, which under forkserver is the forkserver, and that lives
as long as its workers: a trainer killed with SIGKILL would leave both behind for good. So each worker
watches its trainer's pid (a pidfd) and exits when it ends.

A loader's workers end with every epoch and new ones start with the next. Each new worker runs the
main module again and unpickles its dataset; Python's forkserver does not preload the main module as it
means to (its `main_path` is never passed on), so each would import torch, OpenCV and the data modules
again, seconds of every epoch. The forkserver preloads what a worker needs instead (`_worker_modules`),
and a worker starts from it at the cost of a fork. Only that: a worker reads, decodes and augments, and
never builds a model, so timm, DeepSpeed and torch's compiler, most of a rank's import time, stay out
of the forkserver, one per rank.
"""

from __future__ import annotations

import os
import random
import select
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from functools import partial
from multiprocessing import forkserver, resource_tracker
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader

from ssit_dist.signals import STOP_SIGNALS


def worker_options(workers: int, setup: Callable[[], None] | None = None, rank: int = 0) -> dict[str, Any]:
    """DataLoader keyword arguments for `workers` processes (none: load in the calling process).
    `setup`, a module-level function, runs first in every worker. `rank` is mixed into each worker's
    seeds (torch, random, numpy): torch seeds worker w from the loader's generator, which a distributed
    sampler keeps identical on every rank, so without it worker w of every rank would draw the same
    augmentation for its j-th sample."""
    if not workers:
        return {"num_workers": 0}
    return {
        "num_workers": workers,
        "multiprocessing_context": "forkserver",
        "worker_init_fn": partial(_start_worker, trainer=os.getpid(), setup=setup, rank=rank),
    }


def _start_worker(_: int, trainer: int, setup: Callable[[], None] | None, rank: int) -> None:
    if rank:
        seed = (torch.initial_seed() + rank * 0x9E3779B97F4A7C15) % 2**63  # torch's own: base seed + worker id
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2**32)
    if setup is not None:
        setup()
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    threading.Thread(target=_exit_with, args=(trainer,), name="exit-with-trainer", daemon=True).start()


def _exit_with(pid: int) -> None:
    try:
        handle = os.pidfd_open(pid)
    except ProcessLookupError:  # the trainer is already gone
        os._exit(0)
    select.select([handle], [], [])
    os._exit(0)


def ignore_preemption() -> None:
    """SLURM signals every process of a job step, and Ctrl-C every process of the terminal's group; the
    trainer decides when to stop (ssit_dist/stop.py), so a loader worker must not die of a stop signal
    before the trainer has saved its checkpoint. The signals were blocked since the worker's birth
    (start_batches); ignoring them discards any that came."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


def start_batches(loader: DataLoader) -> Iterator:
    """`iter(loader)` with the preemption signals blocked while its workers start: they inherit the
    block from the forkserver, so a signal sent to every process at that moment waits in the worker
    until `ignore_preemption` ignores it, instead of killing a worker that has not yet installed its
    handler. The trainer's own pending signal is delivered when the block lifts. The forkserver keeps
    the mask it was started with, so the first loader of a process must start through here. End the
    iterator with `stop_batches` before the process exits."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        # The resource tracker ignores SIGTERM but would die of SIGUSR1: started here, it keeps
        # SIGUSR1 blocked for life. Starting it unblocks SIGTERM in the caller: block again.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        if loader.num_workers:
            forkserver.set_forkserver_preload(_worker_modules())  # read only when the server starts
            forkserver.ensure_running()
        return iter(loader)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _worker_modules() -> list[str]:
    """What a worker imports before its first sample: the package's data modules the process has imported
    (the dataset, its augmentation and this module's worker set-up come from them), and the main module
    when multiprocessing runs it again by name (`python -m ssit_dist.train.pretrain`), with all it
    imports. A script run by path is run again too: the `ssit-dist` console script imports the CLI, and
    launch/pretrain.py imports the trainer under `if __name__ == "__main__"`. A `__main__` module
    (`python -m ssit_dist`, and `python -m ssit_dist.train`, which the launchers start) is never run again."""
    package, data = __name__.partition(".")[0], __name__.rpartition(".loading")[0]  # ssit_dist, ssit_dist.data
    modules = {n for n in sys.modules if n == data or n.startswith(data + ".")}
    main = getattr(sys.modules["__main__"].__spec__, "name", None)
    if main is None and f"{package}.cli" in sys.modules:  # a script: the console script
        main = f"{package}.cli"
    if main is not None and not main.endswith("__main__"):
        modules.add(main)
    return sorted(modules)


def stop_batches(batches: Iterator) -> None:
    """Shut down the workers of an iterator from `start_batches` now. Dropping the iterator does it too,
    but not while a traceback still holds it (an exception raised in the training step): the process
    would then reach multiprocessing's exit hook, which SIGTERMs the workers (ignored, see
    `ignore_preemption`) and waits for them forever. A worker still alive after torch's shutdown (stuck
    in a read that never returns, as on a hung NFS mount) is killed, for the same reason."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # what the DataLoader iterator's __del__ calls
    if shutdown is not None:
        shutdown()
    close = getattr(batches, "close", None)  # a generator around a loader's iterator (Accelerate's loaders):
    if close is not None:  # closing it releases the iterator, whose __del__ shuts the workers down
        close()
    for worker in getattr(batches, "_workers", []):
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=10)
