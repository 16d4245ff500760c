"""Why ssit_dist/eval/metrics.py computes QWK and AUC itself: the cost of one call against scikit-learn's,
and what that makes of the patient bootstrap; prints one JSON object.

The bootstrap (eval/crossval.py) computes each fold's QWK and referable-DR AUC on every resample of every
read-out: resamples x folds x methods x read-out variants calls of each. Measured on one fold of a 2,038-
photograph evaluation (408 photographs, the quality benchmark's mix), interleaved, median of `--repeats`
rounds; the two agree to 1e-12 (tests/eval/test_metrics.py checks it on random and edge cases).

Usage: python bench/perf/eval_metrics.py [--repeats 5] [--calls 200]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from sklearn.metrics import cohen_kappa_score, roc_auc_score

from ssit_dist.eval.crossval import Protocol
from ssit_dist.eval.metrics import binary_auc, quadratic_weighted_kappa
from ssit_dist.info import collect

FOLD = 408
GRADE_MIX = [0.71, 0.08, 0.15, 0.03, 0.03]
METHODS = 3  # `ssit-dist evaluate` of one encoder: the encoder and the two pixel floors


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    truth = rng.choice(5, FOLD, p=GRADE_MIX)
    predicted = np.clip(truth + rng.integers(-1, 2, FOLD), 0, 4)
    score, referable = rng.random(FOLD) + 0.3 * (truth >= 2), truth >= 2
    contenders = {
        "qwk_own": lambda: quadratic_weighted_kappa(truth, predicted, 5),
        "qwk_sklearn": lambda: cohen_kappa_score(truth, predicted, weights="quadratic", labels=list(range(5))),
        "auc_own": lambda: binary_auc(referable, score),
        "auc_sklearn": lambda: roc_auc_score(referable, score),
    }
    rounds: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.repeats):
        for name, fn in contenders.items():
            rounds[name].append(per_call_us(fn, args.calls))
    us = {name: round(statistics.median(values), 1) for name, values in rounds.items()}
    protocol = Protocol()
    calls = protocol.resamples * protocol.folds * METHODS * 2 * len(protocol.fractions)
    print(
        json.dumps(
            {
                "machine": collect()["cpu"] | {"torch": torch.__version__},
                "fold_photographs": FOLD,
                "per_call_us": us,
                "bootstrap_calls_each": calls,
                "bootstrap_s": {
                    "own": round(calls * (us["qwk_own"] + us["auc_own"]) / 1e6, 1),
                    "sklearn": round(calls * (us["qwk_sklearn"] + us["auc_sklearn"]) / 1e6, 1),
                },
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
