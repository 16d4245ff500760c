"""`ssit-dist slurm`: the sbatch command of a SLURM job."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import typer

from ssit_dist.cli.common import fail


def _sbatch_script(name: str) -> Path:
    """launch/slurm/NAME.sbatch: inside the package in a wheel, the top-level folder in a checkout."""
    package = Path(__file__).resolve().parents[1]
    for folder in (package / "slurm", package.parent / "launch" / "slurm"):
        if (folder / f"{name}.sbatch").is_file():
            return folder / f"{name}.sbatch"
    fail(f"{name}.sbatch not found beside the package; reinstall ssit-dist", 2)
    raise AssertionError  # unreachable: fail exits


def _sbatch_defaults(script: Path) -> dict[str, str]:
    """The script's own `#SBATCH --name=value` lines: what a job gets that the command line does not override."""
    prefix = "#SBATCH --"
    lines = [line.removeprefix(prefix) for line in script.read_text().splitlines() if line.startswith(prefix)]
    return dict(line.split("=", 1) for line in lines if "=" in line)


def slurm(
    ctx: typer.Context,
    job: str = typer.Argument(..., help="pretrain or finetune: launch/slurm/JOB.sbatch."),
    nodes: int = typer.Option(1, help="Nodes."),
    gpus_per_node: int | None = typer.Option(None, help="GPUs per node (one rank each)."),
    ranks_per_node: int | None = typer.Option(None, help="Ranks per node (default: GPUs per node, else 1)."),
    cpus_per_rank: int | None = typer.Option(
        None, help="Cores per rank, its loader workers included (default: the script's, pretrain 15, finetune 8)."
    ),
    mem_per_cpu: str | None = typer.Option(None, help="Memory per core, e.g. 8G (default: the script's, 4G)."),
    max_timeouts: int | None = typer.Option(
        None,
        min=0,
        help="pretrain: requeues at the time limit, at most (default 3; 0: the job ends at its first time "
        "limit). A job requeued by preemption or by `scancel --signal=USR1 --batch` is not counted.",
    ),
    partition: str | None = typer.Option(None, help="SLURM partition."),
    account: str | None = typer.Option(None, help="SLURM account."),
    time_limit: str | None = typer.Option(None, "--time", help="Time limit, e.g. 24:00:00."),
    submit: bool = typer.Option(False, "--submit", help="Run the sbatch command, not only print it."),
) -> None:
    """Print (or --submit) the sbatch command of a SLURM job. The rest goes to the trainer: for pretrain
    --config FILE and field=value, for finetune train=... init=... run_dir=... field=value."""
    if job not in ("pretrain", "finetune"):
        fail(f"job {job!r}: choose pretrain or finetune", 2)
    if job == "finetune" and max_timeouts is not None:
        fail("--max-timeouts: a finetune job is never requeued at its time limit (it resumes when submitted again)")
    script = _sbatch_script(job)
    defaults = _sbatch_defaults(script)
    # The nodes run this interpreter (sbatch hands the environment to the job); whether they can see its
    # path cannot be known from here.
    env = {"SSIT_PYTHON": sys.executable}
    if job == "pretrain":
        env["SSIT_MAX_TIMEOUTS"] = str(3 if max_timeouts is None else max_timeouts)
    ranks = ranks_per_node or gpus_per_node or 1
    command = ["sbatch", f"--nodes={nodes}", f"--ntasks-per-node={ranks}"]
    command += [f"--gpus-per-node={gpus_per_node}"] * bool(gpus_per_node)
    command += [f"--cpus-per-task={cpus_per_rank or defaults['cpus-per-task']}"]
    command += [f"--mem-per-cpu={mem_per_cpu or defaults['mem-per-cpu']}"]
    options = [("--partition", partition), ("--account", account), ("--time", time_limit)]
    command += [f"{flag}={value}" for flag, value in options if value is not None]
    command += [str(script), *_trainer_words(job, ctx.args)]
    assignments = [f"{name}={shlex.quote(value)}" for name, value in env.items()]
    print(" ".join([*assignments, shlex.join(command)]), flush=True)  # plain: a command to copy, not rich markup
    if submit:
        raise typer.Exit(subprocess.call(command, env={**os.environ, **env}))


def _trainer_words(job: str, args: list[str]) -> list[str]:
    """The trainer's words as every run command takes them: `--config FILE` kept, `--run-dir X` and the
    other field flags as `run_dir=X`, so that the job reads what `ssit-dist JOB` would. The config file is
    not read here: it may exist only where the job runs."""
    from ssit_dist.cli.settings import flags_as_overrides
    from ssit_dist.config import FinetuneConfig, PretrainConfig

    config: list[str] = []
    others: list[str] = []
    rest = list(args)
    while rest:
        arg = rest.pop(0)
        if arg == "--config" and rest:
            config += [arg, rest.pop(0)]
        else:
            (config if arg.startswith("--config=") else others).append(arg)
    try:
        return config + flags_as_overrides(others, PretrainConfig if job == "pretrain" else FinetuneConfig)
    except ValueError as e:
        fail(str(e), 2)
