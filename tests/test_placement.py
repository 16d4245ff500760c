"""Where a process lands on a cluster: its rank and world from the launcher or the SLURM job step, and its
GPU among those it sees. The causes are environment variables, so each case is set up as the launcher or
the site sets it (test_slurm.py runs a process outside srun inside a real job)."""

from __future__ import annotations

import logging
import os

import pytest

from ssit_dist.dist import PlacementError, adopt_srun_environment, gpu_index

SLURM_NAMES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_LOCALID",
)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in SLURM_NAMES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_an_srun_task_takes_its_place_in_the_step_not_the_job(env: pytest.MonkeyPatch) -> None:
    # A 2-task step inside a 4-task job: the step is the world.
    for name, value in (
        ("SLURM_PROCID", "1"),
        ("SLURM_NTASKS", "4"),
        ("SLURM_STEP_NUM_TASKS", "2"),
        ("SLURM_LOCALID", "1"),
    ):
        env.setenv(name, value)
    adopt_srun_environment()

    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "1")


def test_a_process_outside_srun_runs_alone_and_says_so(
    env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # What the batch script's own process sees (SLURM 22.05, measured): no step task count.
    env.setenv("SLURM_PROCID", "0")
    env.setenv("SLURM_NTASKS", "8")
    with caplog.at_level(logging.WARNING):
        adopt_srun_environment()

    assert "WORLD_SIZE" not in os.environ and "RANK" not in os.environ
    assert "outside srun" in caplog.text and "8 tasks" in caplog.text


def test_a_launchers_own_variables_win(env: pytest.MonkeyPatch) -> None:
    env.setenv("RANK", "3")
    env.setenv("WORLD_SIZE", "16")
    env.setenv("SLURM_PROCID", "0")
    env.setenv("SLURM_STEP_NUM_TASKS", "2")
    adopt_srun_environment()

    assert (os.environ["RANK"], os.environ["WORLD_SIZE"]) == ("3", "16")


def test_each_rank_gets_a_gpu_it_can_see(env: pytest.MonkeyPatch) -> None:
    assert gpu_index(local_rank=5, visible=1) == 0  # --gpus-per-task=1: the task's own GPU is its cuda:0
    assert gpu_index(local_rank=5, visible=8) == 5
    env.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    with pytest.raises(
        PlacementError, match=r"local rank 5 .* sees 4 GPUs \(CUDA_VISIBLE_DEVICES=0,1,2,3\).*at most 4 ranks per node"
    ):
        gpu_index(local_rank=5, visible=4)
