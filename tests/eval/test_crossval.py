"""The frozen-feature evaluation instrument: patient-grouped folds, hyper-parameters chosen without the
test fold, probes that find signal and none in noise, patient-bootstrap intervals and paired verdicts,
the features file, and the pretraining-free floors on a real fundus photograph."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch  # noqa: F401  (imported at collection: torch's first import runs ldconfig, a process)
from PIL import Image

from ssit_dist.data.decode import BadImage
from ssit_dist.eval.crossval import (
    NOT_JUDGED,
    Protocol,
    bootstrap_endpoints,
    cross_validate,
    endpoints,
    evaluate_features,
    fold_plans,
    patient_folds,
    patient_ids,
    patient_resamples,
    subsample_patients,
)
from ssit_dist.eval.features_file import load_features, rows_of, save_features
from ssit_dist.eval.floors import colour_histogram, floor_features, floor_features_of_files
from ssit_dist.eval.probes import knn_probe, linear_probe

GRADE_MIX = [0.6, 0.1, 0.15, 0.1, 0.05]


def cohort(patients: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(grades, patient id per photograph): a skewed grade mix, most patients with two eyes of grades
    that differ by at most one, some with a single photograph."""
    rng = np.random.default_rng(seed)
    grades, groups = [], []
    for patient in range(patients):
        grade = int(rng.choice(5, p=GRADE_MIX))
        eyes = [grade] if rng.random() < 0.3 else [grade, int(np.clip(grade + rng.integers(-1, 2), 0, 4))]
        grades += eyes
        groups += [f"p{patient}"] * len(eyes)
    return np.array(grades), np.array(groups)


def separable(grades: np.ndarray, seed: int, dim: int = 16) -> np.ndarray:
    """Features that carry the grade far above their noise."""
    rng = np.random.default_rng(seed)
    return 3.0 * np.eye(dim)[grades] + 0.1 * rng.normal(size=(len(grades), dim))


def noise(rows: int, seed: int, dim: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(rows, dim))


def assert_whole_and_balanced(grades: np.ndarray, groups: Any, folds: np.ndarray, count: int) -> None:
    """No patient in two folds; every fold about a `count`-th of the photographs and of each stratum of
    patients' highest grade (within 2 patients: whole patients cannot split a stratum exactly)."""
    patients = patient_ids(groups, len(grades))
    fold_of: dict[int, int] = {}
    for patient, fold in zip(patients.tolist(), folds.tolist(), strict=True):
        assert fold_of.setdefault(patient, fold) == fold, f"patient {patient} split over folds"
    sizes = np.bincount(folds, minlength=count)
    assert len(sizes) == count and sizes.max() - sizes.min() <= max(4, 0.05 * len(grades)), sizes
    highest = {p: grades[patients == p].max() for p in fold_of}
    for stratum in range(5):
        counts = np.bincount([fold_of[p] for p in highest if highest[p] == stratum], minlength=count)
        assert counts.max() - counts.min() <= 2, f"highest grade {stratum}: patients per fold {counts}"


def test_folds_keep_each_patient_whole_and_balance_the_grades() -> None:
    grades, groups = cohort(400, seed=1)
    folds = patient_folds(grades, groups, folds=5, seed=0)
    assert_whole_and_balanced(grades, groups, folds, 5)
    assert np.array_equal(folds, patient_folds(grades, groups, folds=5, seed=0))
    assert not np.array_equal(folds, patient_folds(grades, groups, folds=5, seed=1))


def test_folds_of_the_real_cohort_keep_both_eyes_together(graded_dir: Path) -> None:
    """graded_natural/ (both eyes of 869 patients, grade 4 in 3 photographs) beside graded/ (one eye each):
    the benchmark's 2,038 photographs, every seed's folds whole and balanced."""
    import csv

    rows = []
    for folder in (graded_dir.parent / "graded_natural", graded_dir):
        with open(folder / "labels.csv") as f:
            rows += [(int(r["grade"]), r.get("patient")) for r in csv.DictReader(f)]
    grades, groups = np.array([g for g, _ in rows]), [p for _, p in rows]
    assert len(set(p for p in groups if p)) == 869
    for seed in range(3):
        assert_whole_and_balanced(grades, groups, patient_folds(grades, groups, folds=5, seed=seed), 5)


def test_a_cohort_too_small_to_stratify_is_still_split_by_patient() -> None:
    """Six patients of five grades in three folds (a 10% training subset's inner folds): no grade fills
    the folds, and the folds are still whole patients, two each."""
    grades, groups = np.array([0, 0, 1, 2, 3, 4, 4, 0]), ["a", "a", "b", "c", "d", "e", "e", "f"]
    folds = patient_folds(grades, groups, folds=3, seed=[1, 2, 3])
    assert_whole_and_balanced(grades, groups, folds, 3)
    assert sorted(len(set(np.array(groups)[folds == f])) for f in range(3)) == [2, 2, 2]


def test_a_photograph_without_a_patient_id_is_its_own_patient() -> None:
    groups = ["a", "a", None, "", float("nan"), "b"]
    ids = patient_ids(groups, len(groups))
    assert ids[0] == ids[1] and len(set(ids.tolist())) == 5
    with pytest.raises(ValueError, match="3 patients cannot fill 5 folds"):
        patient_folds(np.zeros(4, int), ["a", "a", "b", "c"], folds=5)


def test_training_subsets_are_whole_patients_stratified_and_nested() -> None:
    grades, groups = cohort(400, seed=2)
    patients = patient_ids(groups, len(grades))
    small, large = (subsample_patients(grades, patients, f, seed=[3, 1]) for f in (0.1, 0.25))
    assert set(small) < set(large)
    for subset in (small, large):
        for patient in np.unique(patients[subset]):
            assert set(np.flatnonzero(patients == patient)) <= set(subset)
    chosen = np.unique(patients[large])
    assert abs(len(chosen) - 100) <= 1
    highest = np.array([grades[patients == p].max() for p in np.unique(patients)])
    chosen_highest = np.array([grades[patients == p].max() for p in chosen])
    for stratum in range(5):  # proportional allocation: within one patient of a quarter of each stratum
        assert abs((chosen_highest == stratum).sum() - (highest == stratum).sum() / 4) <= 1


@pytest.mark.parametrize("probe", [knn_probe((20, 10, 5)), linear_probe((1.0, 1e-2, 1e-4))], ids=["knn", "probe"])
def test_hyper_parameters_and_predictions_of_a_fold_never_see_its_labels(probe: Any) -> None:
    grades, groups = cohort(150, seed=3)
    patients = patient_ids(groups, len(grades))
    rng = np.random.default_rng(4)
    x = 0.6 * np.eye(16)[grades] + rng.normal(size=(len(grades), 16))  # weak signal: the choice is not obvious
    folds = patient_folds(grades, patients, 5, seed=0)
    before = cross_validate(x, grades, fold_plans(grades, patients, folds), probe)
    relabelled = grades.copy()
    relabelled[folds == 0] = rng.integers(0, 5, (folds == 0).sum())  # the test fold's labels, scrambled
    after = cross_validate(x, relabelled, fold_plans(relabelled, patients, folds), probe)
    assert after.chosen[0] == before.chosen[0]
    np.testing.assert_array_equal(after.probabilities[folds == 0], before.probabilities[folds == 0])
    # The control: those labels do reach the folds that train on them.
    assert not np.array_equal(after.probabilities[folds != 0], before.probabilities[folds != 0])


def test_probes_find_separable_grades() -> None:
    grades, groups = cohort(150, seed=5)
    patients = patient_ids(groups, len(grades))
    folds = patient_folds(grades, patients, 5, seed=0)
    plans = fold_plans(grades, patients, folds)
    for probe in (knn_probe(), linear_probe()):
        run = cross_validate(separable(grades, 6), grades, plans, probe)
        result = endpoints(grades, run.probabilities, folds)
        assert result["qwk"] > 0.98 and result["referable_auc"] > 0.99 and result["accuracy"] > 0.97, (probe, result)


def test_linear_probe_learns_from_training_rows_alone() -> None:
    """The properties the evaluation relies on: a test row's probabilities do not depend on the other test
    rows (the scaling is the training rows'), a refit gives the same numbers, every row's probabilities sum
    to 1, and a grade absent from training gets none."""
    grades, _ = cohort(150, seed=7)
    grades[grades == 3] = 2  # no grade 3 in training
    x = 0.5 * np.eye(16)[grades] + noise(len(grades), 8)
    test = noise(20, 9) + 5.0  # far from the training rows: standardised with the test rows, they would move
    probe = linear_probe((1.0, 1e-2))
    together = probe.predict(x, grades, test, probe.grid, 5)
    alone = probe.predict(x, grades, test[:1], probe.grid, 5)
    for path_together, path_alone in zip(together, alone, strict=True):
        # One row or twenty: the matrix products take different BLAS paths, the last bit may differ.
        np.testing.assert_allclose(path_alone[0], path_together[0], rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(path_together.sum(1), 1.0, rtol=1e-9)
        assert (path_together[:, 3] == 0).all()
    for again, first in zip(probe.predict(x, grades, test, probe.grid, 5), together, strict=True):
        np.testing.assert_array_equal(again, first)


def test_a_training_set_of_one_grade_predicts_that_grade() -> None:
    """A tiny training subset can hold a single grade: both read-outs predict it, with no error or warning."""
    x, test = noise(6, 1), noise(3, 2)
    for probe in (knn_probe((5,)), linear_probe((1.0, 1e-2))):
        for probabilities in probe.predict(x, np.full(6, 2), test, probe.grid, 5):
            np.testing.assert_array_equal(probabilities, np.eye(5)[[2, 2, 2]])


def test_patient_bootstrap_intervals_cover_the_true_accuracy() -> None:
    """Both eyes of a patient are graded right or wrong together (as a real read-out's errors cluster):
    the patient-level intervals must still cover the truth about 95% of the time."""
    truth, covered = 0.7, 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        right = np.repeat(rng.random(100) < truth, 2)
        grades = np.repeat(rng.integers(0, 5, 100), 2)
        predicted = np.where(right, grades, (grades + 1) % 5)
        folds = np.repeat(np.arange(100) % 5, 2)
        draws = patient_resamples(np.repeat(np.arange(100), 2), folds, 150, seed)
        samples = bootstrap_endpoints(grades, np.eye(5)[predicted], folds, draws)["accuracy"]
        low, high = np.percentile(samples, [2.5, 97.5])
        covered += low <= truth <= high
    assert covered >= 17, f"covered the truth in {covered} of 20 cohorts"


def test_bootstrap_resamples_patients_not_photographs() -> None:
    """Each photograph shown twice (a second identical eye) adds no evidence: a patient-level interval
    keeps its width, where a photograph-level one would shrink by 1/sqrt(2)."""
    rng = np.random.default_rng(10)
    grades = rng.integers(0, 5, 300)
    probabilities = np.eye(5)[np.where(rng.random(300) < 0.6, grades, rng.integers(0, 5, 300))]

    def width(copies: int) -> float:
        patients, folds = np.repeat(np.arange(300), copies), np.repeat(np.arange(300) % 5, copies)
        draws = patient_resamples(patients, folds, 400, seed=0)
        samples = bootstrap_endpoints(np.repeat(grades, copies), np.repeat(probabilities, copies, 0), folds, draws)
        low, high = np.percentile(samples["accuracy"], [2.5, 97.5])
        return float(high - low)

    assert width(2) == pytest.approx(width(1), rel=0.1)


@pytest.fixture(scope="module")
def report() -> dict:
    grades, groups = cohort(150, seed=11)
    signal = separable(grades, 12)
    features = {"signal": signal, "copy": signal.copy(), "noise": noise(len(grades), 13)}
    pairs = [("signal", "copy"), ("signal", "noise"), ("noise", "signal")]
    # Shorter grids than the defaults, for time: this report is about the shape, intervals and verdicts.
    protocol = Protocol(resamples=300, fractions=[1.0, 0.25], ks=[20, 5], l2=[1.0, 1e-2])
    return evaluate_features(features, grades, groups, pairs, protocol)


def test_report_is_plain_json_of_every_method_and_read_out(report: dict) -> None:
    def plain(value: Any) -> None:
        assert value is None or type(value) in (dict, list, str, int, float, bool), type(value)
        for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else []:
            plain(item)

    plain(report)
    json.dumps(report, allow_nan=False)
    assert set(report["methods"]) == {"signal", "copy", "noise"}
    assert set(report["methods"]["signal"]) == {"knn", "probe", "knn_25pct", "probe_25pct"}
    entry = report["methods"]["signal"]["probe"]
    assert set(entry) == {"qwk", "referable_auc", "accuracy", "chosen"} and len(entry["chosen"]["l2"]) == 5
    assert all(isinstance(k, int) for k in report["methods"]["signal"]["knn"]["chosen"]["k"])
    low, high = entry["qwk"]["ci95"]
    assert low <= entry["qwk"]["value"] <= high
    assert report["protocol"]["samples"] == sum(report["protocol"]["fold_sizes"])


def test_noise_sits_near_chance(report: dict) -> None:
    """Within 0.15 of chance, not within the interval: the intervals hold the trained read-outs fixed and
    miss the training folds' variation (crossval.py's docstring), and noise's cross-validated AUC on these
    262 photographs scatters over draws of noise and folds by about 0.04 (0.39-0.53 over 18 draws)."""
    for variant in ("knn", "probe"):
        result = report["methods"]["noise"][variant]
        assert abs(result["qwk"]["value"]) <= 0.15, (variant, result)
        assert abs(result["referable_auc"]["value"] - 0.5) <= 0.15, (variant, result)


def test_identical_methods_differ_by_exactly_zero_unresolved(report: dict) -> None:
    for variant in report["differences"]["signal - copy"].values():
        for endpoint, difference in variant.items():
            verdict = "not resolved at this scale" if endpoint != "accuracy" else NOT_JUDGED
            assert difference == {"value": 0.0, "ci95": [0.0, 0.0], "half_width": 0.0, "verdict": verdict}


def test_a_clearly_better_method_beats_the_other_whichever_way_round(report: dict) -> None:
    forward, backward = report["differences"]["signal - noise"], report["differences"]["noise - signal"]
    for variant in ("knn", "probe", "probe_25pct"):
        for endpoint in ("qwk", "referable_auc"):
            assert forward[variant][endpoint]["verdict"] == "signal beats noise"
            assert backward[variant][endpoint]["verdict"] == "signal beats noise"
            assert forward[variant][endpoint]["value"] == -backward[variant][endpoint]["value"] > 0
            assert forward[variant][endpoint]["half_width"] > 0
        assert forward[variant]["accuracy"]["verdict"] == NOT_JUDGED


def test_protocol_and_inputs_are_checked() -> None:
    for wrong in ({"fractions": [0.0]}, {"fractions": [0.5, 0.5]}, {"folds": 1}, {"select_by": "auc"}):
        with pytest.raises(ValueError, match=next(iter(wrong))):
            Protocol(**wrong)
    with pytest.raises(ValueError, match="features of 'a' are \\(3, 2\\): expected \\(4, dim\\)"):
        evaluate_features({"a": np.zeros((3, 2))}, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="pair .* must name two of the methods"):
        evaluate_features({"a": np.zeros((4, 2))}, [0, 1, 2, 3], pairs=[("a", "b")])


def test_features_file_round_trips_without_pickle(tmp_path: Path) -> None:
    keys = ["0/a.jpeg", "1/b.jpeg", "2/ü.png"]
    features = {"ssit": np.arange(12, dtype=np.float32).reshape(3, 4), "moco_v3": np.ones((3, 2))}
    path = save_features(tmp_path / "features.npz", keys, features)
    loaded_keys, loaded = load_features(path)
    assert loaded_keys == keys and set(loaded) == set(features)
    for name, x in features.items():
        assert loaded[name].dtype == x.dtype
        np.testing.assert_array_equal(loaded[name], x)
    np.testing.assert_array_equal(rows_of(loaded_keys, ["2/ü.png", "0/a.jpeg"]), [2, 0])
    with pytest.raises(ValueError, match=r"lacks 1 of the labelled photographs, e.g. \['3/c.jpeg'\]"):
        rows_of(loaded_keys, ["3/c.jpeg", "0/a.jpeg"])
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="broken.npz: cannot read"):
        load_features(tmp_path / "broken.npz")


def test_floors_of_a_real_fundus_photograph(retina: Image.Image, tmp_path: Path) -> None:
    buffer = io.BytesIO()
    retina.save(buffer, format="PNG")
    features = floor_features(buffer.getvalue())
    histogram, thumbnail = features["colour_histogram"], features["thumbnail"]
    assert histogram.shape == (24,) and thumbnail.shape == (16 * 16 * 3,)
    assert np.isfinite(histogram).all() and np.isfinite(thumbnail).all()
    np.testing.assert_allclose(histogram.reshape(3, 8).sum(1), 1.0, rtol=1e-6)
    assert 0 <= thumbnail.min() and thumbnail.max() <= 1 and thumbnail.std() > 0.05
    # A red-dominated fundus: red's mass sits in brighter bins than blue's.
    assert histogram[:8] @ np.arange(8) > histogram[16:] @ np.arange(8)
    # The corners outside the circle do not count: a black square border changes nothing.
    disc = np.asarray(retina.resize((128, 128)))
    bordered = disc.copy()
    bordered[:8, :8] = 0
    np.testing.assert_array_equal(colour_histogram(bordered), colour_histogram(disc))
    (tmp_path / "retina.png").write_bytes(buffer.getvalue())
    (tmp_path / "empty.jpeg").write_bytes(b"")
    stacked = floor_features_of_files([tmp_path / "retina.png"] * 2)
    assert stacked["colour_histogram"].shape == (2, 24) and stacked["thumbnail"].shape == (2, 768)
    with pytest.raises(BadImage, match="empty.jpeg: empty file"):
        floor_features_of_files([tmp_path / "retina.png", tmp_path / "empty.jpeg"])
