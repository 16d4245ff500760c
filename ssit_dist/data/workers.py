"""Loader worker processes: started by forkserver, one OpenCV and one torch thread each, and ended
with the process that started them, however that one ends (an OOM kill included).

forkserver, not fork: a worker forked after OpenCV started its thread pool deadlocks in OpenCV. torch's
own orphan check compares a worker's parent, which under forkserver is the forkserver, and that lives
as long as its workers: a trainer killed with SIGKILL would leave both behind for good. So each worker
watches its trainer's pid (a pidfd) and exits when it ends.
"""

from __future__ import annotations

import os
import select
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import cv2
import torch


def worker_options(workers: int, setup: Callable[[], None] | None = None) -> dict[str, Any]:
    """DataLoader keyword arguments for `workers` processes (none: load in the calling process).
    `setup`, a module-level function, runs first in every worker."""
    if not workers:
        return {"num_workers": 0}
    return {
        "num_workers": workers,
        "multiprocessing_context": "forkserver",
        "worker_init_fn": partial(_start_worker, trainer=os.getpid(), setup=setup),
    }


def _start_worker(_: int, trainer: int, setup: Callable[[], None] | None) -> None:
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
