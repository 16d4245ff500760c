"""Process-level defaults of a trainer process, whatever launched it (deepspeed, torchrun, srun, accelerate,
or plain python), set once before the first step and before DeepSpeed builds an op. What the
environment sets explicitly always wins.

- Intra-op threads. torch gives every process a pool as large as the machine's cores, so N ranks on
  one node run N such pools on the same cores: on CPU, two DeepSpeed ranks trained about ten times
  slower than with one thread each (issue 35). Where OMP_NUM_THREADS is unset (torchrun sets 1 when it
  starts several processes; DeepSpeed's launcher, srun and plain python set nothing), each rank takes
  the cores this process may run on divided by the ranks on this node. The same rule on GPUs: the
  rank's CPU work (collation, host-side ops) and its loader workers share those cores with the other
  ranks, and a full-size pool per rank only oversubscribes them.
- DeepSpeed's op builds. torch's default folder (~/.cache/torch_extensions/pyXY_cuZ) is shared by
  every checkout and every torch and DeepSpeed version, and a build made for one set of versions is
  rebuilt (minutes) whenever another set starts. Where TORCH_EXTENSIONS_DIR is unset (the Makefile and
  the sbatch scripts set their own), each set of versions gets a folder of its own.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Mapping, MutableMapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from ssit_dist.placement import expand_nodelist

log = logging.getLogger(__name__)

# The launchers' count of processes they started on this node: torchrun and Accelerate (through
# torchrun), DeepSpeed's launcher, and mpirun (DeepSpeed's MPI runner).
LOCAL_SIZE_VARS = ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE")


def apply_process_defaults() -> None:
    """Set this trainer process's thread count and extensions folder where the environment leaves them
    unset (the module docstring says why); the first rank of each node says what it chose."""
    threads = intra_op_threads(os.environ, len(os.sched_getaffinity(0)))
    folder = use_versioned_extensions_dir(os.environ)
    speaks = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0")) == "0"
    if threads is not None:
        torch.set_num_threads(threads)
        if speaks:
            log.info(
                "%d intra-op threads per rank (%d cores here / %d ranks on this node); set OMP_NUM_THREADS to choose",
                threads,
                len(os.sched_getaffinity(0)),
                ranks_on_this_node(os.environ),
            )
    if speaks:
        log.info("DeepSpeed builds its ops into %s", folder)


def intra_op_threads(env: Mapping[str, str], cores: int) -> int | None:
    """The intra-op threads of one rank that may run on `cores` cores, or None where OMP_NUM_THREADS
    is set (torch follows it). A task that plain srun started with --cpus-per-task C takes C (at most its
    cores): SLURM may have bound it to those C already, or to the C of every task on the node."""
    if env.get("OMP_NUM_THREADS"):
        return None
    ranks = ranks_on_this_node(env)
    per_task = env.get("SLURM_CPUS_PER_TASK", "")
    if not _launcher_ranks(env) and "SLURM_STEP_NUM_TASKS" in env and per_task.isdigit():
        return max(1, min(cores, int(per_task)))
    return max(1, cores // ranks)


def ranks_on_this_node(env: Mapping[str, str]) -> int:
    """How many ranks share this node: the launcher's count of the processes it started here; else,
    in a task plain srun started (one per rank), the step's tasks on this node; else one."""
    launched = _launcher_ranks(env)
    if launched:
        return launched
    if "SLURM_STEP_NUM_TASKS" in env:
        return _srun_tasks_here(env)
    return 1


def _launcher_ranks(env: Mapping[str, str]) -> int | None:
    for name in LOCAL_SIZE_VARS:
        if env.get(name, "").isdigit() and int(env[name]) > 0:
            return int(env[name])
    return None


def _srun_tasks_here(env: Mapping[str, str]) -> int:
    """This node's entry of SLURM_STEP_TASKS_PER_NODE (`2(x3),1`: 2 on each of the first three nodes of
    SLURM_STEP_NODELIST, 1 on the fourth), found by SLURMD_NODENAME; the most of any node where that
    cannot be told (fewer threads rather than too many)."""
    counts = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", ""))
    if not counts:
        per_node = env.get("SLURM_NTASKS_PER_NODE", "")
        return int(per_node) if per_node.isdigit() and int(per_node) > 0 else 1
    try:
        hosts = expand_nodelist(env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", ""))
        return counts[hosts.index(env.get("SLURMD_NODENAME", ""))]
    except (ValueError, IndexError):
        return max(counts)


def tasks_per_node(spec: str) -> list[int]:
    """SLURM's compressed tasks-per-node list, one count per node: `2(x3),1` is [2, 2, 2, 1]. Empty
    where `spec` is no such list."""
    counts: list[int] = []
    for part in spec.split(","):
        match = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if match is None:
            return []
        counts.extend([int(match[1])] * int(match[2] or 1))
    return counts


def versioned_extensions_dir(env: Mapping[str, str]) -> Path:
    """A folder for DeepSpeed's op builds of exactly these versions of Python, torch (its build: CUDA,
    ROCm or CPU) and DeepSpeed, under the user's cache (XDG_CACHE_HOME, else ~/.cache)."""
    try:
        deepspeed = version("deepspeed")
    except PackageNotFoundError:
        deepspeed = "none"
    if torch.version.cuda:
        accelerator = f"cuda{torch.version.cuda}"
    else:
        accelerator = f"hip{torch.version.hip}" if torch.version.hip else "cpu"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    key = f"py{python}-torch{torch.__version__}-{accelerator}-deepspeed{deepspeed}"
    cache = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "ssit-dist" / "torch_extensions" / key


def use_versioned_extensions_dir(env: MutableMapping[str, str]) -> str:
    """TORCH_EXTENSIONS_DIR in `env` (this process's environment, which DeepSpeed's builds read and
    every process it starts inherits): the one set there, or else `versioned_extensions_dir`, set."""
    if not env.get("TORCH_EXTENSIONS_DIR"):
        env["TORCH_EXTENSIONS_DIR"] = str(versioned_extensions_dir(env))
    return env["TORCH_EXTENSIONS_DIR"]
