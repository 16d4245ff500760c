"""A trainer process's own defaults: threads per rank from each launcher's environment."""

from __future__ import annotations

import pytest

from ssit_dist.runtime import intra_op_threads, ranks_on_this_node, tasks_per_node


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
