"""Fine-tuning outputs a reader looks at: predictions CSV, confusion-matrix and training-curve PNGs
(drawn with OpenCV, no plotting library), and a rich summary table."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np


def write_predictions(
    path: Path, keys: list[str], grades: np.ndarray, predictions: np.ndarray, scores: np.ndarray
) -> None:
    """One row per sample: key, true grade, predicted grade, the model's raw score (regression output,
    or the predicted grade's probability) and the per-grade scores."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["key", "grade", "prediction", "score", *[f"score_{g}" for g in range(scores.shape[1])]])
        for key, grade, prediction, row in zip(keys, grades, predictions, scores, strict=True):
            writer.writerow(
                [key, int(grade), int(prediction), f"{row[int(prediction)]:.6f}", *[f"{v:.6f}" for v in row]]
            )


def confusion_png(path: Path, confusion: np.ndarray, title: str) -> None:
    n = len(confusion)
    cell, margin = 80, 90
    image = np.full((margin + n * cell + 20, margin + n * cell + 20, 3), 255, np.uint8)
    rows = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    for i in range(n):
        for j in range(n):
            shade = int(255 - 200 * rows[i, j])
            x, y = margin + j * cell, margin + i * cell
            cv2.rectangle(image, (x, y), (x + cell, y + cell), (255, shade, shade), -1)
            cv2.rectangle(image, (x, y), (x + cell, y + cell), (160, 160, 160), 1)
            text = str(int(confusion[i, j]))
            colour = (255, 255, 255) if rows[i, j] > 0.6 else (0, 0, 0)
            cv2.putText(
                image,
                text,
                (x + cell // 2 - 9 * len(text), y + cell // 2 + 8),
                cv2.FONT_HERSHEY_SIMPLEX,
                0.7,
                colour,
                2,
            )
        cv2.putText(
            image, str(i), (margin - 25, margin + i * cell + cell // 2 + 6), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1
        )
        cv2.putText(
            image, str(i), (margin + i * cell + cell // 2 - 6, margin - 10), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1
        )
    cv2.putText(image, title, (10, 25), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (0, 0, 0), 1)
    cv2.putText(image, "true (rows) vs predicted (columns)", (10, 50), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (80, 80, 80), 1)
    _write_png(path, image)


def curves_png(path: Path, series: dict[str, list[tuple[float, float]]]) -> None:
    """Each named series of (epoch, value) pairs in its own panel, stacked."""
    width, panel, margin = 640, 200, 50
    colours = [(200, 80, 30), (30, 140, 30), (30, 30, 200), (150, 30, 150)]
    image = np.full((panel * max(len(series), 1), width, 3), 255, np.uint8)
    for p, (name, points) in enumerate(series.items()):
        top = p * panel
        cv2.rectangle(image, (margin, top + 30), (width - 20, top + panel - 30), (180, 180, 180), 1)
        finite = [(x, y) for x, y in points if y is not None and np.isfinite(y)]
        label = f"{name}" + (f"  last {finite[-1][1]:.4f}" if finite else "")
        cv2.putText(image, label, (margin, top + 22), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (0, 0, 0), 1)
        if len(finite) < 1:
            continue
        xs, ys = np.array(finite).T
        x0, x1 = xs.min(), max(xs.max(), xs.min() + 1e-9)
        y0, y1 = ys.min(), max(ys.max(), ys.min() + 1e-9)
        px = margin + (xs - x0) / (x1 - x0) * (width - 20 - margin)
        py = top + panel - 30 - (ys - y0) / (y1 - y0) * (panel - 60)
        pts = np.stack([px, py], 1).round().astype(np.int32)
        cv2.polylines(image, [pts], False, colours[p % len(colours)], 2)
        cv2.putText(image, f"{y1:.3g}", (2, top + 36), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (80, 80, 80), 1)
        cv2.putText(image, f"{y0:.3g}", (2, top + panel - 30), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (80, 80, 80), 1)
    _write_png(path, image)


def _write_png(path: Path, image: np.ndarray) -> None:
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")


def summary_table(title: str, rows: dict[str, dict]) -> None:
    """Print split -> metrics as a rich table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("split", "samples", "accuracy", "QWK", "macro AUC", "recall per grade"):
        table.add_column(column)
    for split, m in rows.items():
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        table.add_row(
            split,
            str(m["samples"]),
            fmt(m["accuracy"]),
            fmt(m["qwk"]),
            fmt(m["macro_auc"]),
            " ".join("-" if r is None else f"{r:.2f}" for r in m["per_grade_recall"]),
        )
    Console().print(table)
