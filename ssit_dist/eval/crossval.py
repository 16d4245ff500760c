"""Frozen-feature evaluation that can tell pretraining methods apart, with honest uncertainty.

The protocol, fixed before any number is seen:

1. Folds: patient-grouped, grade-stratified K-fold cross-validation over every graded photograph
   (`patient_folds`). A patient's photographs (both eyes) stay in one fold: the other eye of a test patient
   in training would inflate every metric. Patients are stratified by their highest grade.
2. Hyper-parameters (kNN's k, the probe's L2 penalty) are chosen by an inner patient-grouped CV on the
   training folds alone (`select_hyper`); the test fold is touched once, by the chosen read-out.
   The criterion is 5-class QWK of the inner out-of-fold predictions by default: it is the headline
   endpoint, and it treats both read-outs alike, whereas kNN's votes at temperature 0.07 are not
   calibrated probabilities (zero for every grade no neighbour has), so log-loss would mostly measure
   the floor put under them. `select_by="log_loss"` is there to check that a conclusion does not hinge
   on this choice.
3. Label efficiency: the same, trained on a seeded, grade-stratified subset of each training fold's
   *patients* (10%, 25%); the subsets are nested (the 10% patients are among the 25%) and shared by every
   method, so the methods are compared on the same training photographs.
4. Endpoints of the out-of-fold predictions: 5-class QWK, accuracy, and referable-DR AUC (grade >= 2;
   score = probability mass on grades >= 2), each computed within the folds, among photographs one model
   scored (`endpoints` says why), then combined.
5. Uncertainty: a patient-level bootstrap (each fold's patients resampled with replacement) with one set
   of draws shared by all methods, so each difference A - B is paired. Rule: "A beats B" only where the
   paired 95% percentile interval excludes 0 (for QWK and AUC; accuracy is reported, not judged: see
   JUDGED); otherwise "not resolved at this scale", with the interval's half-width as what this data set
   can resolve.

What the intervals leave out: they hold the trained read-outs fixed and resample the test patients, so
they miss the variation from the training patients (in K-fold CV every fold trains the models of the
others, a covariance no resampling of fixed predictions sees) and from the hyper-parameter choice. For two
equally informative (or equally uninformative) feature sets, simulated at ~250 and ~1,700 photographs,
the paired interval of QWK or AUC excluded 0 in 0-25% of 20-30 runs depending on read-out and endpoint,
against the nominal 5%: a "beats" near the edge of its interval deserves a second look (another seed).

The same folds, subsets and inner folds serve every method (they depend on grades, patients and the seed,
never on features): differences are due to the features alone.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass as plain_dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import ConfigDict, Field, model_validator
from pydantic.dataclasses import dataclass

from ssit_dist.eval.metrics import binary_auc, quadratic_weighted_kappa
from ssit_dist.eval.probes import DEFAULT_KS, DEFAULT_L2, KNN_TEMPERATURE, Probe, knn_probe, linear_probe

SelectBy = Literal["qwk", "log_loss"]
REFERABLE_GRADE = 2  # referable DR: moderate non-proliferative or worse
ENDPOINTS = ("qwk", "referable_auc", "accuracy")
# The endpoints the verdict rule judges. Accuracy is reported, not judged: it rises with how often a read-out
# predicts the majority grade, which its hyper-parameter (k = 50 predicts grade 0 nearly always) decides as
# much as the features do. Between two label-independent feature sets (1,700 photographs of 1,000 simulated
# patients, 64-d noise, 30 runs) its paired interval excluded 0 in 33% (probe) and 63% (kNN) of runs,
# against 0-25% for QWK and AUC (module docstring).
JUDGED = ("qwk", "referable_auc")
NOT_JUDGED = "not judged: accuracy follows how often a read-out predicts the majority grade"
DIGITS = 4
Seed = int | Sequence[int]  # anything np.random.default_rng takes: [seed, fold, stage] gives separate streams


@dataclass(config=ConfigDict(extra="forbid"))
class Protocol:
    """Every choice of the evaluation; `evaluate_features` reports it beside the results."""

    folds: int = Field(default=5, ge=2, description="outer patient-grouped, grade-stratified folds")
    inner_folds: int = Field(
        default=3, ge=2, description="inner folds (on the training folds only) that choose k and the L2 penalty"
    )
    fractions: list[Annotated[float, Field(gt=0, le=1)]] = Field(
        default_factory=lambda: [1.0, 0.25, 0.1],
        min_length=1,
        description="fractions of each training fold's patients to train on, each in (0, 1], no repeats",
    )
    ks: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=lambda: list(DEFAULT_KS), min_length=1, description="kNN neighbour counts, most first"
    )
    l2: list[Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: list(DEFAULT_L2), min_length=1, description="linear probe L2 penalties, strongest first"
    )
    temperature: float = Field(
        default=KNN_TEMPERATURE, gt=0, description="kNN vote weight exp(similarity / temperature)"
    )
    select_by: SelectBy = Field(
        default="qwk", description="inner-CV criterion of the hyper-parameters: qwk or log_loss"
    )
    resamples: int = Field(default=1000, ge=10, description="patient-level bootstrap resamples")
    seed: int = Field(default=0, ge=0, description="seed of the folds, training subsets, inner folds and bootstrap")
    num_classes: int = Field(default=5, ge=REFERABLE_GRADE + 1, description="grades 0..num_classes-1")

    @model_validator(mode="after")
    def _distinct_fractions(self) -> Protocol:
        if len(set(self.fractions)) != len(self.fractions):
            raise ValueError(f"fractions {self.fractions}: expected no repeats")
        return self

    def probes(self) -> tuple[Probe, Probe]:
        return knn_probe(tuple(self.ks), self.temperature), linear_probe(tuple(self.l2))


# --- patients and folds -------------------------------------------------------------------------------


def patient_ids(groups: Sequence[Any] | np.ndarray | None, samples: int) -> np.ndarray:
    """Patient index 0..P-1 of each sample. A missing id (None, "", NaN) makes the photograph its own
    patient: unknown is never assumed to be shared."""
    if groups is None:
        return np.arange(samples)
    if len(groups) != samples:
        raise ValueError(f"groups has {len(groups)} entries for {samples} samples: give one patient id per sample")
    names = [None if g is None or g == "" or (isinstance(g, float) and np.isnan(g)) else str(g) for g in groups]
    named = sorted({n for n in names if n is not None})
    index = {n: i for i, n in enumerate(named)}
    next_id = iter(range(len(named), len(named) + samples))
    return np.array([index[n] if n is not None else next(next_id) for n in names], np.int64)


def _patient_strata(grades: np.ndarray, patients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(distinct patient ids, each one's highest grade)."""
    unique, inverse = np.unique(patients, return_inverse=True)
    highest = np.full(len(unique), -1, np.int64)
    np.maximum.at(highest, inverse, np.asarray(grades, np.int64))
    return unique, highest


def patient_folds(
    grades: np.ndarray, groups: Sequence[Any] | np.ndarray | None = None, folds: int = 5, seed: Seed = 0
) -> np.ndarray:
    """Fold index 0..folds-1 of each sample: no patient in two folds, every fold with a similar mix of
    patients' highest grades (scikit-learn's StratifiedGroupKFold, shuffled by `seed`, each photograph
    labelled with its patient's highest grade: a patient is as sick as the worse eye)."""
    from sklearn.model_selection import StratifiedGroupKFold

    grades = np.asarray(grades)
    patients = patient_ids(groups, len(grades))
    unique, highest = _patient_strata(grades, patients)
    if len(unique) < folds:
        raise ValueError(f"{len(unique)} patients cannot fill {folds} folds: use fewer folds or more patients")
    strata = highest[np.searchsorted(unique, patients)]
    if np.bincount(strata).max() < folds:  # no grade fills the folds (a tiny training subset): grouped only,
        strata = np.zeros_like(strata)  # as scikit-learn refuses to stratify such a cohort
    splitter = StratifiedGroupKFold(folds, shuffle=True, random_state=np.random.RandomState(seed))
    fold_of = np.empty(len(grades), np.int64)
    with warnings.catch_warnings():
        # A grade with fewer patients than folds (grade 4 of a small training subset) cannot reach every
        # fold: expected, and the grade counts and fold sizes in the report show it.
        warnings.filterwarnings("ignore", "The least populated class", UserWarning)
        for fold, (_, test) in enumerate(splitter.split(grades, strata, patients)):
            fold_of[test] = fold
    return fold_of


def subsample_patients(grades: np.ndarray, patients: np.ndarray, fraction: float, seed: Seed) -> np.ndarray:
    """Sorted indices of the samples of a seeded `fraction` of the patients (at least one), allocated to
    the highest-grade strata in proportion. Each patient gets the key (random rank in its stratum + a
    random offset) / stratum size and the lowest keys are taken: for one seed a smaller fraction's
    patients are among a larger one's."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction = {fraction}: must be in (0, 1]")
    unique, highest = _patient_strata(grades, patients)
    rng = np.random.default_rng(seed)
    keys = np.empty(len(unique))
    for stratum in np.unique(highest):
        members = np.flatnonzero(highest == stratum)
        keys[members] = (rng.permutation(len(members)) + rng.random(len(members))) / len(members)
    taken = unique[np.argsort(keys, kind="stable")[: max(1, round(fraction * len(unique)))]]
    return np.flatnonzero(np.isin(patients, taken))


# --- cross-validation -----------------------------------------------------------------------------------


@plain_dataclass
class OutOfFold:
    """Each sample's grade probabilities from the read-out that never saw its fold, and the
    hyper-parameter chosen for each outer fold."""

    probabilities: np.ndarray  # (samples, classes)
    chosen: list[float]


def endpoints(grades: np.ndarray, probabilities: np.ndarray, folds: np.ndarray) -> dict[str, float]:
    """QWK and accuracy of the most probable grade, referable-DR AUC of the probability of grade >= 2,
    each computed among the photographs of one fold (scored by one model) and then combined.

    Pooled predictions would add comparisons no model made: a photograph of one fold against one of another,
    scored by models of different calibration (each learns its training folds' grade mix, the mirror image
    of its test fold's). So the AUC counts the (referable, not) pairs within a fold only, QWK is each fold's
    kappa (chance agreement from that fold's own marginals) weighted by its size, and accuracy (a plain mean
    either way) is the mean. NaN where nothing is defined (no fold with both kinds of photograph)."""
    predicted, classes = probabilities.argmax(axis=1), probabilities.shape[1]
    referable, score = grades >= REFERABLE_GRADE, probabilities[:, REFERABLE_GRADE:].sum(axis=1)
    kappas, sizes, aucs, pairs = [], [], [], []
    for f in np.unique(folds):
        fold = folds == f
        kappas.append(quadratic_weighted_kappa(grades[fold], predicted[fold], classes))
        sizes.append(fold.sum())
        pairs.append(referable[fold].sum() * (~referable[fold]).sum())
        aucs.append(binary_auc(referable[fold], score[fold]) if pairs[-1] else 0.0)
    return {
        "qwk": _weighted_mean(np.array(kappas), np.array(sizes)),
        "referable_auc": _weighted_mean(np.array(aucs), np.array(pairs)),
        "accuracy": float(np.mean(grades == predicted)),
    }


def _weighted_mean(values: np.ndarray, weights: np.ndarray) -> float:
    """The mean of the defined values by their weights; NaN where none is defined or weighs anything."""
    weights = np.where(np.isnan(values), 0, weights).astype(np.float64)
    return float(np.nansum(values * weights) / weights.sum()) if weights.sum() else float("nan")


def _criterion(grades: np.ndarray, probabilities: np.ndarray, folds: np.ndarray, select_by: SelectBy) -> float:
    """Higher is better, computed like the endpoints (within folds); NaN counts as worst."""
    if select_by == "qwk":
        value = endpoints(grades, probabilities, folds)["qwk"]
    else:
        truth = probabilities[np.arange(len(grades)), grades]
        value = float(np.mean(np.log(np.maximum(truth, 1e-6))))  # floored: a zero kNN vote is not -inf
    return -np.inf if np.isnan(value) else value


@plain_dataclass(frozen=True)
class FoldPlan:
    """One outer fold's rows: the test rows, the training rows (`fraction` of the other folds' patients)
    and the inner fold of each training row. They depend on grades, patients and the seed alone, never
    on features: one plan serves every method and both read-outs."""

    test: np.ndarray
    train: np.ndarray
    inner: np.ndarray


def fold_plans(
    grades: np.ndarray,
    patients: np.ndarray,
    folds: np.ndarray,
    fraction: float = 1.0,
    inner_folds: int = 3,
    seed: int = 0,
) -> list[FoldPlan]:
    """A FoldPlan per outer fold, seeded per (seed, fold, stage): streams independent of each other."""
    plans = []
    for f in np.unique(folds):
        test, rest = np.flatnonzero(folds == f), np.flatnonzero(folds != f)
        train = rest[subsample_patients(grades[rest], patients[rest], fraction, [seed, int(f), 1])]
        inner_count = min(inner_folds, len(np.unique(patients[train])))
        inner = patient_folds(grades[train], patients[train], inner_count, [seed, int(f), 2])
        plans.append(FoldPlan(test, train, inner))
    return plans


def select_hyper(
    x: np.ndarray, grades: np.ndarray, inner: np.ndarray, probe: Probe, *, classes: int, select_by: SelectBy = "qwk"
) -> float:
    """The candidate of `probe.grid` whose out-of-fold predictions over the `inner` folds score best on
    `x` (the training rows only). Ties go to the first candidate, the most regularised."""
    grid = probe.usable_grid(int(min((inner != f).sum() for f in np.unique(inner))))
    if len(grid) == 1:
        return grid[0]
    pooled = np.empty((len(grid), len(grades), classes))
    for f in np.unique(inner):
        fit, held = inner != f, inner == f
        pooled[:, held] = probe.predict(x[fit], grades[fit], x[held], grid, classes)
    scores = [_criterion(grades, candidate, inner, select_by) for candidate in pooled]
    return grid[int(np.argmax(scores))]


def cross_validate(
    x: np.ndarray,
    grades: np.ndarray,
    plans: list[FoldPlan],
    probe: Probe,
    *,
    classes: int = 5,
    select_by: SelectBy = "qwk",
) -> OutOfFold:
    """Out-of-fold probabilities of `probe` on features `x` over the outer folds of `plans` (pass the same
    plans for every method): each fold's hyper-parameter chosen on its training rows, then its test rows
    predicted once."""
    probabilities = np.full((len(grades), classes), np.nan)
    chosen = []
    for plan in plans:
        value = select_hyper(x[plan.train], grades[plan.train], plan.inner, probe, classes=classes, select_by=select_by)
        probabilities[plan.test] = probe.predict(x[plan.train], grades[plan.train], x[plan.test], (value,), classes)[0]
        chosen.append(value)
    return OutOfFold(probabilities, chosen)


def grade_mix(grades: np.ndarray, folds: np.ndarray, classes: int) -> np.ndarray:
    """The chance floor: each photograph's probabilities are its training folds' grade frequencies, a
    read-out that learnt the grade mix and nothing of the photograph (it predicts the majority grade:
    QWK 0, AUC 0.5, accuracy the majority's share)."""
    probabilities = np.empty((len(grades), classes))
    for f in np.unique(folds):
        counts = np.bincount(grades[folds != f], minlength=classes)
        probabilities[folds == f] = counts / counts.sum()
    return probabilities


# --- patient-level bootstrap ----------------------------------------------------------------------------


def patient_resamples(patients: np.ndarray, folds: np.ndarray, resamples: int, seed: Seed) -> list[np.ndarray]:
    """Sample indices of each resample: each fold's patients drawn with replacement, as many as it has,
    each bringing all its photographs. The two eyes of a patient are not independent evidence, so the
    patient, not the photograph, is the unit resampled; resampling within folds keeps each fold's size,
    which the design fixed, and each fold's endpoints defined."""
    unique, inverse = np.unique(patients, return_inverse=True)
    by_patient = np.argsort(inverse, kind="stable")  # samples grouped by patient
    counts = np.bincount(inverse)
    starts = np.cumsum(counts) - counts
    fold_of_patient = np.empty(len(unique), np.int64)
    fold_of_patient[inverse] = folds
    members = [np.flatnonzero(fold_of_patient == f) for f in np.unique(folds)]
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        drawn = np.concatenate([m[rng.integers(0, len(m), len(m))] for m in members])
        lengths = counts[drawn]
        within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        draws.append(by_patient[np.repeat(starts[drawn], lengths) + within])
    return draws


def bootstrap_endpoints(
    grades: np.ndarray, probabilities: np.ndarray, folds: np.ndarray, draws: list[np.ndarray]
) -> dict[str, np.ndarray]:
    """Each endpoint on each resample (NaN where undefined, e.g. an AUC without a referable patient)."""
    rows = [endpoints(grades[d], probabilities[d], folds[d]) for d in draws]
    return {name: np.array([row[name] for row in rows]) for name in ENDPOINTS}


def _round(value: float) -> float | None:
    return None if np.isnan(value) else round(float(value), DIGITS)


def _ci95(samples: np.ndarray) -> tuple[float, float]:
    """The percentile interval over the resamples where the endpoint is defined."""
    defined = samples[~np.isnan(samples)]
    if not defined.size:
        return float("nan"), float("nan")
    low, high = np.percentile(defined, [2.5, 97.5])
    return float(low), float(high)


def interval(value: float, samples: np.ndarray) -> dict[str, Any]:
    """{"value": the endpoint on all samples, "ci95": [low, high]} as JSON-ready floats."""
    low, high = _ci95(samples)
    return {"value": _round(value), "ci95": [_round(low), _round(high)]}


def paired_difference(a: str, b: str, value: float, samples: np.ndarray, judged: bool = True) -> dict[str, Any]:
    """The difference a - b, its paired interval, the interval's half-width (the smallest difference this
    data set resolves), and the verdict by the rule fixed up front: a winner only where the interval
    excludes 0 (for an endpoint that is `judged`; see JUDGED)."""
    low, high = _ci95(samples)
    verdict = f"{a} beats {b}" if low > 0 else f"{b} beats {a}" if high < 0 else "not resolved at this scale"
    verdict = verdict if judged else NOT_JUDGED
    return {
        "value": _round(value),
        "ci95": [_round(low), _round(high)],
        "half_width": _round((high - low) / 2),
        "verdict": verdict,
    }


# --- the whole evaluation -------------------------------------------------------------------------------

Key = tuple[str, str]  # (method, read-out variant such as "probe_10pct")


def evaluate_features(
    features: Mapping[str, np.ndarray],
    grades: Sequence[int] | np.ndarray,
    groups: Sequence[Any] | np.ndarray | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
    protocol: Protocol | None = None,
) -> dict[str, Any]:
    """Every method's features (rows aligned with `grades` and `groups`) through every read-out variant,
    each endpoint with its patient-bootstrap interval, and each pair's paired difference with its verdict
    (`pairs` default: every pair, in the order the methods are given), and the chance floor (`grade_mix`)
    with its interval. JSON-ready: see the module
    docstring for the protocol, and `_protocol_summary`, `_method_results`, `_differences` for the shape."""
    protocol = protocol or Protocol()
    started = time.perf_counter()
    grades, patients = _checked_inputs(features, grades, groups, protocol.num_classes)
    pairs = _checked_pairs(features, pairs)
    folds = patient_folds(grades, patients, protocol.folds, protocol.seed)
    plans = {
        fraction: fold_plans(grades, patients, folds, fraction, protocol.inner_folds, protocol.seed)
        for fraction in protocol.fractions
    }
    runs = {
        (method, variant): cross_validate(
            np.asarray(x, np.float64),
            grades,
            plans[fraction],
            probe,
            classes=protocol.num_classes,
            select_by=protocol.select_by,
        )
        for method, x in features.items()
        for variant, probe, fraction in _variants(protocol)
    }
    draws = patient_resamples(patients, folds, protocol.resamples, [protocol.seed, 3])
    points = {key: endpoints(grades, run.probabilities, folds) for key, run in runs.items()}
    boots = {key: bootstrap_endpoints(grades, run.probabilities, folds, draws) for key, run in runs.items()}
    chance = grade_mix(grades, folds, protocol.num_classes)
    chance_boots = bootstrap_endpoints(grades, chance, folds, draws)
    return {
        "protocol": _protocol_summary(protocol, features, grades, patients, folds, time.perf_counter() - started),
        "methods": _method_results(runs, points, boots, protocol),
        "differences": _differences(pairs, points, boots, protocol),
        "chance": {e: interval(v, chance_boots[e]) for e, v in endpoints(grades, chance, folds).items()},
    }


def _variants(protocol: Protocol) -> list[tuple[str, Probe, float]]:
    """(name, read-out, training fraction): "knn", "probe", then "knn_25pct", "probe_25pct", ..."""
    return [
        (probe.name if fraction == 1 else f"{probe.name}_{fraction * 100:g}pct", probe, fraction)
        for fraction in protocol.fractions
        for probe in protocol.probes()
    ]


def _checked_inputs(
    features: Mapping[str, np.ndarray], grades: Sequence[int] | np.ndarray, groups: Any, classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(grades, patient ids) after checking that every method has one finite feature row per grade."""
    grades = np.asarray(grades)
    valid = grades.ndim == 1 and grades.size and np.issubdtype(grades.dtype, np.integer)
    if not valid or grades.min() < 0 or grades.max() >= classes:
        found = f", {grades.min()}..{grades.max()}" if grades.size else ""
        raise ValueError(
            f"grades must be one integer 0..{classes - 1} per sample (got {grades.dtype} {grades.shape}{found})"
        )
    if not features:
        raise ValueError("no features to evaluate: give at least one method's (samples, dim) array")
    for method, x in features.items():
        shape = np.shape(x)
        if len(shape) != 2 or shape[0] != len(grades):
            raise ValueError(f"features of {method!r} are {shape}: expected ({len(grades)}, dim), a row per grade")
        if not np.isfinite(x).all():
            raise ValueError(f"features of {method!r} have non-finite values: recompute or drop those rows")
    return grades.astype(np.int64), patient_ids(groups, len(grades))


def _checked_pairs(features: Mapping[str, np.ndarray], pairs: Sequence[tuple[str, str]] | None) -> list[Key]:
    names = list(features)
    if pairs is None:
        return [(a, b) for i, a in enumerate(names) for b in names[i + 1 :]]
    for pair in pairs:
        unknown = [name for name in pair if name not in features]
        if unknown or len(pair) != 2:
            raise ValueError(f"pair {pair!r} must name two of the methods {names}")
    return [(a, b) for a, b in pairs]


def _protocol_summary(
    protocol: Protocol,
    features: Mapping[str, np.ndarray],
    grades: np.ndarray,
    patients: np.ndarray,
    folds: np.ndarray,
    seconds: float,
) -> dict[str, Any]:
    """What was done, on what: enough to judge and to repeat the numbers."""
    return {
        "samples": int(len(grades)),
        "patients": int(len(np.unique(patients))),
        "grade_counts": np.bincount(grades, minlength=protocol.num_classes).tolist(),
        "feature_dims": {method: int(np.shape(x)[1]) for method, x in features.items()},
        "folds": protocol.folds,
        "fold_sizes": np.bincount(folds).tolist(),
        "grouping": "patient (a photograph without a patient id is its own patient)",
        "stratified_by": "patient's highest grade",
        "inner_folds": protocol.inner_folds,
        "selection": f"{protocol.select_by} of inner out-of-fold predictions, ties to the most regularised",
        "fractions": protocol.fractions,
        "knn": {"ks": protocol.ks, "temperature": protocol.temperature, "similarity": "cosine of raw features"},
        "probe": {
            "l2": protocol.l2,
            "model": "multinomial logistic regression (scikit-learn, L-BFGS), training-fold standardised",
        },
        "endpoints": {
            "referable": f"grade >= {REFERABLE_GRADE}",
            "predicted_grade": "most probable",
            "combined": "within each fold, then over folds: QWK by fold size, AUC by (referable, not) pairs",
        },
        "bootstrap": {
            "unit": "patient, within folds",
            "resamples": protocol.resamples,
            "interval": "percentile 95%",
            "covers": "test-patient sampling of the trained read-outs, not training-set or selection variation",
        },
        "verdict_rule": f"A beats B only where the paired 95% interval of A - B excludes 0; judged: {list(JUDGED)}",
        "seed": protocol.seed,
        "seconds": round(seconds, 1),
    }


def _chosen(probe_hyper: str, chosen: list[float]) -> dict[str, list[float]]:
    return {probe_hyper: [int(v) if probe_hyper == "k" else v for v in chosen]}


def _method_results(
    runs: dict[Key, OutOfFold],
    points: dict[Key, dict[str, float]],
    boots: dict[Key, dict[str, np.ndarray]],
    protocol: Protocol,
) -> dict[str, dict[str, Any]]:
    """{method: {variant: {endpoint: {"value", "ci95"}, ..., "chosen": {hyper: [one per outer fold]}}}}"""
    hyper = {name: probe.hyper for name, probe, _ in _variants(protocol)}
    results: dict[str, dict[str, Any]] = {}
    for (method, variant), run in runs.items():
        entry: dict[str, Any] = {e: interval(points[method, variant][e], boots[method, variant][e]) for e in ENDPOINTS}
        entry["chosen"] = _chosen(hyper[variant], run.chosen)
        results.setdefault(method, {})[variant] = entry
    return results


def _differences(
    pairs: list[Key],
    points: dict[Key, dict[str, float]],
    boots: dict[Key, dict[str, np.ndarray]],
    protocol: Protocol,
) -> dict[str, dict[str, Any]]:
    """{"a - b": {variant: {endpoint: {"value", "ci95", "half_width", "verdict"}}}}, paired resamples."""
    variants = [name for name, _, _ in _variants(protocol)]
    return {
        f"{a} - {b}": {
            variant: {
                e: paired_difference(
                    a,
                    b,
                    points[a, variant][e] - points[b, variant][e],
                    boots[a, variant][e] - boots[b, variant][e],
                    judged=e in JUDGED,
                )
                for e in ENDPOINTS
            }
            for variant in variants
        }
        for a, b in pairs
    }
