"""A pipeline stage run as its own process, as a user would run it, with its output in a log file: the
one way `ssit-dist demo` and bench/experiments/quality.py run their CLI stages."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

_TAIL_LINES = 15


class StageFailed(RuntimeError):
    """A stage's process exited non-zero; the message names the stage, the exit code and the log, with
    the log's last lines."""


def cli_command(*args: str) -> list[str]:
    """The command line of `ssit-dist ARGS`, through this interpreter: the console script may not be on
    PATH (a venv not activated)."""
    return [sys.executable, "-m", "ssit_dist", *args]


def finetune_command(*overrides: str) -> list[str]:
    """The command line of a one-process fine-tuning run with `field=value` overrides."""
    return [sys.executable, "-m", "ssit_dist.train", "finetune", *overrides]


def segment_command(*overrides: str) -> list[str]:
    """The command line of a one-process segmentation run with `field=value` overrides."""
    return [sys.executable, "-m", "ssit_dist.train", "segment", *overrides]


def run_stage(name: str, command: list[str], log: Path, progress: Callable[[], None] | None = None) -> None:
    """Run `command` with its output (stdout and stderr) in `log`, calling `progress()` every half
    second while it runs; raise StageFailed naming `name` and the log if it fails."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f, subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT) as process:
        try:
            while process.poll() is None:
                time.sleep(0.5)
                if progress is not None:
                    progress()
        except BaseException:  # interrupted: the stage does not outlive its caller
            process.kill()
            raise
    if process.returncode:
        tail = "\n".join(log.read_text().splitlines()[-_TAIL_LINES:])
        raise StageFailed(f"{name} failed (exit {process.returncode}); log {log}:\n{tail}")
