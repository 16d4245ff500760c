"""Where a process lands on a cluster: its rank and world from the launcher or the SLURM job step, and its
GPU among those it sees. The causes are environment variables, so each case is set up as the launcher or
the site sets it (test_slurm.py runs a process outside srun inside a real job)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from ssit_dist.placement import PlacementError, adopt_srun_environment, expand_nodelist, gpu_index

SLURM_NAMES = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_LOCALID",
    "SLURM_JOB_ID",
    "SLURM_STEP_ID",
    "SLURM_STEP_NODELIST",
    "SLURM_JOB_NODELIST",
    "SLURM_STEP_NUM_NODES",
    "SLURM_NNODES",
    "SLURM_JOB_NUM_NODES",
)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in SLURM_NAMES:
        # Set first, so that monkeypatch restores the name even where adopt_srun_environment sets it
        # later (it forgets a name that was absent when deleted, and the value would leak into later tests).
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
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


def srun_step(env: pytest.MonkeyPatch, rank: int, nodes: int, **names: str) -> None:
    """What srun gives task `rank` of a 2-task step of job 4242 (step 3) across `nodes` nodes, plus `names`."""
    for name, value in {
        "SLURM_PROCID": str(rank),
        "SLURM_STEP_NUM_TASKS": "2",
        "SLURM_NTASKS": "2",
        "SLURM_JOB_ID": "4242",
        "SLURM_STEP_ID": "3",
        "SLURM_STEP_NUM_NODES": str(nodes),
        "SLURM_NNODES": str(nodes),
        **names,
    }.items():
        env.setenv(name, value)


@pytest.mark.parametrize(
    "nodelist, first",
    [("gpu[01-04,07]", "gpu01"), ("node-a[1-2],node-b3", "node-a1"), ("gpu[001-003]", "gpu001"), ("n7,n3", "n7")],
)
def test_an_srun_step_across_nodes_meets_on_its_first_node(env: pytest.MonkeyPatch, nodelist: str, first: str) -> None:
    # A plain srun (salloc, a site's own script): no MASTER_ADDR; every rank derives the same rendezvous.
    seen = set()
    for rank in (0, 1):
        srun_step(env, rank, nodes=2, SLURM_STEP_NODELIST=nodelist, SLURM_JOB_NODELIST="other[1-9]")
        for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):  # the other rank's process starts afresh
            env.delenv(name, raising=False)
        adopt_srun_environment()
        seen.add((os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]))
    # The step's first node (not the job's), and the port 20000 + (job + 1009 x step) mod 20000.
    assert seen == {(first, str(20000 + (4242 + 1009 * 3) % 20000))}


def test_the_job_node_list_serves_where_the_step_has_none(env: pytest.MonkeyPatch) -> None:
    srun_step(env, 1, nodes=4, SLURM_JOB_NODELIST="cn[0100-0103]", SLURM_STEP_ID="0")
    adopt_srun_environment()
    # Step 0 of a job meets on the port the shipped sbatch scripts choose: 20000 + job id mod 20000.
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("cn0100", "24242")


def test_a_single_node_step_meets_on_loopback(env: pytest.MonkeyPatch) -> None:
    srun_step(env, 0, nodes=1, SLURM_STEP_NODELIST="gpu07")
    adopt_srun_environment()
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and os.environ["MASTER_PORT"] == "27269"


def test_a_launchers_or_scripts_rendezvous_wins(env: pytest.MonkeyPatch) -> None:
    srun_step(env, 1, nodes=2, SLURM_STEP_NODELIST="gpu[01-02]", MASTER_ADDR="10.1.2.3", MASTER_PORT="29999")
    adopt_srun_environment()
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.1.2.3", "29999")
    env.delenv("MASTER_PORT"), env.delenv("RANK")
    adopt_srun_environment()  # an address given alone keeps it, and takes the step's port
    assert (os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]) == ("10.1.2.3", "27269")


def test_a_step_across_nodes_with_no_address_is_refused_at_once(env: pytest.MonkeyPatch) -> None:
    srun_step(env, 1, nodes=2)
    with pytest.raises(PlacementError, match=r"across 2 nodes.*set MASTER_ADDR to the host of rank 0"):
        adopt_srun_environment()
    env.setenv("SLURM_STEP_NODELIST", "gpu[01-")
    with pytest.raises(PlacementError, match=r"SLURM_STEP_NODELIST: node list 'gpu\[01-' is malformed.*MASTER_ADDR"):
        adopt_srun_environment()


NODELISTS = {
    "gpu[01-04,07]": ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"],
    "node-a[1-2],node-b3": ["node-a1", "node-a2", "node-b3"],
    "gpu[001-003]": ["gpu001", "gpu002", "gpu003"],
    "a[8-10],b[099-101]": ["a8", "a9", "a10", "b099", "b100", "b101"],
    "rack[1-2]-n[01-02]": ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"],
    "login1": ["login1"],
}


def test_node_lists_expand_to_their_hosts() -> None:
    for nodelist, hosts in NODELISTS.items():
        assert expand_nodelist(nodelist) == hosts, nodelist
    for bad in ("gpu[01-", "gpu]1[", "a,,b", "n[3-1]", "n[x]", ""):
        with pytest.raises(ValueError, match="node list"):
            expand_nodelist(bad)


@pytest.mark.multiprocess  # runs scontrol
def test_node_lists_expand_as_scontrol_expands_them(tmp_path: Path) -> None:
    if shutil.which("scontrol") is None:
        pytest.skip("SLURM is not installed here (tests/launch/test_slurm.py installs it where it can)")
    # scontrol reads a configuration before it expands anything; any valid one will do.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=x\nSlurmctldHost=localhost\nNodeName=localhost\nPartitionName=p Nodes=ALL\n")
    for nodelist, hosts in NODELISTS.items():
        shown = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            capture_output=True,
            text=True,
            env={**os.environ, "SLURM_CONF": str(conf)},
            timeout=30,
            check=True,
        )
        assert shown.stdout.split() == hosts, nodelist
