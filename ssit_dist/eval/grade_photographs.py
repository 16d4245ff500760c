"""`ssit-dist predict`: grade new photographs with a trained grader, preprocessed exactly as its training data.

The photographs (data/loading/photographs.py) are cropped, JPEG-encoded and decoded by the packer's and the
loader's own functions at the size, quality and normalisation the grader records (models/grader_files.py),
in DataLoader workers. The grader runs in eval mode under Accelerate's autocast, as fine-tuning's
evaluation does; process p of a multi-GPU launch grades photographs p, p + world, ... and the rows are
gathered back in input order (as eval/over_split.py does for a split). Test-time augmentation, where asked
for, averages the outputs over the identity and the three flips (classification: the probabilities).

Outputs, written atomically: the predictions CSV (COLUMNS), with `--labels` metrics.json and confusion.png
beside it (eval/label_metrics.py), with `--html` the page of eval/html_report.py. Existing outputs are
refused without `overwrite`, before anything runs.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ssit_dist import atomic
from ssit_dist.eval.crossval import REFERABLE_GRADE

if TYPE_CHECKING:  # torch and the model stack load when photographs are graded: `--help` needs none
    import torch
    from accelerate import Accelerator

    from ssit_dist.data.loading.photographs import PhotographFiles
    from ssit_dist.eval.label_metrics import PhotographLabels
    from ssit_dist.models.grader import Grader
    from ssit_dist.models.grader_files import GraderInfo
    from ssit_dist.stop import StopRequest

COLUMNS_HELP = (
    "image (the path as found), grade (predicted), score (regression: the model's output; classification: "
    "the predicted grade's probability), p_grade0..p_grade4 (classification: softmax probabilities; "
    "regression: softmax(-(score - g)^2), how close the score lies to each grade), referable_score "
    "(classification: p(grade >= 2); regression: the score), referable (1 where grade >= 2), thresholds "
    "(regression: the scores at which the grade steps up, space-separated), true_grade (with --labels), "
    "problem (why a photograph has no grade: unreadable, truncated, not an image, not a fundus photograph)"
)


class PredictError(ValueError):
    """Grading cannot go on (an output exists, nothing could be graded); the message says what to do."""


class PredictStopped(RuntimeError):
    """A stop signal (Ctrl-C, `kill`, `timeout`) ended grading after a batch, its workers stopped; the
    outputs are written only at the end, so nothing was."""


@dataclass(frozen=True)
class PredictOptions:
    inputs: list[str]
    model: Path
    output: Path = Path("predictions.csv")
    checkpoint: str = "best"
    labels: Path | None = None
    labels_format: str = "auto"
    tta: bool = False
    batch_size: int = 64
    workers: int | None = None  # None: default_workers()
    overwrite: bool = False
    html: Path | None = None
    check_fundus: bool = True  # photographs that do not look like fundus photographs get a problem, no grade


@dataclass
class Graded:
    """The grader's outputs for the photographs it could read, and the others' problems, by index."""

    indices: np.ndarray  # (n,) photograph indices, sorted
    outputs: np.ndarray  # (n, outputs) float32: logits (TTA: log mean probability) or the regression score
    problems: dict[int, str] = field(default_factory=dict)
    views: np.ndarray | None = None  # (n, H, W, 3) uint8 RGB, with `attention`: what the grader saw
    attention: np.ndarray | None = None  # (n, h, w) float32, head-mean CLS attention scaled to max 1


def default_workers(processes: int = 1) -> int:
    """Loader workers of each of `processes` on this machine: its share of the cores, up to 8 (the crop of
    a full-size photograph is the slow part)."""
    return max(1, min(len(os.sched_getaffinity(0)) // processes, 8))


def output_paths(options: PredictOptions) -> list[Path]:
    """Every file the run writes: the CSV, metrics.json and confusion.png beside it (with labels), the page."""
    paths = [options.output]
    if options.labels is not None:
        paths += [options.output.with_name("metrics.json"), options.output.with_name("confusion.png")]
    return paths + ([options.html] if options.html is not None else [])


def refuse_existing(paths: list[Path], overwrite: bool) -> None:
    existing = [p for p in paths if p.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more of its outputs)" if len(existing) > 1 else ""
        raise PredictError(f"{existing[0]} already exists{more}: pass --overwrite to replace it")


def predict(
    options: PredictOptions,
    on_progress: Callable[[int, int], None] | None = None,
    stop: StopRequest | None = None,
) -> dict[str, Any]:
    """Grade the photographs of `options.inputs` and write the outputs (module docstring); returns a summary
    for the console: counts, the files written, the metrics. `on_progress(done, total)` after each batch
    (on the main process). `stop` (ssit_dist/stop.py, installed by the command): PredictStopped after the
    batch during which it was asked for."""
    import torch
    from accelerate import Accelerator

    from ssit_dist.data.loading.photographs import find_photographs
    from ssit_dist.eval.label_metrics import match_labels
    from ssit_dist.models.grader_files import open_grader

    refuse_existing(output_paths(options), options.overwrite)
    photographs = find_photographs(options.inputs)
    labels = match_labels(options.labels, photographs, options.labels_format) if options.labels else None
    grader, info = open_grader(options.model, options.checkpoint)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    dataset = photograph_dataset(photographs, info, options.html is not None, options.check_fundus)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    workers = default_workers(local) if options.workers is None else options.workers
    graded = grade(grader, dataset, accelerator, options.batch_size, workers, options.tta, on_progress, stop)
    if len(graded.indices) == 0:
        shown = "; ".join(f"{photographs[i]}: {why}" for i, why in sorted(graded.problems.items())[:3])
        raise PredictError(f"none of the {len(photographs)} photographs could be graded ({shown})")
    rows = prediction_rows(photographs, graded, grader, info, labels)
    summary: dict[str, Any] = {"photographs": len(photographs), "graded": len(graded.indices)}
    summary |= {"problems": len(graded.problems), "written": [str(p) for p in output_paths(options)]}
    summary["main"] = accelerator.is_main_process  # the one process that writes, and reports
    if accelerator.is_main_process:
        regression = grader.objective == "regression"
        summary["metrics"] = write_outputs(options, rows, graded, labels, grader.num_classes, regression)
    return summary


def photograph_dataset(
    photographs: list[str], info: GraderInfo, with_views: bool = False, check_fundus: bool = True
) -> PhotographFiles:
    """The photographs preprocessed as `info` records: the packing's crop and JPEG, the evaluation transform."""
    from ssit_dist.data.loading.grading_transforms import eval_transform
    from ssit_dist.data.loading.photographs import PhotographFiles

    transform = eval_transform(info.img_size, info.mean, info.std)
    view_size = info.img_size if with_views else None
    return PhotographFiles(photographs, info.crop_size, info.jpeg_quality, transform, view_size, check_fundus)


def grader_outputs(grader: Grader, images: torch.Tensor, tta: bool) -> torch.Tensor:
    """The grader's outputs; with `tta`, averaged over the identity, horizontal, vertical and both flips
    (a classification's probabilities are averaged, and returned as their log, which grades_and_scores
    turns back into the same probabilities)."""
    import torch

    if not tta:
        return grader(images).float()
    outputs = [
        grader(images.flip(dims)).float() if dims else grader(images).float() for dims in ((), (-1,), (-2,), (-2, -1))
    ]
    if grader.objective == "classification":
        return torch.stack([o.softmax(1) for o in outputs]).mean(0).log()
    return torch.stack(outputs).mean(0)


def grade(
    grader: Grader,
    dataset: PhotographFiles,
    accelerator: Accelerator,
    batch_size: int,
    workers: int,
    tta: bool = False,
    on_progress: Callable[[int, int], None] | None = None,
    stop: StopRequest | None = None,
) -> Graded:
    """The grader's outputs for every photograph of `dataset`, over every process, in dataset order (and,
    where the dataset keeps views, the views and the encoder's attention). A `stop` asked for raises
    PredictStopped once the loader's workers have stopped."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from ssit_dist.data.loading.photographs import collate_photographs
    from ssit_dist.data.loading.workers import start_batches, stop_batches, worker_options
    from ssit_dist.dist import gather_objects

    grader.to(accelerator.device).eval()
    mine = Subset(dataset, range(accelerator.process_index, len(dataset), accelerator.num_processes))
    loader = DataLoader(mine, batch_size=batch_size, collate_fn=collate_photographs, **worker_options(workers))
    parts: list[dict[str, Any]] = []
    done = 0
    batches = start_batches(loader)  # workers fork from a server that holds the package: no import per worker
    try:
        with torch.no_grad():
            for batch in batches:
                if stop is not None and stop.requested:  # checked before the batch is graded: a stop while
                    break  # the workers start counts too
                parts.append(_grade_batch(grader, batch, accelerator, tta))
                done += len(batch.indices) + len(batch.problems)
                if on_progress is not None and accelerator.is_main_process:
                    on_progress(min(done * accelerator.num_processes, len(dataset)), len(dataset))
    finally:
        stop_batches(batches)
    if stop is not None and stop.requested:
        raise PredictStopped(
            f"{stop.reason}: stopped after {done} of {len(mine)} photographs; nothing written (the outputs are "
            "written at the end): run the command again to grade them"
        )
    gathered = [part for rank_parts in gather_objects(parts, accelerator.device) for part in rank_parts]
    return _merged(gathered)


def _grade_batch(grader: Grader, batch: Any, accelerator: Accelerator, tta: bool) -> dict[str, Any]:
    """One batch's outputs (and views and attention where the batch carries views), as numpy, by index."""
    from ssit_dist.eval.attention import cls_attention

    part: dict[str, Any] = {"indices": batch.indices.numpy(), "problems": batch.problems}
    if not len(batch.indices):
        return part
    images = batch.images.to(accelerator.device)
    with accelerator.autocast():
        part["outputs"] = grader_outputs(grader, images, tta).cpu().numpy()
    if batch.views is not None:
        maps = cls_attention(grader.encoder, images).float().mean(1)
        maps = maps / maps.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
        part["attention"] = maps.cpu().numpy()
        part["views"] = batch.views.permute(0, 2, 3, 1).numpy()
    return part


def _merged(parts: list[dict[str, Any]]) -> Graded:
    problems = {index: why for part in parts for index, why in part["problems"]}
    scored = [part for part in parts if "outputs" in part]
    if not scored:
        return Graded(np.zeros(0, np.int64), np.zeros((0, 0), np.float32), problems)
    indices = np.concatenate([p["indices"] for p in scored])
    order = np.argsort(indices, kind="stable")
    views = np.concatenate([p["views"] for p in scored])[order] if "views" in scored[0] else None
    attention = np.concatenate([p["attention"] for p in scored])[order] if "attention" in scored[0] else None
    return Graded(indices[order], np.concatenate([p["outputs"] for p in scored])[order], problems, views, attention)


def prediction_rows(
    photographs: list[str], graded: Graded, grader: Grader, info: GraderInfo, labels: PhotographLabels | None
) -> list[dict[str, Any]]:
    """One row per photograph, in input order: COLUMNS_HELP's columns as values (None: an empty cell), and
    for a graded photograph `probabilities` (the p_grade values) and `at`, its position in `graded`."""
    import torch

    from ssit_dist.eval.label_metrics import referable_scores

    grades, scores = grader.grades_and_scores(torch.from_numpy(graded.outputs))
    referable = referable_scores(grader.objective, graded.outputs, scores.numpy())
    regression = grader.objective == "regression"
    where = {int(index): k for k, index in enumerate(graded.indices)}
    thresholds = " ".join(f"{t:g}" for t in info.thresholds) if regression and info.thresholds else None
    rows = []
    for i, name in enumerate(photographs):
        row: dict[str, Any] = {"image": name, "problem": graded.problems.get(i)}
        if labels is not None:
            row["true_grade"] = labels.grades.get(i)
        if i in where:
            k = where[i]
            grade, probabilities = int(grades[k]), scores[k].tolist()
            score = float(graded.outputs[k, 0]) if regression else probabilities[grade]
            row |= {"grade": grade, "score": score, "probabilities": probabilities, "thresholds": thresholds}
            row |= {"referable_score": float(referable[k]), "referable": grade >= REFERABLE_GRADE, "at": k}
        rows.append(row)
    return rows


def predictions_csv(rows: list[dict[str, Any]], classes: int, labelled: bool) -> str:
    """The rows as CSV text (numbers to 6 decimals; empty cells where a photograph has no grade)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    probability_columns = [f"p_grade{g}" for g in range(classes)]
    header = ["image", "grade", "score", *probability_columns, "referable_score", "referable", "thresholds"]
    writer.writerow(header + (["true_grade"] if labelled else []) + ["problem"])
    for row in rows:
        graded = "grade" in row
        cells = [row["image"], row.get("grade", "")]
        cells += (
            [f"{row['score']:.6f}"] + [f"{p:.6f}" for p in row["probabilities"]] if graded else [""] * (1 + classes)
        )
        cells += [f"{row['referable_score']:.6f}", int(row["referable"])] if graded else ["", ""]
        cells.append(row.get("thresholds") or "")
        if labelled:
            cells.append("" if row.get("true_grade") is None else row["true_grade"])
        writer.writerow([*cells, row["problem"] or ""])
    return text.getvalue()


def write_outputs(
    options: PredictOptions,
    rows: list[dict[str, Any]],
    graded: Graded,
    labels: PhotographLabels | None,
    classes: int,
    regression: bool,
) -> dict[str, Any] | None:
    """The CSV, and with labels metrics.json and confusion.png, and with `html` the page; the metrics."""
    from ssit_dist.eval.label_metrics import score_predictions
    from ssit_dist.eval.report import confusion_png

    atomic.write_text(options.output, predictions_csv(rows, classes, labels is not None))
    metrics = None
    if labels is not None:
        predicted = {i: (r["grade"], r["referable_score"]) for i, r in enumerate(rows) if "grade" in r}
        metrics = score_predictions(labels, predicted, classes)
        metrics["model"] = str(options.model)
        atomic.write_json(options.output.with_name("metrics.json"), metrics)
        title = f"{Path(options.model).name} on {labels.file}"
        confusion_png(options.output.with_name("confusion.png"), np.array(metrics["confusion_matrix"]), title)
    if options.html is not None:
        write_page(options, rows, graded, metrics, regression)
    return metrics


def write_page(
    options: PredictOptions,
    rows: list[dict[str, Any]],
    graded: Graded,
    metrics: dict[str, Any] | None,
    regression: bool,
) -> None:
    """The page of eval/html_report.py: each photograph as the grader saw it with its attention map."""
    from ssit_dist.eval.html_report import ReportRow, write_html_report

    shown = []
    for row in rows:
        k = row.get("at")
        shown.append(
            ReportRow(
                image=row["image"],
                grade=row.get("grade"),
                probabilities=row.get("probabilities", []),
                referable_probability=row.get("referable_score"),
                referable=row.get("referable"),
                problem=row["problem"] or "",
                truth=row.get("true_grade"),
                photo=None if k is None or graded.views is None else graded.views[k],
                attention=None if k is None or graded.attention is None else graded.attention[k],
            )
        )
    confusion = np.array(metrics["confusion_matrix"]) if metrics else None
    title = f"{Path(options.model).name}: {len(rows)} photographs"
    write_html_report(options.html, shown, metrics, confusion, title, regression)  # type: ignore[arg-type]
