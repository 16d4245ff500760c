"""Where per-step metrics go on rank 0: JSON lines, TensorBoard, and the console.

The console gets a rich progress bar on a terminal and one plain line per step otherwise (logs of
batch jobs stay readable).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ssit_dist import atomic


class Reporter:
    def __init__(self, run_dir: Path, total_steps: int, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        path = run_dir / "metrics.jsonl"
        if path.is_file():  # a resume at start_step: drop the rows a killed run wrote after it
            kept = [line for line in path.read_text().splitlines() if 0 < _step_of(line) <= start_step]
            atomic.write_text(path, "".join(line + "\n" for line in kept))
        self.metrics = open(path, "a")
        # TensorBoard reads every event file in the folder: the purge step drops the points an earlier
        # start (a killed run) logged after the step this run resumes from, as the trim above does.
        self.board = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)
        self.total = total_steps
        self.progress: Progress | None = None
        if sys.stdout.isatty():
            self.progress = Progress(
                TextColumn("[bold]pretrain"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
            )
            self.task = self.progress.add_task("steps", total=total_steps, completed=start_step, status="")
            self.progress.start()

    def step(self, record: dict[str, Any]) -> None:
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        step = record["step"]
        for key in (
            "contrastive_loss",
            "saliency_loss",
            "lr",
            "momentum",
            "saliency_weight",
            "pairs_per_s",
            "data_wait_s",
            "peak_mem_mb",
        ):
            self.board.add_scalar(key, record[key], step)
        if "view_retrieval" in record:
            self.board.add_scalar("view_retrieval", record["view_retrieval"], step)
        self.board.flush()  # as metrics.jsonl: after a kill, TensorBoard holds every step it logged
        status = (
            f"contrastive {record['contrastive_loss']:.4f} saliency {record['saliency_loss']:.4f} "
            f"lr {record['lr']:.2e} momentum {record['momentum']:.5f} {record['pairs_per_s']} pairs/s"
        )
        if self.progress is not None:
            self.progress.update(self.task, completed=step, status=status)
        else:
            print(f"step {step}/{self.total} {status}", flush=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.board.close()
        self.metrics.close()


def _step_of(line: str) -> int:
    """The step of a metrics line; -1 for a line a kill cut short."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return -1
