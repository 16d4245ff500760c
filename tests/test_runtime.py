"""A trainer process's own defaults, under real launchers: threads per rank, DeepSpeed's build folder, and
the one-line answer to a rendezvous port that another program holds. The probe is a trainer entry
(train/run.py's `main`, as launch/pretrain.py and the fine-tuning scripts run it) whose training reports what
the process was given."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from ssit_dist.ports import free_port
from ssit_dist.runtime import intra_op_threads, ranks_on_this_node, tasks_per_node

PROBE = """
import json, os, sys
import torch
from torch.utils.cpp_extension import _get_build_directory
from ssit_dist.config import PretrainConfig
from ssit_dist.dist import init_process_group
from ssit_dist.train.run import main

def report(cfg):
    if os.environ.get("PROBE_JOIN"):
        init_process_group(60)
    built = _get_build_directory("probe_op", verbose=False)  # where DeepSpeed's op loader builds
    print(json.dumps({"threads": torch.get_num_threads(), "build": built}), flush=True)

sys.exit(main(report, PretrainConfig, "probe", sys.argv[1:]))
"""

CORES = len(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("probe") / "probe.py"
    path.write_text(PROBE)
    return path


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    """The test's environment without what the test decides: threads, build folder, rank variables."""
    drop = {"OMP_NUM_THREADS", "TORCH_EXTENSIONS_DIR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "XDG_CACHE_HOME": str(tmp / "cache"), **extra}


def _deepspeed(probe: Path, nproc: int, port: int) -> list[str]:
    runner = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc)]
    return [*runner, "--master_port", str(port), str(probe)]


def _reports(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.mark.multiprocess
def test_each_rank_takes_its_share_of_the_cores_and_a_build_folder_of_its_versions(probe: Path, tmp_path: Path) -> None:
    # DeepSpeed's launcher sets no OMP_NUM_THREADS: without the trainer's own default each rank would
    # run torch's pool of every core (2 ranks on 2 cores: 3-6 pairs/s against 42-47 at one thread each).
    # Three ranks, so that the share differs from torch's default on any machine of more than one core.
    result = subprocess.run(
        _deepspeed(probe, 3, free_port()), capture_output=True, text=True, timeout=180, env=_env(tmp_path)
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = _reports(result.stdout)
    assert [r["threads"] for r in ranks] == [max(1, CORES // 3)] * 3, (CORES, ranks)
    folder = tmp_path / "cache" / "ssit-dist" / "torch_extensions"
    built = {Path(r["build"]) for r in ranks}
    assert len(built) == 1 and next(iter(built)).parent.parent == folder, built
    key = next(iter(built)).parent.name
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"py{py}" in key and f"torch{torch.__version__}" in key and f"deepspeed{version('deepspeed')}" in key
    assert f"{CORES // 3 or 1} intra-op threads per rank ({CORES} cores here / 3 ranks" in result.stderr

    # One process (plain python): every core. A folder set in the environment (the Makefile's) wins.
    own = tmp_path / "own_extensions"
    env = _env(tmp_path, MASTER_PORT=str(free_port()), TORCH_EXTENSIONS_DIR=str(own))
    result = subprocess.run([sys.executable, str(probe)], capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert _reports(result.stdout) == [{"threads": CORES, "build": str(own / "probe_op")}]


@pytest.mark.multiprocess
def test_a_rendezvous_port_in_use_is_one_line_naming_what_to_set(probe: Path, tmp_path: Path) -> None:
    # Another program (here a plain socket; often another run's rank 0) holds the port the launcher
    # hands its ranks: rank 0 cannot listen there.
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = _env(tmp_path, PROBE_JOIN="1", OMP_NUM_THREADS="1")
        result = subprocess.run(_deepspeed(probe, 2, port), capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 2, result.stderr[-3000:]  # a run that cannot start (entry.py)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"port {port} on 127.0.0.1 (MASTER_PORT) is in use" in errors[0], result.stderr
    for fix in ("MASTER_PORT=", "--master_port ", "--main_process_port "):
        assert fix in errors[0], errors[0]
    assert "Traceback" not in result.stderr and "EADDRINUSE" not in result.stderr


@pytest.mark.parametrize(
    ("env", "cores", "threads"),
    [
        ({"LOCAL_WORLD_SIZE": "4"}, 16, 4),  # torchrun, Accelerate
        ({"LOCAL_SIZE": "3"}, 16, 5),  # DeepSpeed's launcher
        ({"LOCAL_SIZE": "8"}, 4, 1),  # more ranks than cores: one each
        ({}, 6, 6),  # plain python: one process
        ({"LOCAL_SIZE": "2", "OMP_NUM_THREADS": "3"}, 16, None),  # set: torch follows it
        # Plain srun, one task per rank: the step's tasks on this node, from SLURM's compressed list.
        ({"SLURM_STEP_NUM_TASKS": "7", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_STEP_NODELIST": "n[1-4]",
          "SLURMD_NODENAME": "n4"}, 8, 8),
        ({"SLURM_STEP_NUM_TASKS": "7", "SLURM_STEP_TASKS_PER_NODE": "2(x3),1", "SLURM_STEP_NODELIST": "n[1-4]",
          "SLURMD_NODENAME": "n2"}, 8, 4),
        # --cpus-per-task 6: SLURM bound the task to its 6 cores, or the job to 6 per task.
        ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "6"}, 6, 6),
        ({"SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_CPUS_PER_TASK": "6"}, 12, 6),
        # A launcher inside an srun task (one task per node): the launcher's ranks share the task's cores.
        ({"SLURM_STEP_NUM_TASKS": "1", "SLURM_CPUS_PER_TASK": "64", "LOCAL_WORLD_SIZE": "8"}, 64, 8),
    ],
)  # fmt: skip
def test_threads_per_rank_from_each_launchers_environment(env: dict[str, str], cores: int, threads: int | None) -> None:
    assert intra_op_threads(env, cores) == threads


def test_slurm_task_lists_expand_per_node() -> None:
    assert tasks_per_node("2(x3),1") == [2, 2, 2, 1] and tasks_per_node("8") == [8] and tasks_per_node("x") == []
    # A node that the list does not name: the most of any node (fewer threads rather than too many).
    env = {"SLURM_STEP_NUM_TASKS": "5", "SLURM_STEP_TASKS_PER_NODE": "4,1", "SLURMD_NODENAME": "elsewhere"}
    assert ranks_on_this_node(env) == 4
