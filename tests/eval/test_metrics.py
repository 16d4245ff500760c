"""Grading metrics against scikit-learn, on random data and on the edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import cohen_kappa_score, roc_auc_score
from sklearn.metrics import confusion_matrix as sk_confusion

from ssit_dist.eval.metrics import confusion_matrix, grading_metrics, macro_auc, quadratic_weighted_kappa


def sk_qwk(a: np.ndarray, b: np.ndarray) -> float:
    return cohen_kappa_score(a, b, weights="quadratic", labels=list(range(5)))


@pytest.mark.parametrize("seed", range(20))
def test_qwk_equals_scikit_learn_on_random_grades(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 300))
    a = rng.integers(0, 5, n)
    b = np.clip(a + rng.integers(-2, 3, n), 0, 4) if seed % 2 else rng.integers(0, 5, n)
    assert quadratic_weighted_kappa(a, b, 5) == pytest.approx(sk_qwk(a, b), abs=1e-12)


@pytest.mark.filterwarnings("ignore::UserWarning")  # scikit-learn warns about the undefined cases
@pytest.mark.parametrize(
    "a, b",
    [
        ([2, 2, 2, 2], [2, 2, 2, 2]),  # one grade only, perfect: undefined (0 / 0)
        ([0, 0, 0], [4, 4, 4]),  # one grade each side
        ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4]),  # perfect agreement: 1
        ([0, 0, 4, 4], [4, 4, 0, 0]),  # total disagreement: -1
        ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0]),
        ([1, 1, 3], [1, 3, 3]),
    ],
)
def test_qwk_equals_scikit_learn_on_edge_cases(a: list[int], b: list[int]) -> None:
    ours, theirs = quadratic_weighted_kappa(np.array(a), np.array(b), 5), sk_qwk(np.array(a), np.array(b))
    assert (math.isnan(ours) and math.isnan(theirs)) or ours == pytest.approx(theirs, abs=1e-12)


def test_confusion_and_auc_equal_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 5, 200)
    scores = rng.random((200, 5)) + np.eye(5)[y] * 0.3
    scores[:20, 2] = 0.5  # ties
    scores /= scores.sum(1, keepdims=True)  # scikit-learn wants probabilities
    pred = scores.argmax(1)
    np.testing.assert_array_equal(confusion_matrix(y, pred, 5), sk_confusion(y, pred, labels=range(5)))
    assert macro_auc(y, scores) == pytest.approx(
        roc_auc_score(y, scores, multi_class="ovr", average="macro"), abs=1e-12
    )


def test_grades_missing_from_a_split_are_undefined_not_invented() -> None:
    y = np.array([0, 0, 1, 1])
    scores = np.eye(5)[[0, 1, 1, 1]].astype(float)
    m = grading_metrics(y, scores.argmax(1), scores, 5)
    assert m["per_grade_recall"][:2] == [0.5, 1.0] and m["per_grade_recall"][2:] == [None, None, None]
    assert m["macro_auc"] == pytest.approx(roc_auc_score(y == 1, scores[:, 1]))  # mean over grades 0 and 1
    assert m["accuracy"] == 0.75 and m["samples"] == 4
    with pytest.raises(ValueError, match="grade 7 is outside 0..4"):
        confusion_matrix(np.array([7]), np.array([0]), 5)
