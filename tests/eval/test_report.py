"""Pictures of ssit_dist.eval.report: the confusion matrix; training curves (axis ranges, run folders,
`ssit-dist plot`)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import invoke_cli
from ssit_dist.eval.report import axis_range, confusion_cells, confusion_png, run_curves


def test_the_confusion_matrix_colours_by_count_and_writes_row_percentages(tmp_path: Path) -> None:
    # A 2 alone in its row and a 59 in a full row: per-row colours made both the darkest; by count, the 59
    # is darker, and every cell's colour orders as its count does, whichever rows they sit in.
    confusion = np.array([[59, 3, 0, 0, 0], [2, 0, 0, 0, 0], [10, 20, 30, 5, 0], [0, 0, 0, 0, 0], [1, 0, 2, 3, 12]])
    cells = confusion_cells(confusion)
    flat = [c for row in cells for c in row]
    assert [c.count for c in flat] == confusion.ravel().tolist()
    by_count = sorted(flat, key=lambda c: c.count)
    assert [c.strength for c in by_count] == sorted(c.strength for c in flat)
    assert cells[1][0].strength < cells[2][2].strength < cells[0][0].strength == 1.0
    assert cells[3][0].strength == 0.0
    # Each cell says its count and its share of the true grade's row; an empty row has no shares.
    assert cells[0][0].texts == ("59", "95%") and cells[1][0].texts == ("2", "100%")
    assert cells[2][3].texts == ("5", "8%") and cells[4][4].texts == ("12", "67%")
    assert all(c.texts == ("0", "-") for c in cells[3])

    path = tmp_path / "confusion.png"
    confusion_png(path, confusion, "test split")
    image = cv2.imread(str(path))
    assert image is not None and image.shape[0] > 5 * 80 and image.shape[1] > 5 * 80


@pytest.mark.parametrize(
    "values, expected",
    [
        ([0.0, 0.0, 0.0], (-0.1, 0.1)),  # a constant QWK of 0: a readable range, not 0..1e-9
        ([0.2, 0.2], (0.18, 0.22)),
        ([1e-3, 1e-3], (9e-4, 1.1e-3)),  # a constant lr keeps its own scale
        ([2.0, 0.5, 1.0], (0.5, 2.0)),  # anything that moves spans exactly its values
    ],
)
def test_axis_ranges(values: list[float], expected: tuple[float, float]) -> None:
    assert axis_range(np.array(values)) == pytest.approx(expected)


def write_rows(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir()
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "contr')
    return folder


def test_a_pretraining_run_gives_its_curves_over_steps(tmp_path: Path) -> None:
    rows = [
        {
            "step": s,
            "epoch": s / 4,
            "contrastive_loss": 2.2 - 0.1 * s,
            "saliency_loss": 1.0,
            "lr": 1e-4,
            "momentum": 0.99,
            "saliency_weight": 10.0,
            "pairs_per_s": 50.0,
            "step_s": 0.1,
            "data_wait_s": 0.0,
            "peak_mem_mb": 900.0,
        }
        for s in range(1, 5)
    ]
    rows[1]["view_retrieval"] = rows[3]["view_retrieval"] = 0.25
    x, series = run_curves(write_rows(tmp_path / "run", rows))  # the cut last line is left out
    assert x == "step"
    assert list(series) == ["contrastive_loss", "saliency_loss", "lr", "momentum", "pairs_per_s", "view_retrieval"]
    assert series["view_retrieval"] == [(2, 0.25), (4, 0.25)] and len(series["contrastive_loss"]) == 4


def test_plot_writes_one_panel_per_curve_of_a_finetuning_run(tmp_path: Path) -> None:
    rows = [
        {
            "epoch": e,
            "train_loss": 1.5 - 0.1 * e,
            "lr": 1e-3,
            "val_accuracy": 0.2,
            "val_qwk": None if e == 1 else 0.0,
            "val_macro_auc": 0.5,
            "seconds": 3.0,
        }
        for e in range(1, 4)
    ]
    run = write_rows(tmp_path / "finetune", rows)
    x, series = run_curves(run)
    assert x == "epoch" and list(series) == ["train_loss", "lr", "val_accuracy", "val_qwk", "val_macro_auc"]
    out = tmp_path / "curves.png"
    shown = invoke_cli("plot", run, "-o", out).stdout
    assert "5 curves over epochs" in shown
    image = cv2.imread(str(out))
    assert image.shape == (36 + 5 * 200, 640, 3)  # a title naming the run, then a panel per curve
    assert (image[:36] < 100).any() and (image[:36, 300:] > 250).all()  # title text on the left only
    # The constant QWK is drawn mid-panel (range -0.1..0.1), not along an edge.
    qwk_panel = image[36 + 3 * 200 + 30 : 36 + 4 * 200 - 30, 100:500]
    drawn_rows = np.nonzero((np.abs(qwk_panel.astype(int) - (150, 30, 150)).sum(axis=2) < 60).any(axis=1))[0]
    assert len(drawn_rows) and abs(drawn_rows.mean() - qwk_panel.shape[0] / 2) < 5
    assert invoke_cli("plot", tmp_path / "nowhere", check=False).exit_code == 2
