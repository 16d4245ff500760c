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


def _memory_mb() -> int:
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    return int(next(line.split()[1] for line in meminfo if line.startswith("MemTotal"))) // 1024


class LocalSlurm:
    """slurmctld and one slurmd on this host."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.conf = folder / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.jobs: list[str] = []
        self._munged_started = False

    def start(self) -> None:
        host = socket.gethostname()
        self._write_conf(host, [f"NodeName={host}"], _memory_mb() - 1024)
        self._start_munge()
        subprocess.run(["slurmctld", "-i", "-f", str(self.conf)], check=True, env=self.env)
        subprocess.run(["slurmd", "-f", str(self.conf)], check=True, env=self.env)
        self._wait_until_idle(1)

    def _write_conf(self, controller: str, nodes: list[str], memory_mb: int, first_job_id: int = 1) -> None:
        """slurm.conf for `controller` and one line per node (NodeName=... [NodeAddr=...]), each with this
        machine's CPUs and `memory_mb`; state, spool, pid files and logs under the folder."""
        f = self.folder
        for name in ("ctld", "spool", "run", "log"):
            (f / name).mkdir(parents=True, exist_ok=True)
        cpus = os.cpu_count() or 1
        hardware = f"CPUs={cpus} Boards=1 SocketsPerBoard=1 CoresPerSocket={cpus} ThreadsPerCore=1"
        node_lines = "\n".join(f"{node} {hardware} RealMemory={memory_mb} State=UNKNOWN" for node in nodes)
        self.conf.write_text(f"""ClusterName=ssitci
SlurmctldHost={controller}
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
# SIGTERM to SIGKILL (30 s by default): time for a cancelled job's ranks to save under load.
KillWait=10
MinJobAge=600
FirstJobId={first_job_id}
MailProg=/bin/true
StateSaveLocation={f}/ctld
SlurmdSpoolDir={f}/spool/%n
SlurmctldPidFile={f}/run/slurmctld.pid
SlurmdPidFile={f}/run/slurmd-%n.pid
SlurmctldLogFile={f}/log/slurmctld.log
SlurmdLogFile={f}/log/slurmd-%n.log
# Preemption as sites set it up: a job in `urgent` requeues the `debug` jobs in its way, whose tasks get
# SIGTERM at once and GraceTime seconds to save (a tiny run saves in about one) before SLURM ends and
# requeues the job.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
{node_lines}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime=10
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
""")

    def _start_munge(self) -> None:
        if subprocess.run(["munge", "-n"], capture_output=True).returncode != 0:
            subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "-m", "0755", "/run/munge"], check=True)
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
            self._munged_started = True

    def _wait_until_idle(self, nodes: int) -> None:
        deadline = time.monotonic() + 60
        while self.run("sinfo", "-h", "-N", "-o", "%T").split().count("idle") < nodes:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the local SLURM did not come up; see {self.folder / 'log'}")
            time.sleep(0.3)

    def __enter__(self) -> LocalSlurm:
        try:
            self.start()
        except BaseException:
            self.stop()  # whatever came up before the failure goes down again
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def stop(self) -> None:
        """Cancel what the tests submitted (their ranks are not the daemons' children), then stop the
        daemons by the PIDs they wrote."""
        for job_id in self.jobs:
            self.run("scancel", job_id)
        deadline = time.monotonic() + 30
        while self.jobs and self.run("squeue", "-h", "-o", "%i").strip() and time.monotonic() < deadline:
            time.sleep(0.5)
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
        self.jobs.append(result.stdout.strip().split(";")[0])
        return self.jobs[-1]

    def job(self, job_id: str) -> dict[str, str]:
        fields = self.run("scontrol", "show", "job", "-o", job_id).split()
        return dict(f.split("=", 1) for f in fields if "=" in f)

    def wait(self, job_id: str, timeout: float, settle_s: float = 0.0) -> dict[str, str]:
        """Poll until the job has ended (sbatch --wait notices late). For a job that may requeue itself,
        which can show an ending state on its way back to PENDING, pass `settle_s` (10 s is enough here):
        an ending state then counts once it has held that long."""
        deadline, ended_since, history = time.monotonic() + timeout, None, []
        while True:
            job = self.job(job_id)
            state = f"{job.get('JobState')}/{job.get('Reason')}/restarts={job.get('Restarts')}"
            if not history or history[-1] != state:
                history.append(state)
            job["History"] = " -> ".join(history)
            if job.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                ended_since = ended_since or time.monotonic()
                if time.monotonic() - ended_since >= settle_s:
                    return job
            else:
                ended_since = None
            if time.monotonic() > deadline:
                self.run("scancel", job_id)
                raise TimeoutError(f"job {job_id} still {job.get('JobState')} after {timeout} s")
            time.sleep(0.5)


class TwoNodeSlurm(LocalSlurm):
    """Two SLURM nodes on this host, each in its own network namespace with its own hostname, /etc/hosts
    and address (10.77.0.1, 10.77.0.2 on a bridge; this host is 10.77.0.254 on it); slurmctld runs on
    node 1. A job across them reaches the other node only through that bridge, as on two machines."""

    SUBNET = "10.77.0"

    def __init__(self, folder: Path):
        super().__init__(folder)
        tag = os.getpid() % 100000
        self.nodes = [f"ssitn{i}" for i in (1, 2)]
        self.namespaces = [f"ssit{tag}n{i}" for i in (1, 2)]
        self.bridge = f"ssbr{tag}"

    @staticmethod
    def unavailable() -> str | None:
        missing = [tool for tool in ("ip", "nsenter", "unshare", "mount") if shutil.which(tool) is None]
        if missing:
            return f"{', '.join(missing)} missing (iproute2, util-linux)"
        taken = subprocess.run(["ip", "-o", "addr", "show", "to", f"{TwoNodeSlurm.SUBNET}.0/24"], capture_output=True)
        if taken.stdout.strip():
            return f"{TwoNodeSlurm.SUBNET}.0/24 is already in use here: {taken.stdout.decode().split()[1]}"
        return None

    def start(self) -> None:
        addresses = [f"{self.SUBNET}.{i}" for i in (1, 2)]
        hosts = self.folder / "hosts"
        self.folder.mkdir(parents=True, exist_ok=True)
        hosts.write_text(
            "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for a, n in zip(addresses, self.nodes, strict=True))
        )
        nodes = [f"NodeName={n} NodeAddr={a}" for n, a in zip(self.nodes, addresses, strict=True)]
        # Job ids from 1000: never the same as a job of the single-host cluster these tests also run.
        self._write_conf(f"{self.nodes[0]}({addresses[0]})", nodes, _memory_mb() // 2 - 1024, first_job_id=1000)
        self._start_munge()
        ip = ["ip"]
        self._sh(ip + ["link", "add", self.bridge, "type", "bridge"])
        self._sh(ip + ["addr", "add", f"{self.SUBNET}.254/24", "dev", self.bridge])
        self._sh(ip + ["link", "set", self.bridge, "up"])
        for i, (ns, address) in enumerate(zip(self.namespaces, addresses, strict=True), 1):
            veth = f"{self.bridge}v{i}"
            self._sh(ip + ["netns", "add", ns])
            self._sh(ip + ["link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns])
            self._sh(ip + ["link", "set", veth, "master", self.bridge, "up"])
            self._sh(ip + ["-n", ns, "addr", "add", f"{address}/24", "dev", "eth0"])
            self._sh(ip + ["-n", ns, "link", "set", "eth0", "up"])
            self._sh(ip + ["-n", ns, "link", "set", "lo", "up"])
        for i, (ns, node) in enumerate(zip(self.namespaces, self.nodes, strict=True)):
            # Not `ip netns exec`: it remounts /sys, and slurmd then finds no cgroup file system. The
            # daemons keep the UTS and mount namespaces alive; their jobs inherit both.
            daemons = f"slurmctld -i -f {self.conf} && " if i == 0 else ""
            script = f"hostname {node} && mount --bind {hosts} /etc/hosts && {daemons}slurmd -N {node} -f {self.conf}"
            self._sh(
                ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--uts", "--mount", "--propagation", "private"]
                + ["sh", "-c", script]
            )
        self._wait_until_idle(2)

    def stop(self) -> None:
        super().stop()
        time.sleep(1)  # the daemons leave their namespaces
        # A namespace outlives `ip netns del` while any process still holds it, and with it the veth pair
        # whose host end sits on the bridge: deleting that end deletes both.
        for i, ns in enumerate(self.namespaces, 1):
            subprocess.run(["ip", "link", "del", f"{self.bridge}v{i}"], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def _sh(self, command: list[str]) -> None:
        result = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")
