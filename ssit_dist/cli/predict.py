"""`ssit-dist predict`: grade photographs with a trained grader (eval/grade_photographs.py)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ssit_dist.cli.common import NPROC_OPTION, RateColumn, console, err, fail, launch_ranks
from ssit_dist.eval.grade_photographs import COLUMNS_HELP, PredictOptions


def predict(
    inputs: list[str] = typer.Argument(
        ...,
        metavar="INPUT...",
        help="Photographs, folders (searched recursively) or globs, in any format `shard` reads.",
    ),
    model: Path = typer.Option(
        ...,
        "-m",
        "--model",
        help="A fine-tuning run folder, a grader .safetensors (with its .json) or a timm grader folder.",
    ),
    output: Path = typer.Option(
        Path("predictions.csv"), "-o", "--output", help=f"The predictions CSV: {COLUMNS_HELP}."
    ),
    checkpoint: str = typer.Option("best", help="best or final: which weights of a fine-tuning run folder."),
    labels: Path | None = typer.Option(
        None,
        help="True grades (any format `shard --labels` reads): also write metrics.json (QWK, accuracy, referable AUC, "
        "sensitivity, specificity with patient-bootstrap 95% intervals) and confusion.png beside the CSV.",
    ),
    labels_format: str = typer.Option("auto", help="Format of --labels (auto: recognised by its header)."),
    tta: bool = typer.Option(False, help="Test-time augmentation: average over the identity and three flips."),
    batch_size: int = typer.Option(64, min=1, help="Photographs per forward pass."),
    workers: int | None = typer.Option(
        None, min=0, help="Loader processes that crop and decode (default: cores, up to 8)."
    ),
    overwrite: bool = typer.Option(False, help="Replace the outputs if they exist."),
    html: Path | None = typer.Option(
        None, help="Also write a self-contained page: each photograph with its grade and the grader's attention."
    ),
    fundus_check: bool = typer.Option(
        True, help="Give no grade to a photograph that does not look like a fundus photograph (a problem row)."
    ),
    nproc: int = NPROC_OPTION,
) -> None:
    """Grade fundus photographs with a trained grader, preprocessed exactly as its training shards were packed
    (fundus crop, size, JPEG quality, normalisation). One row per photograph; a file that cannot be read gets
    a row with its problem, as does one that does not look like a fundus photograph. With --labels, score the
    grades against any public labels file."""
    args = (inputs, model, output, checkpoint, labels, labels_format, tta, batch_size, workers, overwrite, html)
    options = PredictOptions(*args, fundus_check)
    if nproc > 1 and "RANK" not in os.environ:  # this command again in `nproc` ranks, each grading its share
        raise typer.Exit(_in_ranks(options, nproc))
    _grade(options)


def _grade(options: PredictOptions) -> None:
    """Grade with a progress bar, stopping cleanly on Ctrl-C, `kill` or `timeout`; print the summary."""
    from ssit_dist import stop as stop_signals
    from ssit_dist.eval.grade_photographs import PredictStopped
    from ssit_dist.eval.grade_photographs import predict as run

    stop = stop_signals.install("grading stops after this batch, writing nothing")
    columns = (TextColumn("[bold]grading"), BarColumn(), MofNCompleteColumn(), RateColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=err, disable=not err.is_terminal) as progress:
            task = progress.add_task("grade", total=None)
            summary = run(options, lambda done, total: progress.update(task, completed=done, total=total), stop)
    except PredictStopped as e:
        fail(str(e), 128 + signal.SIGINT)  # as a shell reports a command Ctrl-C ended
    except (OSError, ValueError) as e:  # PredictError, PhotographsError, LabelsError, GraderFileError: ValueErrors
        fail(str(e), 1)
    _print_summary(summary)


def _in_ranks(options: PredictOptions, nproc: int) -> int:
    """Refuse existing outputs once, here, then run `ssit-dist predict` (less --nproc) in `nproc` ranks."""
    from ssit_dist.eval.grade_photographs import PredictError, output_paths, refuse_existing

    try:
        refuse_existing(output_paths(options), options.overwrite)
    except PredictError as e:
        fail(str(e), 1)
    words = sys.argv[sys.argv.index("predict") :]
    at = next(i for i, w in enumerate(words) if w == "--nproc" or w.startswith("--nproc="))
    return launch_ranks("ssit_dist", words[:at] + words[at + (1 if "=" in words[at] else 2) :], nproc)


def _print_summary(summary: dict[str, Any]) -> None:
    if not summary["main"]:
        return
    problems = f", {summary['problems']} with a problem (see the problem column)" if summary["problems"] else ""
    console.print(f"graded {summary['graded']} of {summary['photographs']} photographs{problems}", markup=False)
    metrics = summary.get("metrics")
    if metrics:
        said = ", ".join(
            f"{name} {metrics[name]['value']} [{metrics[name]['ci95'][0]}, {metrics[name]['ci95'][1]}]"
            for name in ("qwk", "accuracy", "referable_auc", "sensitivity", "specificity")
        )
        console.print(f"{metrics['samples']} scored ({metrics['patients']} patients): {said}", markup=False)
        left = ("unmatched_rows", "unlabelled_photographs", "ungradable_photographs", "unreadable_photographs")
        console.print("; ".join(f"{k.replace('_', ' ')}: {metrics[k]}" for k in left), markup=False)
    console.print(f"wrote {', '.join(summary['written'])}", markup=False)
