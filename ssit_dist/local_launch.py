"""`ssit-dist pretrain|finetune|segment --nproc N`: N ranks of a trainer on this machine, started, stopped
and waited for as one command.

Each rank gets torch.distributed's environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE,
MASTER_ADDR, MASTER_PORT), the same names the SLURM scripts give, which DeepSpeed and Accelerate both
read. The ranks run in a process group of their own, so that Ctrl-C at the terminal reaches this process
only, and it decides what the ranks hear:

- the first SIGINT, SIGTERM or SIGUSR1 is passed to every rank as SIGTERM: each saves after the step
  every rank agreed on and exits 0 (ssit_dist/stop.py), and so does this command;
- a second Ctrl-C kills the ranks at once, without saving (exit 130);
- when a rank fails, the others get `FAILURE_GRACE_S` to report it themselves, then are killed;
- when this process is killed outright, the ranks see their launcher gone and stop as for SIGTERM.

DeepSpeed's own launcher would do less of this: it exits 1 after any signal and kills ranks that take more
than 30 s to save, and a SIGTERM to its runner leaves the ranks running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from ssit_dist.ports import free_port
from ssit_dist.signals import STOP_SIGNALS

FAILURE_GRACE_S = 30.0
POLL_S = 0.2


def launch(module: str, args: list[str], nproc: int, env: dict[str, str]) -> int:
    """Run `python -m module args` as `nproc` ranks with `env` (plus each rank's place); the command's exit
    code: 0 when every rank ended well (a stop included), else the first failure's."""
    port = str(free_port())
    print(f"ssit-dist: {nproc} ranks of {module} {args[0]}, rendezvous 127.0.0.1:{port}", file=sys.stderr, flush=True)
    ranks: list[subprocess.Popen] = []
    signals = _Signals(ranks)  # before the first rank: a signal while they start is passed on too
    for rank in range(nproc):
        place = {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
        }
        ranks.append(
            subprocess.Popen(
                [sys.executable, "-m", module, *args],
                env={**env, **place},
                stdin=subprocess.DEVNULL,
                process_group=ranks[0].pid if ranks else 0,  # one group, not the terminal's
            )
        )
        if signals.stopping:  # all ranks start, then stop together at their first agreement
            ranks[-1].send_signal(signal.SIGTERM)
    failed_at: float | None = None
    while any(p.poll() is None for p in ranks):
        if failed_at is None and any(p.returncode for p in ranks):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > FAILURE_GRACE_S:
            _kill(ranks)
        time.sleep(POLL_S)
    if signals.killed:
        print("ssit-dist: stopped at once, without saving; relaunch to resume", file=sys.stderr)
        return 128 + signal.SIGINT
    return exit_code([p.returncode for p in ranks])


class _Signals:
    """This process's handlers while the ranks run: the first stop signal is passed on, a second Ctrl-C kills."""

    def __init__(self, ranks: list[subprocess.Popen]):
        self.ranks, self.stopping, self.killed = ranks, False, False
        for sig in STOP_SIGNALS:
            signal.signal(sig, self.handle)

    def handle(self, signum: int, _frame: object) -> None:
        if self.stopping and signum == signal.SIGINT:
            self.killed = True
            _kill(self.ranks)
        elif not self.stopping:
            self.stopping = True
            name = signal.Signals(signum).name
            os.write(2, f"ssit-dist: {name}: every rank saves and stops (Ctrl-C again: now, unsaved)\n".encode())
            for p in self.ranks:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)


def _kill(ranks: list[subprocess.Popen]) -> None:
    for p in ranks:
        if p.poll() is None:
            p.kill()


def exit_code(returncodes: list[int | None]) -> int:
    """The exit code of a command whose processes ended with `returncodes`: the first failure's (a signal
    as 128 + its number, as a shell reports it), else 0."""
    for code in returncodes:
        if code:
            return 128 - code if code < 0 else code
    return 0
