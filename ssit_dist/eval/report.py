"""Outputs a reader looks at: predictions CSV, confusion-matrix and training-curve PNGs (drawn with
OpenCV, no plotting library) of fine-tuning and pretraining runs, and a rich summary table."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ssit_dist import atomic

log = logging.getLogger("ssit_dist.report")


def number(value: float | None, places: int = 4) -> str:
    """A metric as a reader reads it on the console: `places` decimals (0.3043, not 0.30434782608695654), "n/a"
    where it is undefined. The files keep full precision (metrics.jsonl, report.json); this is for the eye."""
    return "n/a" if value is None else f"{value:.{places}f}"


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


@dataclass(frozen=True)
class ConfusionCell:
    """One cell of the confusion picture: its count, that count as a share of its true grade's row, and
    its colour's strength, the count over the matrix's largest (so a 2 reads paler than a 59 in any row)."""

    count: int
    row_share: float | None  # None in a row without samples
    strength: float  # 0 (white) to 1 (the darkest blue)

    @property
    def texts(self) -> tuple[str, str]:
        """What the cell says: the count, and the row percentage under it."""
        return str(self.count), "-" if self.row_share is None else f"{100 * self.row_share:.0f}%"


def confusion_cells(confusion: np.ndarray) -> list[list[ConfusionCell]]:
    """The cells of `confusion` (rows: true grade, columns: predicted), as confusion_png draws them."""
    counts = np.asarray(confusion, dtype=np.int64)
    rows, top = counts.sum(1), max(int(counts.max(initial=0)), 1)
    return [
        [ConfusionCell(int(c), float(c / rows[i]) if rows[i] else None, float(c / top)) for c in counts[i]]
        for i in range(len(counts))
    ]


def confusion_png(path: Path, confusion: np.ndarray, title: str) -> None:
    """The confusion matrix as a picture: each cell's count and its share of the true grade's row, coloured
    by count over the whole matrix, with a colour bar that says so."""
    cells = confusion_cells(confusion)
    n, cell, margin, font = len(cells), 80, 90, cv2.FONT_HERSHEY_SIMPLEX
    black, grey = (0, 0, 0), (80, 80, 80)
    size = margin + n * cell
    image = np.full((size + 100, size + 80, 3), 255, np.uint8)  # room for the row totals and the colour bar
    for i, row in enumerate(cells):
        for j, c in enumerate(row):
            x, y = margin + j * cell, margin + i * cell
            cv2.rectangle(image, (x, y), (x + cell, y + cell), _blue(c.strength), -1)
            cv2.rectangle(image, (x, y), (x + cell, y + cell), (160, 160, 160), 1)
            colour = (255, 255, 255) if c.strength > 0.6 else black
            count, share = c.texts
            cv2.putText(image, count, (x + cell // 2 - 9 * len(count), y + cell // 2), font, 0.7, colour, 2)
            cv2.putText(image, share, (x + cell // 2 - 5 * len(share), y + cell // 2 + 24), font, 0.45, colour, 1)
        cv2.putText(image, str(i), (margin - 25, margin + i * cell + cell // 2 + 6), font, 0.6, black, 1)
        cv2.putText(image, str(i), (margin + i * cell + cell // 2 - 6, margin - 10), font, 0.6, black, 1)
        total = f"n={sum(c.count for c in row)}"
        cv2.putText(image, total, (size + 8, margin + i * cell + cell // 2 + 6), font, 0.45, grey, 1)
    cv2.putText(image, title, (10, 25), font, 0.6, black, 1)
    cv2.putText(image, "true (rows) vs predicted (columns)", (10, 50), font, 0.5, grey, 1)
    # The colour bar: white at 0 to the darkest blue at the largest count.
    top = max((c.count for row in cells for c in row), default=0)
    bar_y, bar_w = size + 30, n * cell
    for k in range(bar_w):
        cv2.line(image, (margin + k, bar_y), (margin + k, bar_y + 14), _blue(k / max(bar_w - 1, 1)), 1)
    cv2.rectangle(image, (margin, bar_y), (margin + bar_w, bar_y + 14), (160, 160, 160), 1)
    cv2.putText(image, "0", (margin - 4, bar_y + 32), font, 0.45, grey, 1)
    cv2.putText(image, str(top), (margin + bar_w - 9 * len(str(top)), bar_y + 32), font, 0.45, grey, 1)
    legend = "colour: the count, over the whole matrix; %: the count's share of its true grade's row"
    cv2.putText(image, legend, (10, bar_y + 56), font, 0.4, grey, 1)
    write_png(path, image)


def _blue(strength: float) -> tuple[int, int, int]:
    """BGR from white (0) to the darkest blue (1)."""
    shade = int(255 - 200 * strength)
    return 255, shade, shade


def axis_range(values: np.ndarray) -> tuple[float, float]:
    """Bounds for an axis over `values`: their min and max; for a constant series 10% of its value around
    it (0.1 around 0), so a flat line reads as flat, not as rounding noise blown up to fill the panel."""
    low, high = float(values.min()), float(values.max())
    if high - low <= 1e-6 * max(abs(low), abs(high)):
        pad = 0.1 * abs(high) or 0.1
        return low - pad, high + pad
    return low, high


def curves_png(
    path: Path, series: dict[str, list[tuple[float, float]]], x_name: str = "epoch", title: str = ""
) -> None:
    """Each named series of (x, value) pairs in its own panel, stacked under `title`, with its value range
    on the left and the x range (`x_name`) below."""
    width, panel, margin, header = 640, 200, 60, 36 if title else 0
    colours = [(200, 80, 30), (30, 140, 30), (30, 30, 200), (150, 30, 150)]
    image = np.full((header + panel * max(len(series), 1), width, 3), 255, np.uint8)
    grey, black = (80, 80, 80), (0, 0, 0)
    if title:
        cv2.putText(image, title[:64], (10, 24), cv2.FONT_HERSHEY_SIMPLEX, 0.6, black, 1)
    for p, (name, points) in enumerate(series.items()):
        top = header + p * panel
        cv2.rectangle(image, (margin, top + 30), (width - 20, top + panel - 30), (180, 180, 180), 1)
        finite = [(x, y) for x, y in points if y is not None and np.isfinite(y)]
        label = f"{name}" + (f"  last {finite[-1][1]:.4g}" if finite else "  (no values)")
        cv2.putText(image, label, (margin, top + 22), cv2.FONT_HERSHEY_SIMPLEX, 0.55, black, 1)
        if len(finite) < 1:
            continue
        xs, ys = np.array(finite, np.float64).T
        (x0, x1), (y0, y1) = axis_range(xs), axis_range(ys)
        px = margin + (xs - x0) / (x1 - x0) * (width - 20 - margin)
        py = top + panel - 30 - (ys - y0) / (y1 - y0) * (panel - 60)
        pts = np.stack([px, py], 1).round().astype(np.int32)
        cv2.polylines(image, [pts], False, colours[p % len(colours)], 2)
        if len(pts) == 1:
            cv2.circle(image, tuple(int(v) for v in pts[0]), 3, colours[p % len(colours)], -1)
        cv2.putText(image, f"{y1:.3g}", (2, top + 36), cv2.FONT_HERSHEY_SIMPLEX, 0.4, grey, 1)
        cv2.putText(image, f"{y0:.3g}", (2, top + panel - 30), cv2.FONT_HERSHEY_SIMPLEX, 0.4, grey, 1)
        cv2.putText(image, f"{x_name} {x0:.4g}", (margin, top + panel - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, grey, 1)
        right = f"{x1:.4g}"
        cv2.putText(
            image, right, (width - 20 - 8 * len(right), top + panel - 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, grey, 1
        )
    write_png(path, image)


PRETRAINING_CURVES = ("contrastive_loss", "saliency_loss", "lr", "momentum", "pairs_per_s", "view_retrieval")


def run_curves(run_dir: Path) -> tuple[str, dict[str, list[tuple[float, float]]]]:
    """The x axis (step or epoch) and the named series of a pretraining or fine-tuning run folder's
    metrics.jsonl: a pretraining run's losses, lr, momentum, pairs/s and view retrieval; every number a
    fine-tuning run logs per epoch."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: RUN_DIR is the folder of `ssit-dist pretrain` or `finetune`")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # the last line of a killed run can be cut short
            log.warning("%s line %d is not JSON (a killed run's last line?); left out", path, number)
    if not rows:
        raise ValueError(f"{path} has no rows yet")
    x = "step" if "step" in rows[0] else "epoch"
    if "contrastive_loss" in rows[0]:
        names: list[str] = [k for k in PRETRAINING_CURVES if any(k in r for r in rows)]
    else:
        numeric = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
        names = [k for k in rows[0] if k not in (x, "seconds") and any(numeric(r.get(k)) for r in rows)]
    return x, {name: [(r[x], r[name]) for r in rows if name in r] for name in names}


def write_png(path: Path, image: np.ndarray) -> None:
    """A BGR (or grey) uint8 image as a PNG at `path`, written atomically: never seen half-written."""
    ok, encoded = cv2.imencode(".png", image)
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    atomic.write_with(Path(path), lambda tmp: tmp.write_bytes(encoded.tobytes()))


def summary_table(title: str, rows: dict[str, dict]) -> None:
    """Print split -> metrics as a rich table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in ("split", "samples", "accuracy", "QWK", "macro AUC", "recall per grade"):
        table.add_column(column)
    for split, m in rows.items():
        table.add_row(
            split,
            str(m["samples"]),
            number(m["accuracy"]),
            number(m["qwk"]),
            number(m["macro_auc"]),
            " ".join("-" if r is None else f"{r:.2f}" for r in m["per_grade_recall"]),
        )
    Console().print(table)
