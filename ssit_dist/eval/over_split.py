"""Run a model over a split on every process and gather the results, each sample exactly once.

Process p takes samples p, p + world, p + 2 world, ...: no sampler padding, so nothing is counted
twice; the gathered rows are put back in dataset order by their sample index.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, Subset

from ssit_dist.data.loading.labelled import LabelledShards, collate_labelled
from ssit_dist.data.loading.workers import worker_options
from ssit_dist.dist import gather_objects
from ssit_dist.eval.crossval import patient_ids
from ssit_dist.eval.label_metrics import endpoint_intervals, referable_scores
from ssit_dist.eval.metrics import grading_metrics
from ssit_dist.models.grader import Grader


@torch.no_grad()
def run_over_split(
    fn: Callable[[torch.Tensor], torch.Tensor],
    dataset: LabelledShards,
    accelerator: Accelerator,
    batch_size: int = 64,
    workers: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(sample indices, outputs of `fn` as float32 rows), over every process, in dataset order. Samples
    that did not decode are absent; callers name them (`missing`)."""
    mine = Subset(dataset, range(accelerator.process_index, len(dataset), accelerator.num_processes))
    loader = DataLoader(mine, batch_size=batch_size, collate_fn=collate_labelled, **worker_options(workers))
    indices, outputs = [], []
    for images, _, index in loader:
        if len(index):
            outputs.append(fn(images.to(accelerator.device)).float().cpu().numpy())
            indices.append(index.numpy())
    local = [(np.concatenate(indices), np.concatenate(outputs))] if indices else []
    parts = [part for rank_parts in gather_objects(local, accelerator.device) for part in rank_parts]
    if not parts:
        return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    all_indices = np.concatenate([i for i, _ in parts])
    all_outputs = np.concatenate([o for _, o in parts])
    order = np.argsort(all_indices, kind="stable")
    return all_indices[order], all_outputs[order]


def missing(dataset: LabelledShards, indices: np.ndarray) -> list[str]:
    """Keys of the samples that produced no output (they did not decode)."""
    present = np.zeros(len(dataset), bool)
    present[indices] = True
    return [dataset.keys[i] for i in np.flatnonzero(~present)]


def evaluate(
    grader: Grader, dataset: LabelledShards, accelerator: Accelerator, batch_size: int, intervals: bool = False
) -> dict[str, Any]:
    """Metrics of `grader` on `dataset` plus the per-sample rows behind them (rank 0 holds them all). With
    `intervals` (the reported evaluation, not each epoch's selection) also the metrics' "intervals": QWK,
    accuracy, referable AUC, sensitivity and specificity with patient-bootstrap 95% intervals, as `ssit-dist
    predict --labels` reports them (eval/label_metrics.py; patients from the shards' groups where they
    were packed with --group-by, else one per photograph)."""
    grader.eval()
    with accelerator.autocast():
        indices, outputs = run_over_split(grader, dataset, accelerator, batch_size)
    predicted, scores = grader.grades_and_scores(torch.from_numpy(outputs))
    truth = np.array(dataset.grades)[indices]
    metrics = grading_metrics(truth, predicted.numpy(), scores.numpy(), grader.num_classes)
    metrics["missing"] = missing(dataset, indices)
    if intervals:
        referable = referable_scores(grader.objective, outputs, scores.numpy())
        patients = patient_ids([dataset.groups[i] for i in indices], len(indices))
        metrics["intervals"] = endpoint_intervals(truth, predicted.numpy(), referable, patients, grader.num_classes)
        metrics["intervals"]["patients"] = int(len(np.unique(patients)))
    return {
        "metrics": metrics,
        "indices": indices,
        "truth": truth,
        "predicted": predicted.numpy(),
        "scores": scores.numpy(),
    }
