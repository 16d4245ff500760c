"""Grading metrics: accuracy, quadratic weighted kappa, confusion matrix, per-grade recall, macro AUC.

Grades are integers 0..num_classes-1. Kappa weights use the grade values (not the grades that happen to
occur), as DR grading papers report it; that equals scikit-learn's `cohen_kappa_score(weights=
"quadratic", labels=range(num_classes))`. Undefined values (kappa with a single grade everywhere, AUC
of a grade with no positives or no negatives) are NaN, never a made-up number.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(num_classes, num_classes) counts: rows are true grades, columns predicted ones."""
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    for name, y in (("true", y_true), ("predicted", y_pred)):
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(
                f"{name} grade {int(y.max() if y.max() >= num_classes else y.min())} is outside 0..{num_classes - 1}"
            )
    return np.bincount(y_true * num_classes + y_pred, minlength=num_classes**2).reshape(num_classes, num_classes)


# QWK and AUC are computed here, not by scikit-learn's cohen_kappa_score / roc_auc_score (which they equal,
# tests/eval/test_metrics.py): the patient bootstrap of eval/crossval.py calls each 90,000 times per `ssit-dist
# evaluate`, and scikit-learn's input checks make a call 3-4 ms against 40-70 us here, 640 s against 10 s in
# all (bench/perf/eval_metrics.py, bench/results/eval_metrics_cpu_epyc_2026-12-07.json).
def quadratic_weighted_kappa(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> float:
    observed = confusion_matrix(y_true, y_pred, num_classes).astype(np.float64)
    grades = np.arange(num_classes)
    weights = (grades[:, None] - grades[None, :]) ** 2.0
    expected = np.outer(observed.sum(1), observed.sum(0)) / max(observed.sum(), 1)
    denominator = (weights * expected).sum()
    if denominator == 0:
        return float("nan")
    return float(1 - (weights * observed).sum() / denominator)


def per_class_recall(confusion: np.ndarray) -> list[float]:
    """Recall of each true grade (NaN for a grade absent from the split)."""
    support = confusion.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.diag(confusion) / support).tolist()


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve by the rank statistic (ties count one half)."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="stable")
    sorted_scores = np.asarray(score, np.float64)[order]
    ranks = np.empty(len(score), np.float64)
    # Average ranks over ties, 1-based.
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def macro_auc(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Mean one-vs-rest AUC over the grades that have both positives and negatives in the split."""
    y_true = np.asarray(y_true)
    aucs = [binary_auc(y_true == c, scores[:, c]) for c in range(scores.shape[1])]
    defined = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(defined)) if defined else float("nan")


def grading_metrics(y_true: np.ndarray, y_pred: np.ndarray, scores: np.ndarray, num_classes: int) -> dict:
    """Everything a report shows, as plain JSON-ready values (NaN as None)."""
    confusion = confusion_matrix(y_true, y_pred, num_classes)
    values = {
        "samples": int(len(y_true)),
        "accuracy": float(np.mean(np.asarray(y_true) == np.asarray(y_pred))) if len(y_true) else float("nan"),
        "qwk": quadratic_weighted_kappa(y_true, y_pred, num_classes),
        "macro_auc": macro_auc(y_true, scores),
        "per_grade_recall": per_class_recall(confusion),
        "confusion_matrix": confusion.tolist(),
    }
    return _nan_to_none(values)


def _nan_to_none(value: Any) -> Any:
    if isinstance(value, float) and np.isnan(value):
        return None
    if isinstance(value, list):
        return [_nan_to_none(v) for v in value]
    if isinstance(value, dict):
        return {k: _nan_to_none(v) for k, v in value.items()}
    return value
