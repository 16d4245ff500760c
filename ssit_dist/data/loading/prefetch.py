"""The next batch made ready on the training device while the current step computes.

A thread of its own takes each batch from the loader (receiving its shared memory from the worker), moves it
to the device and, on the gpu path (data.augment_on), decodes and augments it there. All of that is host
time, and torchvision's CUDA JPEG decoder also blocks its caller until the device has decoded the batch
(it synchronises its own stream: torchvision/csrc/io/image/cuda/decode_jpegs_cuda.cpp). On the training
thread, the host would launch nothing meanwhile and the step would wait; here it overlaps the step. That
stream synchronisation is the one host-device sync of the input path, and it stays in this thread. torch
and torchvision release the GIL inside their operators, so the training thread keeps launching.

On CUDA the thread queues its work on a stream of its own and records an event once a batch is queued;
the consumer's stream waits for that event on the device (the host does not wait) and marks each tensor as
used by itself (record_stream), so that the caching allocator does not hand the tensor's memory to the
thread's next batch while the step still reads it. On a CPU there are no streams: the same thread, the
same queue, in the same order.
"""

from __future__ import annotations

import contextlib
import queue
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ssit_dist.data.loading.sources import SourceError
from ssit_dist.data.loading.workers import stop_batches

Tensors = tuple[torch.Tensor, ...]


@dataclass
class _Failed:
    error: BaseException
    waited_s: float  # how long the thread waited for the batch that failed


class Prefetcher:
    """Iterates `to_device(batch)` for each batch of `batches` (an iterator from `start_batches`), in order,
    one batch ahead. A failure (the loader's or the device's) is raised at the batch where it happened, never
    earlier; a failure after waiting `stall_s` (the loader's timeout, 0: none) or longer is reported as a stall."""

    def __init__(
        self, batches: Iterator, to_device: Callable[[Any], Tensors], device: torch.device, stall_s: float = 0
    ):
        self.batches, self.device, self.stall_s = batches, device, stall_s
        # One finished batch waits here while the thread prepares the next: two batches ahead of the step in
        # all, on top of what the loader's workers hold.
        self._ready: queue.Queue = queue.Queue(maxsize=1)
        self._end: BaseException | None = None  # once the thread ended, what every later call raises
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(to_device,), name="ssit-prefetch", daemon=True)
        self._thread.start()

    def __iter__(self) -> Prefetcher:
        return self

    def __next__(self) -> Tensors:
        if self._end is not None:
            raise self._end
        got = self._ready.get()
        if isinstance(got, _Failed):
            self._end = self._as_reported(got)
            raise self._end
        tensors, ready = got
        if ready is not None:  # CUDA: the step's stream waits for the batch on the device, not the host
            step_stream = torch.cuda.current_stream(self.device)
            step_stream.wait_event(ready)
            for tensor in tensors:
                tensor.record_stream(step_stream)
        return tensors

    def close(self) -> None:
        """Stop the thread and shut the loader's workers down."""
        self._stop.set()
        with contextlib.suppress(queue.Empty):  # frees a thread blocked on a full queue
            self._ready.get_nowait()
        self._thread.join(timeout=1)  # at most one batch's work; a loader stuck in a read is ended below
        stop_batches(self.batches)
        self._thread.join(timeout=10)

    def _run(self, to_device: Callable[[Any], Tensors]) -> None:
        with _stream_of_its_own(self.device) as stream:
            while not self._stop.is_set():
                asked = time.perf_counter()
                try:
                    tensors = to_device(next(self.batches))
                    ready = None
                    if stream is not None:
                        ready = torch.cuda.Event()
                        ready.record(stream)
                except BaseException as e:  # StopIteration included: raised to the consumer in turn
                    self._put(_Failed(e, time.perf_counter() - asked))
                    return
                self._put((tensors, ready))

    def _put(self, item: object) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(queue.Full):
                self._ready.put(item, timeout=0.1)
                return

    def _as_reported(self, failed: _Failed) -> BaseException:
        if _worker_died(failed.error):
            died = SourceError(
                f"a loader worker on {socket.gethostname()} died before its batch was read (receiving it failed: "
                f"{failed.error!r}); the system log says why, most often the kernel's OOM "
                "killer: fewer data.workers, a smaller data.prefetch, or more memory per rank"
            )
            died.__cause__ = failed.error
            return died
        if not (self.stall_s and failed.waited_s >= self.stall_s) or isinstance(failed.error, StopIteration):
            return failed.error
        stall = SourceError(
            f"the data loader delivered no batch for {self.stall_s:g} s (data.stall_timeout_s): a read hangs "
            "(a network file system, a dead mount) or a worker is stuck; check the shards' storage on "
            f"{socket.gethostname()}"
        )
        stall.__cause__ = failed.error
        return stall


def _worker_died(error: BaseException) -> bool:
    """A batch comes from its worker by a pipe, and its shared memory by a socket to the worker (torch's
    file-descriptor sharing): refused, reset or cut short while torch receives it, the worker is gone. torch
    says so itself once the worker's exit has reached this process, which under a forkserver can come after
    the read. A worker's own exception, which torch raises again here, names the worker and is left as is."""
    if not isinstance(error, ConnectionError | EOFError) or "in DataLoader worker process" in str(error):
        return False
    frames = traceback.extract_tb(error.__traceback__)
    return any(frame.filename.endswith("/torch/utils/data/dataloader.py") for frame in frames)


@contextlib.contextmanager
def _stream_of_its_own(device: torch.device) -> Iterator[torch.cuda.Stream | None]:
    """On CUDA, `device` and a new stream made current for the calling thread (both are per thread in torch);
    elsewhere nothing."""
    if device.type != "cuda":
        yield None
        return
    stream = torch.cuda.Stream(device)
    with torch.cuda.device(device), torch.cuda.stream(stream):
        yield stream
