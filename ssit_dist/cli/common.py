"""What every command shares: the two consoles, failing with a message, starting ranks."""

from __future__ import annotations

import os
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import ProgressColumn
from rich.text import Text

console = Console()
err = Console(stderr=True)


class RateColumn(ProgressColumn):
    def render(self, task: Any) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} img/s" if speed else "-- img/s", style="cyan")


def launch_ranks(module: str, args: list[str], nproc: int) -> int:
    """`nproc` ranks of `python -m module args` on this machine (ssit_dist/local_launch.py); each takes its
    share of the cores itself (ssit_dist/runtime.py)."""
    from ssit_dist.local_launch import launch

    return launch(module, args, nproc, dict(os.environ))


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


# The options every command that starts ranks declares, spelt and meant the same everywhere.
CONFIG_OPTION = typer.Option(None, "--config", help="Run config (YAML or JSON, or a shipped name); fields follow.")
NPROC_OPTION = typer.Option(1, "--nproc", help="Processes (ranks) on this machine: GPUs, or CPU ranks without GPUs.")
