"""launch/slurm/*.sbatch, unmodified, on a real SLURM (slurmctld, slurmd, munge; tests/helpers/slurm.py) with CPU
ranks. One node: a pretraining job submitted by `ssit-dist slurm --submit` equals the same run under
torchrun; a user's SIGUSR1 checkpoints, requeues and resumes, SLURM's own preemption requeues the job once
more, and it ends with the uninterrupted run's weights; `scancel` saves and cancels, never requeues; at the
time limit the job requeues itself up to SSIT_MAX_TIMEOUTS times, then ends; fine-tuning reports. Two
nodes, one network namespace each: one rank per node trains exactly as the single-node run does, a killed
rank fails the job naming rank and node, leaving nothing behind, and plain srun from a script of its own,
with no MASTER_ADDR, forms the group on the step's first node."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import CLI, run_cli
from slurm import LocalSlurm, TwoNodeSlurm, unavailable
from ssit_dist.train.checkpoint import latest_tag
from ssit_dist.train.export import export_encoder
from tiny_runs import ROOT, config, ds_config, rows, train

pytestmark = pytest.mark.slurm

SCRIPT = ROOT / "launch" / "slurm" / "pretrain.sbatch"
CORES = ("--cpus-per-task=1", "--mem-per-cpu=2G")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    reason = unavailable()
    if reason:
        pytest.skip(f"no local SLURM here: {reason}")
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as slurm:
        yield slurm


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    reason = unavailable() or TwoNodeSlurm.unavailable()
    if reason:
        pytest.skip(f"no two-node SLURM in network namespaces here: {reason}")
    with TwoNodeSlurm(tmp_path_factory.mktemp("slurm2")) as slurm:
        yield slurm


def job_env() -> dict[str, str]:
    # sbatch hands the submitting environment to the job, as on any cluster: the venv's Python.
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "SSIT_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}


def submit(cluster: LocalSlurm, folder: Path, cfg: Path, *options: str, nodes: int = 1) -> str:
    """pretrain.sbatch, unmodified, as a user submits it: 2 tasks (CPU ranks) on one or two nodes, one core
    each (the script asks for 15, more than these nodes have)."""
    per_node = f"--ntasks-per-node={2 // nodes}"
    return cluster.submit(
        f"--nodes={nodes}",
        per_node,
        *CORES,
        f"--chdir={folder}",
        *options,
        str(SCRIPT),
        "--config",
        str(cfg),
        env=job_env(),
    )


def wait_for_steps(cluster: LocalSlurm, job_id: str, run_dir: Path, steps: int, timeout: float = 600) -> None:
    """Until the job's run has logged `steps` steps. Starting two ranks takes 20-60 s here and minutes
    under load, hence the long deadline; a job that ends first fails at once, with its log."""
    metrics, deadline = run_dir / "metrics.jsonl", time.monotonic() + timeout
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= steps):
        job = cluster.job(job_id)
        if job.get("JobState") not in ("PENDING", "CONFIGURING", "RUNNING"):
            log = Path(job["StdOut"]).read_text() if Path(job.get("StdOut", "")).is_file() else ""
            raise AssertionError(f"job {job_id} {job.get('JobState')} before step {steps}: {log[-3000:]}")
        assert time.monotonic() < deadline, f"job {job_id} did not reach step {steps} in {timeout} s"
        time.sleep(0.5)


def comment(cluster: LocalSlurm, job_id: str) -> str:
    return cluster.run("squeue", "-h", "--states=all", "-j", job_id, "-o", "%k").strip()


# With a loader worker (SLURM signals every process of a job step, workers included).
STEPS = {
    "epochs": 1,
    "steps_per_epoch": 12,
    "checkpoint_every": 100,
    "log_every": 2,
    "dist_timeout_s": 60,
    "data__workers": 1,
}


@pytest.fixture(scope="module")
def reference(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run every job here must reproduce: 2 ranks under torchrun, uninterrupted."""
    folder = tmp_path_factory.mktemp("torchrun")
    train(config(folder, shards, "run", ds_config(folder, 0), **STEPS))
    return folder / "run"


def weights(run_dir: Path, out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(export_encoder(run_dir, out / run_dir.name)[0]))


def test_pretrain_job_from_ssit_dist_slurm_equals_torchrun(
    cluster: LocalSlurm, shards: Path, reference: Path, tmp_path: Path
) -> None:
    expected = rows(reference)
    # The same run as a SLURM job: 2 tasks on one node, submitted by the line `ssit-dist slurm` prints.
    # Neither SSIT_PYTHON nor this venv on PATH: the nodes run the interpreter that line names.
    plain = config(tmp_path, shards, "slurm", ds_config(tmp_path, 0), **STEPS)
    env = {k: v for k, v in {**cluster.env, **job_env()}.items() if k != "SSIT_PYTHON"}
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if Path(p) != Path(sys.executable).parent)
    cores = ("--cpus-per-rank", "1", "--mem-per-cpu", "2G")
    line = [str(CLI), "slurm", "pretrain", "--ranks-per-node", "2", *cores, "--submit", "--config", str(plain)]
    result = subprocess.run(line, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.startswith(f"SSIT_PYTHON={sys.executable} SSIT_MAX_TIMEOUTS=3 sbatch "), result.stdout
    job_id = re.findall(r"Submitted batch job (\d+)", result.stdout)[0]
    cluster.jobs.append(job_id)
    job = cluster.wait(job_id, timeout=600)
    log = (tmp_path / f"ssit-pretrain-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-3000:]
    assert job["NumCPUs"] == "2" and "time-limit requeues 0 of 3" in log
    assert "0: step 12/12" in log and "1: " in log  # both ranks' output, labelled by srun
    got = rows(tmp_path / "slurm")
    assert [r["step"] for r in got] == list(range(1, 13))
    assert [r["contrastive_loss"] for r in got] == pytest.approx([r["contrastive_loss"] for r in expected], rel=1e-6)


def test_two_nodes_train_exactly_as_one_node_does(
    two_nodes: TwoNodeSlurm, shards: Path, reference: Path, tmp_path: Path
) -> None:
    # One rank per node; each node reaches the other only through the bridge, by its own hostname.
    cfg = config(tmp_path, shards, "two_nodes", ds_config(tmp_path, 0), **STEPS)
    job_id = submit(two_nodes, tmp_path, cfg, nodes=2)
    job = two_nodes.wait(job_id, timeout=600)
    log = (tmp_path / f"ssit-pretrain-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-3000:]
    assert f"on ssitn[1-2], rendezvous ssitn1:{20000 + int(job_id) % 20000}" in log  # free on ssitn1
    assert "2 ranks on 2 hosts (ssitn1: ranks 0; ssitn2: ranks 1)" in log
    got, expected = rows(tmp_path / "two_nodes"), rows(reference)
    assert [r["step"] for r in got] == list(range(1, 13))
    assert [r["contrastive_loss"] for r in got] == pytest.approx([r["contrastive_loss"] for r in expected], rel=1e-6)
    a, b = weights(reference, tmp_path), weights(tmp_path / "two_nodes", tmp_path)
    for key in a:  # same world size, same data order, fp32: the same arithmetic
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_usr1_requeues_then_slurm_preemption_requeues_and_the_run_ends_with_the_same_weights(
    cluster: LocalSlurm, shards: Path, reference: Path, tmp_path: Path
) -> None:
    chained = config(tmp_path, shards, "chained", ds_config(tmp_path, 0), **STEPS)
    job_id = submit(cluster, tmp_path, chained)
    log = tmp_path / f"ssit-pretrain-{job_id}.out"
    wait_for_steps(cluster, job_id, tmp_path / "chained", 3)
    # A user's SIGUSR1 to the batch script, with no time limit near: save, requeue, not counted.
    cluster.run("scancel", "--signal=USR1", "--batch", job_id)
    # Once the requeued run's ranks exist, an urgent job takes the node: SLURM preempts this one (PreemptMode
    # REQUEUE), its ranks get SIGTERM and stop; the script must leave the job to SLURM's own requeue.
    deadline = time.monotonic() + 600
    while len(_rank_processes(job_id, restart=1)) < 2:
        assert time.monotonic() < deadline, f"the requeued run did not start: {log.read_text()[-3000:]}"
        time.sleep(0.2)
    urgent = cluster.submit("--partition=urgent", "--ntasks=1", f"--output={tmp_path}/urgent.out", "--wrap=true")
    job = cluster.wait(job_id, timeout=600, settle_s=10)
    text = log.read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "2", (job, text[-3000:])
    assert cluster.job(urgent)["JobState"] == "COMPLETED"
    assert text.count(": a user's, not counted; requeueing job") == 1, text[-3000:]
    assert text.count("is being preempted: SLURM requeues or cancels it") == 1, text[-3000:]
    assert "relaunch to resume" in text and "resumed (resume)" in text and "(restart 2," in text
    assert comment(cluster, job_id) == "(null)"  # no time-limit requeue counted
    assert [r["step"] for r in rows(tmp_path / "chained")] == list(range(1, 13))  # no step lost or repeated
    a, b = weights(reference, tmp_path), weights(tmp_path / "chained", tmp_path)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_scancel_saves_and_cancels_without_requeue_on_a_free_port(
    cluster: LocalSlurm, shards: Path, tmp_path: Path
) -> None:
    steps = {"epochs": 1, "steps_per_epoch": 400, "checkpoint_every": 1000, "dist_timeout_s": 60, "data__workers": 1}
    cfg = config(tmp_path, shards, "cancelled", ds_config(tmp_path, 0), **steps)
    job_id = submit(cluster, tmp_path, cfg, "--hold")
    # Another job's rendezvous on the port this job id maps to: the script must pick the next free one.
    with socket.socket() as taken:
        taken.bind(("", 20000 + int(job_id) % 20000))
        taken.listen()
        cluster.run("scontrol", "release", job_id)
        wait_for_steps(cluster, job_id, tmp_path / "cancelled", 3)
    cluster.run("scancel", job_id)  # SIGTERM to the batch script and to every rank
    job = cluster.wait(job_id, timeout=120, settle_s=5)  # a job requeued on its way out would be PENDING
    log = (tmp_path / f"ssit-pretrain-{job_id}.out").read_text()
    assert job["JobState"] == "CANCELLED" and job["Restarts"] == "0", (job, log[-3000:])
    assert "SIGTERM received (scancel, or SLURM ending the job): asking every rank to save and stop" in log
    assert "no requeue from here" in log and "requeueing" not in log
    assert f"rendezvous {job['BatchHost']}:{20000 + (int(job_id) + 1) % 20000}" in log
    # The ranks saved within KillWait, at the step they stopped at (no checkpoint is due before step 1000).
    stopped = re.findall(r"stopped \D*step (\d+); relaunch to resume", log)  # "at step N", "by signal after step N"
    assert stopped and latest_tag(tmp_path / "cancelled") == f"step{int(stopped[0]):08d}", log[-3000:]


def test_time_limit_requeues_until_max_timeouts_then_the_job_ends(cluster: LocalSlurm, tmp_path: Path) -> None:
    # The script's own decision, sourced, on jobs with 5 minutes left (inside the warning's window), as it
    # runs once the ranks have saved: one with a requeue to spare, one whose count is at the cap.
    script = tmp_path / "decide.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        f"source {SCRIPT}\n"
        'if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then say "restarted, comment [$(comment)]"; exit 0; fi\n'
        'requeue_or_end "$(time_left_s)"\n'
        "status=$?\n"
        '[ "$status" != 0 ] || sleep 120  # the requeue ends this run\n'
        'exit "$status"\n'
    )
    env = {**job_env(), "SSIT_MAX_TIMEOUTS": "2"}
    jobs = {
        count: cluster.submit(
            "--time=5",
            f"--comment=my note ssit-timeouts={count}",
            *CORES,
            f"--output={tmp_path}/{count}.out",
            "--open-mode=append",
            str(script),
            env=env,
        )
        for count in (1, 2)
    }
    spare, capped = cluster.wait(jobs[1], timeout=120, settle_s=10), cluster.wait(jobs[2], timeout=120)
    spare_log, capped_log = (tmp_path / "1.out").read_text(), (tmp_path / "2.out").read_text()
    assert spare["JobState"] == "COMPLETED" and spare["Restarts"] == "1", (spare, spare_log)
    assert "time limit: requeue 2 of SSIT_MAX_TIMEOUTS=2" in spare_log
    assert "restarted, comment [my note ssit-timeouts=2]" in spare_log  # counted, the user's note kept
    assert capped["JobState"] == "FAILED" and capped["ExitCode"] == "124:0" and capped["Restarts"] == "0", capped
    assert "not requeueing; submit again to resume" in capped_log
    assert comment(cluster, jobs[2]) == "my note ssit-timeouts=2"


def test_finetune_sbatch_runs_two_processes_and_reports(cluster: LocalSlurm, graded_dir: Path, tmp_path: Path) -> None:
    labelled = tmp_path / "graded32"
    run_cli(
        "shard",
        graded_dir,
        labelled,
        "--size",
        32,
        "--labels",
        graded_dir / "labels.csv",
        "--split",
        "train=0.7,val=0.15,test=0.15",
    )
    tiny = json.dumps({"patch_size": 8, "embed_dim": 24, "depth": 1, "num_heads": 2})
    job_id = cluster.submit(
        "--nodes=1",
        "--ntasks-per-node=2",
        *CORES,
        f"--chdir={tmp_path}",
        str(ROOT / "launch" / "slurm" / "finetune.sbatch"),
        f"train={labelled}",
        "init=random",
        f"run_dir={tmp_path / 'grading'}",
        "img_size=32",
        "epochs=1",
        "workers=0",
        "arch=vit_small_patch16_224",
        f"timm_kwargs={tiny}",
        env=job_env(),
    )
    job = cluster.wait(job_id, timeout=600)
    log = (tmp_path / f"ssit-finetune-{job_id}.out").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-3000:]
    report = json.loads((tmp_path / "grading" / "report.json").read_text())
    assert report["processes"] == 2 and report["test"]["samples"] == 45  # every test sample exactly once


def _job_processes(job_id: str) -> dict[int, tuple[bytes, dict[bytes, bytes]]]:
    """Every live process of SLURM job `job_id` (ranks, their loader workers and forkserver, srun, the
    batch shell): pid -> (command line, environment). Both namespace nodes share this process table."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            environ = dict(e.split(b"=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e)
            cmdline, state = (proc / "cmdline").read_bytes(), (proc / "stat").read_text().split()[2]
        except (OSError, IndexError):
            continue
        if environ.get(b"SLURM_JOB_ID") == job_id.encode() and state != "Z":
            found[int(proc.name)] = (cmdline, environ)
    return found


def _rank_processes(job_id: str, restart: int = 0) -> dict[int, int]:
    """pid of every rank of job `job_id` in its run after `restart` requeues, by SLURM_PROCID."""
    return {
        int(environ[b"SLURM_PROCID"]): pid
        for pid, (cmdline, environ) in _job_processes(job_id).items()
        # argv "... -m ssit_dist.train pretrain ...", as the sbatch script starts each rank
        if b"\0-m\0ssit_dist.train\0pretrain\0" in cmdline and int(environ.get(b"SLURM_RESTART_COUNT", b"0")) == restart
    }


def test_a_dead_rank_fails_the_job_naming_it_and_its_node_and_leaves_nothing(
    two_nodes: TwoNodeSlurm, shards: Path, tmp_path: Path
) -> None:
    cfg = config(
        tmp_path,
        shards,
        "dies",
        ds_config(tmp_path, 0),
        epochs=1,
        steps_per_epoch=200,
        dist_timeout_s=60,
        data__workers=1,
    )
    job_id = submit(two_nodes, tmp_path, cfg, nodes=2)
    metrics, deadline = tmp_path / "dies" / "metrics.jsonl", time.monotonic() + 180
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert time.monotonic() < deadline, "the job did not start training"
        time.sleep(0.2)
    ranks = _rank_processes(job_id)  # both nodes' processes are visible from this host
    assert sorted(ranks) == [0, 1]
    os.kill(ranks[1], signal.SIGKILL)  # rank 1, on node 2, as the OOM killer would
    started = time.monotonic()
    job = two_nodes.wait(job_id, timeout=120)
    log = (tmp_path / f"ssit-pretrain-{job_id}.out").read_text()
    assert job["JobState"] == "FAILED" and time.monotonic() - started < 90, log[-3000:]
    assert "srun: error: ssitn2: task 1: Killed" in log, log[-3000:]  # srun names rank (task) and node
    deadline = time.monotonic() + 30
    while _job_processes(job_id):  # rank 0 on node 1 and every loader worker included
        assert time.monotonic() < deadline, f"processes left behind: {_job_processes(job_id)}"
        time.sleep(0.5)


def test_a_process_outside_srun_runs_as_one_instead_of_waiting_for_the_jobs_tasks(
    cluster: LocalSlurm, tmp_path: Path
) -> None:
    # A 2-task job whose batch script starts the trainer's process-group set-up itself, not through srun:
    # it must not wait (here 60 s, 30 minutes by default) for a second task that never comes.
    script = tmp_path / "outside.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        '"$SSIT_PYTHON" -c "import logging; logging.basicConfig()\n'
        "from ssit_dist.dist import init_process_group, world_size\n"
        "init_process_group(60)\n"
        "print('world', world_size())\"\n"
    )
    job_id = cluster.submit(
        "--ntasks=2", f"--chdir={tmp_path}", f"--output={tmp_path}/out.txt", str(script), env=job_env()
    )
    job = cluster.wait(job_id, timeout=50)
    log = (tmp_path / "out.txt").read_text()
    assert job["JobState"] == "COMPLETED" and "world 1" in log, log[-2000:]
    assert "outside srun" in log and "2 tasks" in log


def test_plain_srun_across_two_nodes_finds_its_rendezvous_without_master_addr(
    two_nodes: TwoNodeSlurm, tmp_path: Path
) -> None:
    # A site's own script (or an salloc session): plain srun over two nodes, no MASTER_ADDR or MASTER_PORT.
    # The ranks must meet on the step's first node, as the shipped scripts' scontrol line arranges.
    script = tmp_path / "plain_srun.sbatch"
    script.write_text(
        "#!/bin/bash\n"
        "unset MASTER_ADDR MASTER_PORT\n"
        'srun --label "$SSIT_PYTHON" -c "import os, socket, torch\n'
        "from ssit_dist.dist import init_process_group, rank, shutdown, sum_over_ranks\n"
        "device = init_process_group(30)\n"
        "total = int(sum_over_ranks(torch.ones(1), device).item())\n"
        "where = os.environ['MASTER_ADDR'] + ':' + os.environ['MASTER_PORT']\n"
        "print('rank', rank(), 'on', socket.gethostname(), 'met at', where, 'sum', total)\n"
        'shutdown()"\n'
    )
    job_id = two_nodes.submit(
        "--nodes=2",
        "--ntasks-per-node=1",
        *CORES,
        f"--chdir={tmp_path}",
        f"--output={tmp_path}/out.txt",
        str(script),
        env=job_env(),
    )
    job = two_nodes.wait(job_id, timeout=90)
    log = (tmp_path / "out.txt").read_text()
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-3000:]
    # Step 0 of the job: the port the shipped scripts would have chosen.
    where = f"met at ssitn1:{20000 + int(job_id) % 20000} sum 2"
    assert f"0: rank 0 on ssitn1 {where}" in log and f"1: rank 1 on ssitn2 {where}" in log, log
