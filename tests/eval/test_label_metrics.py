"""Scoring predictions against labels files as public sets ship them: rows matched as the packer matches
them, patients from the file or the names, and the patient-bootstrap intervals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ssit_dist.eval.label_metrics import LabelsError, PhotographLabels, match_labels, score_predictions
from ssit_dist.eval.metrics import quadratic_weighted_kappa

# Both eyes of three EyePACS patients of graded_natural: (name, grade).
EYES = [
    ("10014_left", 0),
    ("10014_right", 0),
    ("10242_left", 2),
    ("10242_right", 0),
    ("10297_left", 2),
    ("10297_right", 1),
]


@pytest.fixture(scope="module")
def eyes(graded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    natural = graded_dir.parent / "graded_natural"
    if not (natural / "labels.csv").is_file():
        pytest.skip(f"{natural} (real photographs of both eyes) is absent here")
    folder = tmp_path_factory.mktemp("eyes") / "photos"
    folder.mkdir()
    for name, _ in EYES:
        (folder / f"{name}.jpeg").symlink_to(natural / f"{name}.jpeg")
    return sorted(p.as_posix() for p in folder.iterdir())


def test_rows_find_photographs_as_the_packer_finds_them(eyes: list[str], tmp_path: Path) -> None:
    eyepacs = tmp_path / "trainLabels.csv"  # names without extension; patients from the names
    eyepacs.write_text("image,level\n" + "".join(f"{n},{g}\n" for n, g in EYES) + "777_left,4\n778_left,0\n")
    found = match_labels(eyepacs, eyes)
    assert found.format == "eyepacs" and found.unmatched_rows == 2 and found.unlabelled == 0
    assert [found.grades[i] for i in range(len(eyes))] == [g for _, g in sorted(EYES)]
    assert sorted(set(found.patients.values())) == ["10014", "10242", "10297"]
    plain = tmp_path / "labels.csv"  # this project's CSV with file names and a patient column of its own
    plain.write_text(
        "image,grade,patient\n"
        + "".join(f"{n}.jpeg,{g},p{n[:5]}\n" for n, g in EYES[:4])
        + "10297_left.jpeg,9,p10297\n"
    )
    found = match_labels(plain, eyes)
    assert found.format == "plain" and found.unlabelled == 2 and found.unmatched_rows == 0
    assert found.problems == ["labels.csv:6: grade 9 of " + eyes[4] + " is outside 0-4"]  # refused, as when packing
    assert set(found.patients.values()) == {"p10014", "p10242"}
    aptos = tmp_path / "train.csv"  # APTOS's columns, no patient column: EyePACS-style names still give them
    aptos.write_text("id_code,diagnosis\n" + "".join(f"{n},{g}\n" for n, g in EYES[4:]))
    assert set(match_labels(aptos, eyes).patients.values()) == {"10297"}


def test_a_labels_file_that_grades_no_photograph_is_one_line_error(eyes: list[str], tmp_path: Path) -> None:
    other = tmp_path / "trainLabels.csv"
    other.write_text("image,level\n1_left,0\n1_right,2\n")
    with pytest.raises(LabelsError, match="matches none of the 6 photographs") as error:
        match_labels(other, eyes)
    assert "1_left" in str(error.value) and str(other) in str(error.value) and "\n" not in str(error.value)
    unknown = tmp_path / "grades.csv"
    unknown.write_text("file,dr\na,1\n")
    with pytest.raises(LabelsError, match="header of no labels format"):
        match_labels(unknown, eyes)


def test_patient_bootstrap_intervals_around_the_endpoints() -> None:
    """Twelve patients, both eyes each; the intervals resample patients and contain the value."""
    rng = np.random.default_rng(0)
    truth = rng.integers(0, 5, 24)
    grades = np.where(rng.random(24) < 0.7, truth, rng.integers(0, 5, 24))
    labels = PhotographLabels("x.csv", "plain", dict(enumerate(truth.tolist())), {i: str(i // 2) for i in range(24)})
    predicted = {i: (int(g), float(g) + rng.normal(0, 0.3)) for i, g in enumerate(grades)}
    predicted.pop(5)  # a photograph that could not be read: labelled, not scored
    metrics = score_predictions(labels, predicted, 5, resamples=200)
    kept = [i for i in range(24) if i != 5]
    assert metrics["samples"] == 23 and metrics["patients"] == 12 and metrics["unreadable_photographs"] == 1
    assert metrics["qwk"]["value"] == pytest.approx(quadratic_weighted_kappa(truth[kept], grades[kept], 5), abs=1e-4)
    positive = truth[kept] >= 2
    assert metrics["sensitivity"]["value"] == pytest.approx(np.mean(grades[kept][positive] >= 2), abs=1e-4)
    assert metrics["specificity"]["value"] == pytest.approx(np.mean(grades[kept][~positive] < 2), abs=1e-4)
    for name in ("qwk", "accuracy", "referable_auc", "sensitivity", "specificity"):
        low, high = metrics[name]["ci95"]
        assert low <= metrics[name]["value"] <= high
    assert metrics["qwk"]["ci95"][0] < metrics["qwk"]["ci95"][1]
    assert np.array(metrics["confusion_matrix"]).sum() == 23
