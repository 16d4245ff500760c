"""Where a run's metrics go, on rank 0: RUN_DIR/metrics.jsonl, one JSON line per step (pretraining),
validation (segmentation) or epoch (fine-tuning), for every trainer; for pretraining also TensorBoard
and the console (`Reporter`). The run's closing report.json is written with `write_report`.

A resumed run first drops the rows a killed run wrote after the checkpoint it resumes from
(`metrics_from`), so that every row appears once and the file reads as one unbroken run. The console
gets a rich progress bar on a terminal and one plain line per step otherwise (logs of batch jobs stay
readable).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ssit_dist import atomic


def metrics_from(run_dir: Path, key: str, position: int) -> None:
    """At a run's start: metrics.jsonl keeps its rows whose `key` ("step", "epoch") is at most `position`,
    where the run resumes (0: a fresh start keeps none). A line a kill cut short goes too."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    atomic.write_text(path, "".join(line + "\n" for line in lines if 0 < _position(line, key) <= position))


def append_metrics(run_dir: Path, row: dict[str, Any]) -> None:
    """One row more in metrics.jsonl."""
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def write_report(run_dir: Path, report: dict[str, Any]) -> Path:
    """The run's report.json, whole or not at all."""
    return atomic.write_json(run_dir / "report.json", report)


class Reporter:
    """Pretraining's per-step metrics: metrics.jsonl, TensorBoard, the console."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        metrics_from(run_dir, "step", start_step)
        self.metrics = open(run_dir / "metrics.jsonl", "a")
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


def _position(line: str, key: str) -> int:
    """The step (or epoch) of a metrics line; -1 for a line a kill cut short."""
    try:
        return int(json.loads(line)[key])
    except (ValueError, KeyError, TypeError):
        return -1
