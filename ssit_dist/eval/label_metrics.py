"""Graded photographs scored against a public labels file: the cross-dataset evaluation of `ssit-dist predict
--labels`.

Rows find their photographs exactly as when packing (data/packing/inputs.py `read_labels`: path, file
name, name without extension; any format the packer reads). Rows that name no photograph are ignored and
counted; photographs no usable row names are graded but not scored, and counted; rows the dataset marks
ungradable are left out, as the packer leaves them out. Endpoints: QWK and accuracy of the predicted
grade, referable-DR (grade >= 2) AUC of the referable score, sensitivity and specificity of the referable
flag, each with a patient-bootstrap 95% interval (eval/crossval.py): both eyes of a patient are not
independent evidence. Patients come from the labels file's `patient` column where it has one (EyePACS's
names give it), else from EyePACS-style photograph names (`10_left`), else each photograph is its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ssit_dist.data.packing.inputs import read_labels
from ssit_dist.data.packing.label_formats import FORMATS, LabelFormatError, read_label_file
from ssit_dist.eval.crossval import REFERABLE_GRADE, interval, patient_ids, patient_resamples
from ssit_dist.eval.metrics import binary_auc, confusion_matrix, quadratic_weighted_kappa

RESAMPLES = 1000
LISTED = 10  # bad rows metrics.json lists before it counts the rest
EYEPACS_NAME = re.compile(str(FORMATS["eyepacs"].patient))  # `10_left` -> patient 10


class LabelsError(ValueError):
    """A labels file that cannot score these photographs; the message names it and what to do."""


@dataclass
class PhotographLabels:
    """The true grade and patient of each photograph a labels file grades, by its index, and what the file
    could not say."""

    file: str
    format: str
    grades: dict[int, int] = field(default_factory=dict)
    patients: dict[int, str | None] = field(default_factory=dict)
    unmatched_rows: int = 0  # rows naming no photograph among the inputs: ignored
    unlabelled: int = 0  # photographs no usable row names: graded, not scored
    ungradable: int = 0  # photographs a row marks ungradable: graded, not scored
    problems: list[str] = field(default_factory=list)  # bad rows, `file:line: reason`


def match_labels(path: Path, photographs: list[str], labels_format: str = "auto") -> PhotographLabels:
    """The grades and patients `path` gives `photographs` (paths as find_photographs lists them)."""
    try:
        first = read_label_file(path, labels_format)
    except LabelFormatError as e:
        raise LabelsError(str(e)) from None
    has_patient = bool(first.rows) and "patient" in first.rows[0].columns
    read = read_labels([path], Path("."), "patient" if has_patient else None, first.format.name, photographs)
    index = {name: i for i, name in enumerate(photographs)}
    found = PhotographLabels(str(path), first.format.name, unmatched_rows=len(read.missing))
    found.grades = {index[name]: grade for name, grade in read.grades.items()}
    found.patients = {i: read.groups.get(photographs[i]) or _patient_from_name(photographs[i]) for i in found.grades}
    found.ungradable = len(read.ungradable)
    found.unlabelled = len(photographs) - len(found.grades) - found.ungradable
    found.problems = [str(p) for p in read.problems]
    if not found.grades:
        raise LabelsError(_why_nothing_matched(path, read.missing, found.problems, photographs))
    return found


def _patient_from_name(name: str) -> str | None:
    match = EYEPACS_NAME.match(Path(name).stem)
    return match.group(1) if match else None


def _why_nothing_matched(path: Path, missing: list[Any], problems: list[str], photographs: list[str]) -> str:
    if problems:
        return (
            f"{path}: no row gives a usable grade to any of the {len(photographs)} photographs (first: {problems[0]})"
        )
    named = f" (its first row names {missing[0].image}, the first photograph is {photographs[0]})" if missing else ""
    return (
        f"{path} matches none of the {len(photographs)} photographs{named}: rows find a photograph by path, file "
        "name or name without extension; give the labels file of these photographs"
    )


def referable_scores(objective: str, outputs: np.ndarray, per_grade: np.ndarray) -> np.ndarray:
    """What ranks photographs by referable DR: a regression grader's output (the grade scale), a classifier's
    probability of grade >= 2 (`per_grade`: Grader.grades_and_scores' scores)."""
    if objective == "regression":
        return np.asarray(outputs, np.float64)[:, 0]
    return np.asarray(per_grade, np.float64)[:, REFERABLE_GRADE:].sum(axis=1)


def endpoint_intervals(
    truth: np.ndarray,
    grades: np.ndarray,
    referable_score: np.ndarray,
    patients: np.ndarray,
    classes: int,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Each endpoint of `referable_endpoints` (the referable flag: grade >= 2) with its 95% interval over
    `resamples` bootstrap resamples of `patients` (crossval.patient_ids), every photograph of a patient
    drawn together."""
    flags = grades >= REFERABLE_GRADE
    draws = patient_resamples(patients, np.zeros(len(truth), np.int64), resamples, seed) if len(truth) else []
    value = referable_endpoints(truth, grades, referable_score, flags, classes)
    samples = [referable_endpoints(truth[d], grades[d], referable_score[d], flags[d], classes) for d in draws]
    return {name: interval(v, np.array([s[name] for s in samples])) for name, v in value.items()}


def referable_endpoints(
    truth: np.ndarray, predicted: np.ndarray, referable_score: np.ndarray, referable: np.ndarray, classes: int
) -> dict[str, float]:
    """QWK and accuracy of the grades, the referable score's AUC and the referable flag's sensitivity and
    specificity (NaN where undefined: a sample without referable, or without non-referable, photographs)."""
    positive = truth >= REFERABLE_GRADE
    with np.errstate(invalid="ignore"):
        return {
            "qwk": quadratic_weighted_kappa(truth, predicted, classes),
            "accuracy": float(np.mean(truth == predicted)) if len(truth) else float("nan"),
            "referable_auc": binary_auc(positive, referable_score),
            "sensitivity": float(np.mean(referable[positive])) if positive.any() else float("nan"),
            "specificity": float(np.mean(~referable[~positive])) if (~positive).any() else float("nan"),
        }


def score_predictions(
    labels: PhotographLabels,
    predicted: dict[int, tuple[int, float]],
    classes: int,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> dict[str, Any]:
    """metrics.json: each endpoint with its patient-bootstrap 95% interval, the confusion matrix and the
    counts. `predicted`: index -> (grade, referable score) of each photograph graded."""
    scored = sorted(i for i in labels.grades if i in predicted)
    truth = np.array([labels.grades[i] for i in scored], np.int64)
    grades = np.array([predicted[i][0] for i in scored], np.int64)
    scores = np.array([predicted[i][1] for i in scored], np.float64)
    patients = patient_ids([labels.patients[i] for i in scored], len(scored))
    return {
        **endpoint_intervals(truth, grades, scores, patients, classes, resamples, seed),
        "samples": len(scored),
        "patients": len(np.unique(patients)),
        "unmatched_rows": labels.unmatched_rows,
        "unlabelled_photographs": labels.unlabelled,
        "ungradable_photographs": labels.ungradable,
        "unreadable_photographs": len(labels.grades) - len(scored),
        "label_problems": labels.problems[:LISTED]
        + ([f"... and {len(labels.problems) - LISTED} more"] if len(labels.problems) > LISTED else []),
        "confusion_matrix": confusion_matrix(truth, grades, classes).tolist(),
        "referable_grade": REFERABLE_GRADE,
        "bootstrap": {"resamples": resamples, "seed": seed, "unit": "patient"},
        "labels": {"file": labels.file, "format": labels.format},
    }
