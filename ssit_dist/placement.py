"""A process's place in its job: its rank, world size and rendezvous where plain srun started it (SLURM's
variables read as the names torch, DeepSpeed and Accelerate read), the hosts of a SLURM node list, and the
GPU it trains on. Read before any process group exists (train/run.py's set-up); ssit_dist/dist.py builds
the group on the device chosen here."""

from __future__ import annotations

import itertools
import logging
import os
import re
import socket
from collections.abc import Mapping

import torch

log = logging.getLogger(__name__)


class PlacementError(RuntimeError):
    """This process cannot be given a device or a place in the job as launched; the message says how to
    launch it instead."""


def adopt_srun_environment() -> None:
    """Under plain srun (one task per rank, no launcher) rank, world size and local rank come from the
    job step's SLURM variables, and the rendezvous from `srun_rendezvous` wherever the script that
    called srun (the shipped sbatch scripts do) gave none: set the names torch, DeepSpeed and Accelerate
    read. A launcher's own win.

    A process the batch script starts outside srun is no step task: it sees SLURM_PROCID=0 and the
    job's SLURM_NTASKS, but no SLURM_STEP_NUM_TASKS (measured on SLURM 22.05), and no peer will ever
    come. It runs as one process rather than waiting dist_timeout_s for SLURM_NTASKS - 1 of them."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    if "SLURM_STEP_NUM_TASKS" not in os.environ:
        log.warning(
            "started inside a SLURM job (%s tasks) but outside srun: running as one process; "
            "start it with srun (one task per rank) to train on every task",
            os.environ.get("SLURM_NTASKS", "?"),
        )
        return
    rendezvous = srun_rendezvous(os.environ)  # first: where it refuses, the environment is as it was
    os.environ.update(
        RANK=os.environ["SLURM_PROCID"],
        WORLD_SIZE=os.environ["SLURM_STEP_NUM_TASKS"],
        LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"),
        **rendezvous,
    )


def srun_rendezvous(env: Mapping[str, str]) -> dict[str, str]:
    """What `env`, an srun task's environment, lacks of MASTER_ADDR and MASTER_PORT. The address is rank
    0's node: the first of the step's nodes (srun's block and cyclic distributions put task 0 there), or
    loopback for a step on one node. The port is 20000 + (job id + 1009 x step id) mod 20000: the shipped
    sbatch scripts' port for step 0, and a port of its own for each step, so that two steps of one
    allocation running at once (salloc) do not meet on one. Raises PlacementError, at once, for a step
    across several nodes that names none of them, instead of leaving every rank away from 127.0.0.1
    to wait out the collective timeout."""
    found = {}
    if "MASTER_ADDR" not in env:
        found["MASTER_ADDR"] = _rank_zero_host(env)
    if "MASTER_PORT" not in env:
        job, step = (int(env[n]) if env.get(n, "").isdigit() else 0 for n in ("SLURM_JOB_ID", "SLURM_STEP_ID"))
        found["MASTER_PORT"] = str(20000 + (job + 1009 * step) % 20000)
    return found


def _rank_zero_host(env: Mapping[str, str]) -> str:
    """The first node of the step (of the job where srun names none), or 127.0.0.1 on one node."""
    source = next((n for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST") if env.get(n)), None)
    count = next((env[n] for n in ("SLURM_STEP_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NUM_NODES") if env.get(n)), "")
    if count == "1" or (not count and source is None):
        return "127.0.0.1"  # loopback needs no name resolution
    fix = "set MASTER_ADDR to the host of rank 0 before srun, e.g. $(scontrol show hostnames | head -n 1)"
    if source is None:
        raise PlacementError(f"an srun step across {count} nodes, but neither MASTER_ADDR nor a SLURM node list: {fix}")
    try:
        hosts = expand_nodelist(env[source])
    except ValueError as error:
        raise PlacementError(f"{source}: {error}; {fix}") from error
    if not count and len(hosts) == 1:
        return "127.0.0.1"
    log.info("srun step on %s: rank 0's node %s is the rendezvous", env[source], hosts[0])
    return hosts[0]


def expand_nodelist(nodelist: str) -> list[str]:
    """The hosts of a SLURM node list in its compressed form, in order, as `scontrol show hostnames`
    prints them (which needs scontrol on the node): `gpu[01-03,07]` is gpu01 gpu02 gpu03 gpu07 (the
    width of a range's first number is kept), `a[1-2],b3` is a1 a2 b3, and several brackets in one name
    give every combination. Raises ValueError naming the list where it is no such list."""
    items, depth, start = [], 0, 0
    for i, char in enumerate(nodelist + ","):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if depth not in (0, 1):
            raise ValueError(f"unbalanced brackets in node list {nodelist!r}")
        if char == "," and depth == 0:
            items.append(nodelist[start:i].strip())
            start = i + 1
    if depth or not all(items):
        raise ValueError(f"node list {nodelist!r} is malformed (an empty name or an unclosed bracket)")
    hosts: list[str] = []
    for item in items:
        # Literal text and bracket groups alternate: ["gpu", "[01-03,07]", ""].
        pieces = [_bracket_values(p, nodelist) if p.startswith("[") else [p] for p in re.split(r"(\[[^]]*\])", item)]
        hosts.extend("".join(combination) for combination in itertools.product(*pieces))
    return hosts


def _bracket_values(group: str, nodelist: str) -> list[str]:
    """The names one bracket group of a node list stands for: `[01-03,07]` -> 01 02 03 07."""
    values: list[str] = []
    for part in group[1:-1].split(","):
        match = re.fullmatch(r"\s*(\d+)(?:-(\d+))?\s*", part)
        if match is None or (match[2] is not None and int(match[2]) < int(match[1])):
            raise ValueError(f"{part!r} in node list {nodelist!r} is no number or rising range")
        first, last = match[1], match[2] or match[1]
        values.extend(f"{n:0{len(first)}d}" for n in range(int(first), int(last) + 1))
    return values


def gpu_index(local_rank: int, visible: int) -> int:
    """Which of the `visible` GPUs the rank with this local rank trains on. A task that sees one GPU
    (`--gpus-per-task=1`, a site's GPU binding) trains on that one whatever its local rank; a task that
    sees several takes the local rank's, and a local rank beyond them is refused, naming the fix."""
    if visible == 1:
        return 0
    if local_rank >= visible:
        raise PlacementError(
            f"local rank {local_rank} on {socket.gethostname()}, but this process sees {visible} GPUs "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): start at most {visible} "
            "ranks per node (--ntasks-per-node, --nproc_per_node), or give each task its own GPU (--gpus-per-task=1)"
        )
    return local_rank


def bind_gpu() -> torch.device:
    """This rank's device: the GPU `gpu_index` picks (set current), or the CPU where there is none.
    LOCAL_RANK becomes that GPU's index, because DeepSpeed's engine and Accelerate both train on
    cuda:LOCAL_RANK, an invalid ordinal for every rank but the first where each task sees one GPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    index = gpu_index(int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count())
    os.environ["LOCAL_RANK"] = str(index)
    torch.cuda.set_device(index)
    return torch.device("cuda", index)
