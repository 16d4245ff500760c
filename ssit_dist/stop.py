"""How a training process is asked to stop, and how its ranks agree on where.

A run stops for one of four reasons: Ctrl-C (SIGINT), `kill` / `timeout` / `scancel` / a supervisor (SIGTERM),
SLURM's warning before the time limit (SIGUSR1, see launch/slurm/), or the end of the launcher that
started this rank (a `deepspeed` or `torchrun` killed on its own leaves its ranks running with parent 1).
Each only sets a flag (`StopRequest`); the trainer reads it once per step, every rank learns through one
vote per step (`StopVote`) whether any rank has it, and all of them save after the same step and exit 0.

A second Ctrl-C stops at once, without saving. Launchers forward the first one too (torchrun's agent
sends its ranks the SIGINT they already had from the terminal), so a SIGINT within `SAME_PRESS_S` of the
first counts as the same press.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import psutil
import torch

from ssit_dist.dist import max_over_ranks
from ssit_dist.signals import STOP_SIGNALS

SAME_PRESS_S = 2.0
WATCH_EVERY_S = 1.0
# A parent whose command line holds one of these started this rank and should outlive it; an ancestor
# that is not (a shell, `timeout`, `nohup`, slurmstepd) ends the watch: a user may close their shell.
LAUNCHERS = (
    "ssit-dist",
    "ssit_dist",
    "deepspeed",
    "torchrun",
    "torch.distributed.run",
    "torch.distributed.launch",
    "accelerate",
)


class StopRequested(Exception):
    """A stop was asked for and every rank has stopped where it said (a checkpoint saved, or why not):
    the run ends with exit 0 and its message."""


@dataclass
class StopRequest:
    """Why this process was asked to stop (None: it was not), set by a signal handler or the launcher watch."""

    reason: str | None = None
    first_interrupt: float | None = field(default=None, repr=False)
    announce: str = "saving after this step, then stopping"  # what the process does about it

    @property
    def requested(self) -> bool:
        return self.reason is not None

    def ask(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
            if os.environ.get("RANK", "0") == "0":  # one line per run, not one per rank
                # os.write, not print: a signal handler may interrupt a print to the same stream.
                os.write(2, f"ssit-dist: {reason}: {self.announce}\n".encode())


_installed: StopRequest | None = None


def install(announce: str = StopRequest.announce) -> StopRequest:
    """Main thread, before anything slow: the handlers of STOP_SIGNALS, and a thread that stops this process
    at once on a second Ctrl-C and asks it to stop when the launcher that started it is gone. `announce`:
    what the process does when asked (printed once). Once per process; a later call (another run in the
    same process) gets the same request, cleared."""
    global _installed
    if _installed is not None:
        _installed.reason, _installed.first_interrupt, _installed.announce = None, None, announce
        return _installed
    request = StopRequest(announce=announce)
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda signum, _: request.ask(f"{signal.Signals(signum).name} received"))
    # The handlers above run only between Python bytecodes: a main thread blocked in a collective would
    # never see a second Ctrl-C. The C-level handler also writes each signal's number to this pipe,
    # which the watch thread reads at once.
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    launchers = launcher_chain(psutil.Process())
    threading.Thread(target=_watch, args=(request, read_end, launchers), daemon=True, name="ssit-stop").start()
    _installed = request
    return request


def launcher_chain(process: psutil.Process) -> list[psutil.Process]:
    """The launchers above `process`, nearest first: its parent and grandparents while they are one of
    LAUNCHERS (our own, DeepSpeed's runner and launch.py, torchrun, accelerate)."""
    chain = []
    parent = process.parent()
    while parent is not None and parent.pid > 1:
        try:
            command = " ".join(parent.cmdline())
        except psutil.Error:
            break
        if not any(name in command for name in LAUNCHERS):
            break
        chain.append(parent)
        parent = parent.parent()
    return chain


def _watch(request: StopRequest, wakeups: int, launchers: list[psutil.Process]) -> None:
    """The stop thread: a second Ctrl-C ends the process now; a launcher that ended asks for a stop."""
    while True:
        ready, _, _ = select.select([wakeups], [], [], WATCH_EVERY_S)
        if ready:
            for signum in os.read(wakeups, 64):
                if signum == signal.SIGINT:
                    _interrupted(request)
        for launcher in launchers:
            if not launcher.is_running():  # checks the start time too: a reused pid is not the launcher
                request.ask(f"the launcher that started this rank (pid {launcher.pid}) has ended")


def _interrupted(request: StopRequest) -> None:
    now = time.monotonic()
    if request.first_interrupt is None:
        request.first_interrupt = now
    elif now - request.first_interrupt > SAME_PRESS_S:
        os.write(2, b"ssit-dist: second Ctrl-C: stopping now, without saving\n")
        os._exit(128 + signal.SIGINT)


class StopVote:
    """Every rank learns, one step later and without waiting for the device, whether any rank wants to
    stop, so that all of them stop after the same step.

    `cast` is a collective, once per optimizer step on every rank: it sends this step's wish (a max over
    the ranks, on the device) and returns the outcome of the previous step's vote, which by then has long
    reached host memory (on CUDA a non-blocking copy into pinned memory; its event is waited for only when
    the device runs more than a step behind). The outcome is the same number on every rank, however late
    each rank reads it: the agreement never depends on timing."""

    def __init__(self, device: torch.device):
        self.device = device
        # The host buffer each outcome lands in, read through numpy (a host read, never the device's):
        # pinned on CUDA, so that the copy runs beside the next step's work.
        if device.type == "cuda":
            self.landed = torch.zeros(1, dtype=torch.float32, pin_memory=True)
            self.value = self.landed.numpy()
            self.event: torch.cuda.Event | None = torch.cuda.Event()
        else:
            self.value = np.zeros(1, dtype=np.float32)
            self.landed = torch.from_numpy(self.value)
            self.event = None
        self.pending = False

    def cast(self, stop: bool) -> bool:
        outcome = self._outcome()
        wish = torch.full((1,), float(stop), dtype=torch.float32, device=self.device)
        max_over_ranks(wish)
        self.landed.copy_(wish, non_blocking=self.event is not None)
        if self.event is not None:
            self.event.record()
        self.pending = True
        return outcome

    def _outcome(self) -> bool:
        if not self.pending:
            return False
        if self.event is not None and not self.event.query():
            self.event.synchronize()
        return bool(self.value[0])
