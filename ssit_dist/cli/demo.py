"""`ssit-dist demo`: the whole pipeline in minutes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ssit_dist.cli.common import console, fail


def demo(
    output: Path = typer.Argument(Path("demo_out"), help="Folder for the demo's images, shards, runs and pictures."),
    data: Path | None = typer.Option(None, help="Your own folder of fundus photographs instead of the synthetic set."),
    labels: Path | None = typer.Option(None, help="With --data: CSV image,grade (paths relative to DATA)."),
    quick: bool = typer.Option(False, "--quick", help="A minute-long run of every stage: checks the setup only."),
    seed: int = typer.Option(0, help="Seeds the photographs, pretraining and fine-tuning (the README's spread: 0-2)."),
) -> None:
    """The whole pipeline in minutes: synthetic photographs (or --data), shards, SSiT pretraining with
    DeepSpeed on 2 ranks, export, fine-tuning and kNN from the export and from random init, grading the
    held-out photographs with `predict` and its page, pictures."""
    import dataclasses

    from ssit_dist.demo import QUICK, DemoPlan, run_demo

    if (data is None) != (labels is None):
        fail("--data and --labels go together: a folder of photographs and its CSV of grades", 2)
    plan = dataclasses.replace(QUICK if quick else DemoPlan(), seed=seed)
    with _stage_progress() as report:
        try:
            result = run_demo(output, report, data, labels, plan)
        except (RuntimeError, ValueError, OSError) as e:
            fail(str(e), 1)
    _print_demo(result, output)


@contextlib.contextmanager
def _stage_progress() -> Iterator[Callable[[Any], None]]:
    """A progress bar per demo stage, and the stage's notes printed above the bars as they come."""
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        TimeElapsedColumn(),
    )
    tasks: dict[str, Any] = {}
    notes_shown: dict[str, int] = {}
    with Progress(*columns, console=console) as progress:

        def report(stage: Any) -> None:  # ssit_dist.demo.Stage
            if stage.name not in tasks:
                tasks[stage.name] = progress.add_task(stage.name, total=stage.total, unit=stage.unit)
            progress.update(tasks[stage.name], completed=stage.done)
            for note in stage.notes[notes_shown.get(stage.name, 0) :]:
                progress.console.print(f"[yellow]{escape(note)}[/]", highlight=False)
            notes_shown[stage.name] = len(stage.notes)

        yield report


def _print_demo(result: dict[str, Any], output: Path) -> None:
    """The demo's table, chance levels, segmentation lines, the predict line and pictures."""
    table = Table(title=f"DR grading on the {result['test_samples']} test photographs ({result['data']})")
    for column in ("encoder", "fine-tuned QWK", "fine-tuned accuracy", "kNN QWK", "kNN accuracy", "view retrieval"):
        table.add_column(column)
    for name, row in result["rows"].items():
        keys = ("finetune_qwk", "finetune_accuracy", "knn_qwk", "knn_accuracy", "view_retrieval")
        table.add_row(name, *(f"{row[k]:.3f}" for k in keys))
    console.print(table)
    chance = result["chance"]
    console.print(
        f"contrastive loss: {result['contrastive_first20']:.3f} (first 20 steps) -> "
        f"{result['contrastive_last20']:.3f} (last 20), chance {chance['contrastive_loss']:.3f}; "
        f"view retrieval chance {chance['view_retrieval']:.3f}; accuracy of always answering the commonest "
        f"grade {chance['accuracy']:.3f}; QWK of any constant answer 0",
        highlight=False,
    )
    for name, seg in result["segmentation"].items():
        dice, auc_pr, floor = seg["dice"], seg["auc_pr"], seg["constant_dice"]
        console.print(
            f"vessels ({name}, synthetic): test Dice {dice:.3f}, AUC-PR {auc_pr:.3f}; all-foreground Dice {floor:.3f}"
        )
    graded, tuned = result["predict"], result["rows"]["SSiT pretrained"]
    console.print(
        f"predict on the test photographs' own files: QWK {graded['qwk']:.3f}, accuracy {graded['accuracy']:.3f} "
        f"(the fine-tuning run's test evaluation: {tuned['finetune_qwk']:.3f}, {tuned['finetune_accuracy']:.3f})",
        highlight=False,
    )
    console.print(f"their page: {graded['page']}", highlight=False, markup=False)
    for name, path in result["pictures"].items():
        console.print(f"{name}: {path}", highlight=False, markup=False)
    console.print(f"[bold green]demo done[/] in {result['seconds']:.0f} s: {escape(str(output / 'results.json'))}")
