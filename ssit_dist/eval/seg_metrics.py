"""Pixel metrics of segmentation, per class, over a whole split: Dice, IoU, sensitivity, specificity at a
threshold, and AUC-PR (average precision). Every photograph's pixels inside its field of view are counted
once; counts and probability histograms are integers summed over processes, so the result does not depend
on how the photographs were dealt to them.

Dice and IoU pool the pixels of the split (as the DRIVE and IDRiD evaluations report them) rather than
averaging per image; AUC-PR is computed from probabilities binned to 1/1024, exact up to that binning.
"""

from __future__ import annotations

import numpy as np
import torch

BINS = 1024


class PixelCounts:
    """Running per-class counts: [TP, FP, FN, TN] at the threshold and, per probability bin, the
    foreground and background pixels there."""

    def __init__(self, classes: int, threshold: float):
        self.threshold = threshold
        self.confusion = torch.zeros(classes, 4, dtype=torch.int64)
        self.histogram = torch.zeros(classes, 2, BINS, dtype=torch.int64)

    def add(self, probabilities: torch.Tensor, truth: torch.Tensor, fov: torch.Tensor) -> None:
        """probabilities (C, H, W) float, truth (C, H, W) bool, fov (H, W) bool: one photograph."""
        inside = fov.bool().expand_as(truth)
        for c in range(truth.shape[0]):
            p, t = probabilities[c][inside[c]].float().cpu(), truth[c][inside[c]].bool().cpu()
            predicted = p > self.threshold
            self.confusion[c] += torch.stack(
                [(predicted & t).sum(), (predicted & ~t).sum(), (~predicted & t).sum(), (~predicted & ~t).sum()]
            )
            bins = (p * BINS).long().clamp_(0, BINS - 1)
            self.histogram[c, 0] += torch.bincount(bins[t], minlength=BINS)
            self.histogram[c, 1] += torch.bincount(bins[~t], minlength=BINS)

    def merged(self, device: torch.device) -> PixelCounts:
        """The counts of every process summed (a collective where a process group exists)."""
        from ssit_dist.dist import sum_over_ranks

        self.confusion = sum_over_ranks(self.confusion, device)
        self.histogram = sum_over_ranks(self.histogram, device)
        return self

    def summary(self, classes: tuple[str, ...]) -> dict[str, dict[str, float | int]]:
        out: dict[str, dict[str, float | int]] = {}
        for c, name in enumerate(classes):
            tp, fp, fn, tn = (int(v) for v in self.confusion[c])
            out[name] = {
                "dice": _ratio(2 * tp, 2 * tp + fp + fn),
                "iou": _ratio(tp, tp + fp + fn),
                "sensitivity": _ratio(tp, tp + fn),
                "specificity": _ratio(tn, tn + fp),
                "auc_pr": average_precision(self.histogram[c, 0].numpy(), self.histogram[c, 1].numpy()),
                "pixels": tp + fp + fn + tn,
                "foreground_pixels": tp + fn,
            }
        return out


def _ratio(a: int, b: int) -> float:
    return round(a / b, 6) if b else float("nan")


def average_precision(foreground: np.ndarray, background: np.ndarray) -> float:
    """Area under the precision-recall curve from per-bin counts, thresholds from the top bin down
    (the step-wise sum scikit-learn's average_precision_score takes)."""
    tp = np.cumsum(foreground[::-1]).astype(np.float64)
    fp = np.cumsum(background[::-1]).astype(np.float64)
    if tp[-1] == 0:
        return float("nan")
    precision = tp / np.maximum(tp + fp, 1)
    recall = tp / tp[-1]
    return round(float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision)), 6)


def constant_dice(foreground: int, pixels: int) -> float:
    """The Dice of predicting every pixel foreground: the floor a trained model must beat."""
    return _ratio(2 * foreground, foreground + pixels)
