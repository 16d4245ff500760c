"""A real, local SLURM cluster for the tests: Debian's slurm-wlm and munge (installed here when missing),
slurmctld and one slurmd on this host, state and logs in a temporary folder. Daemons are stopped by the
PIDs they wrote, never by name. Facts behind the choices: ../shared/notes/local-slurm.md."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurm-wlm", "munge")


def unavailable() -> str | None:
    """Why this machine cannot run a local SLURM, or None when it can (installing the packages first)."""
    if os.geteuid() != 0:
        return "a local SLURM needs root (slurmd runs jobs as their user, munged needs /run/munge)"
    if shutil.which("slurmctld") is None or shutil.which("munged") is None:
        if shutil.which("apt-get") is None:
            return "slurm-wlm and munge are not installed and there is no apt-get to install them"
        result = subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0:
            return f"apt-get install {' '.join(PACKAGES)} failed: {result.stderr.strip()[-300:]}"
    return None


class LocalSlurm:
    def __init__(self, folder: Path):
        self.folder = folder
        self.conf = folder / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._munged_started = False

    def start(self) -> None:
        for name in ("ctld", "spool", "run", "log"):
            (self.folder / name).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname()
        meminfo = Path("/proc/meminfo").read_text().splitlines()
        memory_mb = int(next(line.split()[1] for line in meminfo if line.startswith("MemTotal"))) // 1024
        cpus = os.cpu_count() or 1
        f = self.folder
        self.conf.write_text(f"""ClusterName=ssitci
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again only once its revoked credential has expired (slurmd refuses it
# earlier: "Job credential revoked"); 120 s by default, 10 s here to keep the tests short.
AuthInfo=cred_expire=10
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
# Scheduling pass every second (default 60 s): it starts a requeued job once its begin time has passed.
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=5
MinJobAge=600
MailProg=/bin/true
StateSaveLocation={f}/ctld
SlurmdSpoolDir={f}/spool/%n
SlurmctldPidFile={f}/run/slurmctld.pid
SlurmdPidFile={f}/run/slurmd-%n.pid
SlurmctldLogFile={f}/log/slurmctld.log
SlurmdLogFile={f}/log/slurmd-%n.log
NodeName={host} CPUs={cpus} Boards=1 SocketsPerBoard=1 CoresPerSocket={cpus} ThreadsPerCore=1 \
RealMemory={memory_mb - 1024} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
            subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", "/run/munge"], check=True)
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
            self._munged_started = True
        subprocess.run(["slurmctld", "-i", "-f", str(self.conf)], check=True, env=self.env)
        subprocess.run(["slurmd", "-f", str(self.conf)], check=True, env=self.env)
        deadline = time.monotonic() + 60
        while "idle" not in self.run("sinfo", "-h", "-o", "%T"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the local SLURM did not come up; see {f / 'log'}")
            time.sleep(0.3)

    def stop(self) -> None:
        pids = sorted((self.folder / "run").glob("*.pid"))
        if self._munged_started:
            pids.append(Path("/run/munge/munged.pid"))
        for pid_file in pids:
            try:
                os.kill(int(pid_file.read_text().strip()), 15)
            except (OSError, ValueError):
                pass

    def run(self, *command: str) -> str:
        return subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=60).stdout

    def submit(self, *args: str, env: dict[str, str] | None = None) -> str:
        result = subprocess.run(
            ["sbatch", "--parsable", *args], capture_output=True, text=True, env={**self.env, **(env or {})}, timeout=60
        )
        if result.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed: {result.stderr}")
        return result.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        fields = self.run("scontrol", "show", "job", "-o", job_id).split()
        return dict(f.split("=", 1) for f in fields if "=" in f)

    def wait(self, job_id: str, timeout: float) -> dict[str, str]:
        """Poll until the job has ended (sbatch --wait notices late). An ending state counts once it has
        held for 10 s: a job that requeues itself can show one on its way back to PENDING."""
        deadline, ended_since, history = time.monotonic() + timeout, None, []
        while True:
            job = self.job(job_id)
            state = f"{job.get('JobState')}/{job.get('Reason')}/restarts={job.get('Restarts')}"
            if not history or history[-1] != state:
                history.append(state)
            job["History"] = " -> ".join(history)
            if job.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                ended_since = ended_since or time.monotonic()
                if time.monotonic() - ended_since >= 10:
                    return job
            else:
                ended_since = None
            if time.monotonic() > deadline:
                self.run("scancel", job_id)
                raise TimeoutError(f"job {job_id} still {job.get('JobState')} after {timeout} s")
            time.sleep(0.5)
