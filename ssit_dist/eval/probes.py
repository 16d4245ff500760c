"""The two read-outs of frozen features that crossval.py compares: weighted kNN and a linear probe.

Both map (training features, training grades, test features, candidate hyper-parameters) to the test
rows' per-grade probabilities under each candidate, so that cross-validation, hyper-parameter selection
and the endpoints treat them alike:

- kNN: `knn_grades` of knn.py (cosine similarity, votes exp(similarity / 0.07)) on the raw features, as
  `ssit-dist knn` grades; the hyper-parameter is k. Its "probabilities" are the normalised votes.
- linear probe: multinomial logistic regression on features standardised with the training rows' mean and
  standard deviation (never the test rows'), the L2 penalty on the weights (not the biases) being the
  hyper-parameter. It is fitted full-batch by L-BFGS from zero weights, then along the grid from the
  strongest penalty to the weakest, each fit starting from the last: a convex problem started from fixed
  points, so no seed enters and a refit gives the same numbers.

torch is imported where a probe runs: importing this module (for its grids, say) stays cheap.
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
        with _one_thread():
            return [knn_grades(bank, grades, queries, int(k), classes, temperature)[1].numpy() for k in ks]

    return Probe("knn", "k", tuple(float(k) for k in ks), predict)


def linear_probe(l2_grid: tuple[float, ...] = DEFAULT_L2, max_iter: int = 100) -> Probe:
    """Multinomial logistic regression on standardised features over the candidate penalties `l2_grid`."""

    def predict(
        train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, penalties: tuple[float, ...], classes: int
    ) -> list[np.ndarray]:
        train_z, test_z = standardise(train_x, test_x)
        coefficients, probabilities = None, []
        for l2 in penalties:
            coefficients = fit_logistic(train_z, train_y, l2, classes, coefficients, max_iter)
            logits = test_z @ coefficients[:-1] + coefficients[-1]
            logits -= logits.max(axis=1, keepdims=True)  # exp cannot overflow
            exp = np.exp(logits)
            probabilities.append(exp / exp.sum(axis=1, keepdims=True))
        return probabilities

    return Probe("probe", "l2", tuple(float(v) for v in l2_grid), predict)


def standardise(train_x: np.ndarray, test_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both sets centred and scaled by the *training* rows' per-feature mean and standard deviation: the
    test rows must not inform the probe, not even through the scaling. A constant feature (black thumbnail
    corners) keeps scale 1 rather than dividing by zero."""
    train_x, test_x = np.asarray(train_x, np.float64), np.asarray(test_x, np.float64)
    mean, std = train_x.mean(axis=0), train_x.std(axis=0)
    std[std < 1e-8] = 1.0
    return (train_x - mean) / std, (test_x - mean) / std


def fit_logistic(
    x: np.ndarray,
    y: np.ndarray,
    l2: float,
    classes: int,
    init: np.ndarray | None = None,
    max_iter: int = 100,
) -> np.ndarray:
    """Coefficients (features + 1, classes), the last row the biases, minimising mean cross-entropy +
    l2 / 2 * |weights|^2, by L-BFGS from `init` (default zeros).

    The biases go unpenalised (the grade mix is not something to shrink); a grade absent from `y` gets a
    bias driven down until the tolerance stops it, its probability near 0. The gradient is written out
    rather than taken by autograd: the whole fit is two small matrix products per evaluation, and autograd's
    bookkeeping would cost more than they do. float32, as the features come: the optimum only has to be
    good to the precision that moves a predicted grade."""
    import torch

    with _one_thread():
        # Class-major (classes, rows) logits: a (5, features) x (features, rows) product and its transpose
        # partner run about 4 times faster than (rows, features) x (features, 5) on MKL (measured).
        inputs = torch.from_numpy(np.hstack([x, np.ones((len(x), 1))]).astype(np.float32))
        columns = inputs.T.contiguous()
        targets = torch.nn.functional.one_hot(torch.from_numpy(np.asarray(y, np.int64)), classes).float().T
        penalised = torch.ones(1, inputs.shape[1])
        penalised[0, -1] = 0.0
        start = torch.zeros(classes, inputs.shape[1]) if init is None else torch.from_numpy(init.T.astype(np.float32))
        coefficients = start.clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS(
            [coefficients], max_iter=max_iter, history_size=20, tolerance_grad=1e-5, line_search_fn="strong_wolfe"
        )

        def closure() -> torch.Tensor:
            with torch.no_grad():
                logits = coefficients @ columns
                shrink = l2 * penalised * coefficients
                loss = (logits.logsumexp(0) - (logits * targets).sum(0)).mean() + 0.5 * (shrink * coefficients).sum()
                coefficients.grad = (logits.softmax(0) - targets) @ inputs / len(inputs) + shrink
            return loss

        optimizer.step(closure)
    return coefficients.detach().numpy().T.astype(np.float64)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch on one thread for the duration: the products of a probe (a few thousand rows by 5 columns, or
    by a few thousand neighbours) are too small for threads to pay, and where the cores are shared (tests
    running beside it) OpenMP threads spinning for each other made the fits 5-10 times slower (measured).
    One thread also makes the results the same on any machine: no reduction order depends on the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
