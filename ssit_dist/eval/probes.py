"""The two read-outs of frozen features that crossval.py compares: weighted kNN and a linear probe.

Both map (training features, training grades, test features, candidate hyper-parameters) to the test
rows' per-grade probabilities under each candidate, so that cross-validation, hyper-parameter selection
and the endpoints treat them alike:

- kNN: `knn_grades` of knn.py (cosine similarity, votes exp(similarity / 0.07)) on the raw features, as
  `ssit-dist knn` grades; the hyper-parameter is k. Its "probabilities" are the normalised votes.
- linear probe: scikit-learn's multinomial LogisticRegression (L-BFGS) on features standardised with the
  training rows' mean and standard deviation (StandardScaler fitted on them, never on the test rows), the
  L2 penalty on the weights (not the biases) being the hyper-parameter. The grid is fitted as a path from
  the strongest penalty to the weakest, each fit starting from the last (warm start): a convex problem
  started from fixed points, so no seed enters and a refit gives the same numbers.

torch and scikit-learn are imported where a probe runs: importing this module (for its grids) stays cheap.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

# (train features, train grades, test features, candidate values, number of grades) -> for each candidate,
# the test rows' (rows, grades) probabilities. One call covers a whole grid so that the probe can fit it as
# a regularisation path, each fit starting from the previous solution.
PredictPath = Callable[[np.ndarray, np.ndarray, np.ndarray, tuple[float, ...], int], list[np.ndarray]]

KNN_TEMPERATURE = 0.07
# Grids are listed from the most regularised candidate to the least: a tie in the selection goes to the
# first, the simpler read-out (more neighbours, a stronger penalty), and the probe's path starts near zero.
DEFAULT_KS: tuple[int, ...] = (50, 20, 10, 5)
# The penalty multiplies half the squared weights, added to the *mean* cross-entropy: 1e-4 is nearly free,
# 1 shrinks standardised 384-d features hard (scikit-learn's C is 1 / (l2 * training rows)).
DEFAULT_L2: tuple[float, ...] = (1.0, 1e-1, 1e-2, 1e-3, 1e-4)
MAX_ITER = 1000  # L-BFGS iterations per fit; a warm-started path converges far sooner


@dataclass(frozen=True)
class Probe:
    """A read-out: its name in the results, the name and grid of its hyper-parameter, and the fit."""

    name: str
    hyper: str
    grid: tuple[float, ...]
    predict: PredictPath

    def usable_grid(self, train_rows: int) -> tuple[float, ...]:
        """The candidates that can be fitted on `train_rows` rows: kNN cannot ask for more neighbours
        than there are; with none left (a tiny subset), the largest k that fits."""
        if self.hyper != "k":
            return self.grid
        fitting = tuple(k for k in self.grid if k <= train_rows)
        return fitting or (float(train_rows),)


def knn_probe(ks: tuple[int, ...] = DEFAULT_KS, temperature: float = KNN_TEMPERATURE) -> Probe:
    """Weighted kNN over the candidate neighbour counts `ks`."""

    def predict(
        train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, ks: tuple[float, ...], classes: int
    ) -> list[np.ndarray]:
        import torch

        from ssit_dist.eval.knn import knn_grades

        bank = torch.from_numpy(np.ascontiguousarray(train_x, np.float32))
        grades = torch.from_numpy(np.asarray(train_y, np.int64))
        queries = torch.from_numpy(np.ascontiguousarray(test_x, np.float32))
        with one_thread():
            return [knn_grades(bank, grades, queries, int(k), classes, temperature)[1].numpy() for k in ks]

    return Probe("knn", "k", tuple(float(k) for k in ks), predict)


def linear_probe(l2_grid: tuple[float, ...] = DEFAULT_L2) -> Probe:
    """Multinomial logistic regression on standardised features over the candidate penalties `l2_grid`."""

    def predict(
        train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, penalties: tuple[float, ...], classes: int
    ) -> list[np.ndarray]:
        from sklearn.linear_model import LogisticRegression
        from sklearn.preprocessing import StandardScaler

        train_y = np.asarray(train_y, np.int64)
        present = np.unique(train_y)
        probabilities = np.zeros((len(test_x), classes))
        if len(present) == 1:  # one grade among the training rows: nothing to fit, that grade it is
            probabilities[:, present[0]] = 1.0
            return [probabilities] * len(penalties)
        scaler = StandardScaler().fit(train_x)
        train_z, test_z = scaler.transform(train_x), scaler.transform(test_x)
        model = LogisticRegression(warm_start=True, max_iter=MAX_ITER)
        path = []
        with one_thread():
            for l2 in penalties:
                model.set_params(C=1 / (l2 * len(train_z))).fit(train_z, train_y)
                # A grade absent from the training rows has no column: probability 0.
                probabilities[:, present] = model.predict_proba(test_z)
                path.append(probabilities.copy())
        return path

    return Probe("probe", "l2", tuple(float(v) for v in l2_grid), predict)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch and the BLAS under scikit-learn on one thread for the duration: a probe's products (a few
    thousand rows by 5 columns, or by a few thousand neighbours) are too small for threads to pay, and where
    the cores are shared (tests or other runs beside it) threads spinning for each other slow the fits down
    many times over. One thread also makes the results the same on any machine: no reduction order depends
    on the cores."""
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        torch.set_num_threads(threads)
