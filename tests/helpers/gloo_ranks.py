"""Gloo ranks that run a test's function in processes of their own, as `torch.multiprocessing.start_processes`
with "spawn" would, started from a forkserver that has imported torch, DeepSpeed, timm, Accelerate and
the trainers once per pytest worker: a rank costs a fork instead of seconds of imports (the suite is
CPU-bound; docs/developing.md). Each rank still builds its own process group, engine and model.

Spawn's two other promises are kept by hand: a rank sees the environment of the moment it is started
(a forkserver's children get the forkserver's), and the stop signals are unblocked (a forkserver first
started by a loader in this process blocks them, ssit_dist/data/loading/workers.py)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from multiprocessing import forkserver

import torch.multiprocessing as mp

from ssit_dist.signals import STOP_SIGNALS

PRELOAD = [
    "torch",
    "torch.distributed",
    "deepspeed",
    "timm",
    "accelerate",
    "cv2",
    "ssit_dist.train.pretrain",
    "ssit_dist.train.finetune",
]


def start_ranks(fn: Callable[..., None], args: tuple, nprocs: int = 2, join: bool = True) -> mp.ProcessContext | None:
    """`fn(rank, *args)` in `nprocs` processes; joined (a rank's exception raised here) unless `join` is False,
    when the caller joins the returned context."""
    forkserver.set_forkserver_preload(PRELOAD)  # read when this process's forkserver starts, once
    env = dict(os.environ)
    return mp.start_processes(_rank, args=(fn, env, *args), nprocs=nprocs, start_method="forkserver", join=join)


def _rank(rank: int, fn: Callable[..., None], env: dict[str, str], *args: object) -> None:
    os.environ.clear()
    os.environ.update(env)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    fn(rank, *args)
