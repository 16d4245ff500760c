"""The files a DR-grading run leaves for its reader: report.json, predictions.csv (the shown split's
predictions of the best weights), confusion.png, curves.png, and the summary tables on the console."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ssit_dist import atomic
from ssit_dist.data.loading.labelled import LabelledShards
from ssit_dist.eval import report


def write_grading_report(
    out: Path,
    result: dict[str, Any],
    split: str,
    shown: dict[str, Any],
    dataset: LabelledShards,
    history: list[dict[str, Any]],
    headline: str,
) -> None:
    """`result`: the run's report (metrics per split, "final", "best_epoch"); `shown`: the evaluation of
    the best weights on `split` (eval/over_split.py), whose samples `dataset` holds; `history`: the per-epoch
    rows of metrics.jsonl."""
    keys = [dataset.keys[i] for i in shown["indices"]]
    report.write_predictions(out / "predictions.csv", keys, shown["truth"], shown["predicted"], shown["scores"])
    matrix = np.array(shown["metrics"]["confusion_matrix"])
    name = out.resolve().name
    report.confusion_png(out / "confusion.png", matrix, f"{name}: {split} split, best epoch {result['best_epoch']}")
    report.curves_png(
        out / "curves.png",
        {
            "train loss": [(r["epoch"], r["train_loss"]) for r in history],
            "val qwk": [(r["epoch"], r["val_qwk"]) for r in history],
            "val accuracy": [(r["epoch"], r["val_accuracy"]) for r in history],
        },
        title=f"fine-tuning {name}",
    )
    atomic.write_json(out / "report.json", result)
    report.summary_table(headline, {name: result[name] for name in ("val", "test") if name in result})
    report.summary_table(f"final weights (epoch {history[-1]['epoch']})", result["final"])
