"""Schedules, as functions of training progress: pretraining passes the fractional epoch (epoch + step /
steps), fine-tuning the optimizer step; each is written once here."""

from __future__ import annotations

import math


def learning_rate(
    epoch: float, base_lr: float, warmup_epochs: float, total_epochs: float, min_lr: float = 0.0
) -> float:
    """Linear warmup from 0 to base_lr, then half-cycle cosine down to min_lr at total_epochs."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    progress = (epoch - warmup_epochs) / max(total_epochs - warmup_epochs, 1e-12)
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def momentum(epoch: float, total_epochs: float, base: float = 0.99) -> float:
    """EMA momentum: cosine ramp from `base` to 1 over training (MoCo v3)."""
    return 1 - 0.5 * (1 + math.cos(math.pi * min(epoch / total_epochs, 1.0))) * (1 - base)


def saliency_weight(epoch: float, total_epochs: float, weight: float, cosine_decay: bool = False) -> float:
    """Weight of the saliency loss: constant, or decayed to 0 with a half cosine."""
    if not cosine_decay:
        return weight
    return weight * 0.5 * (1 + math.cos(math.pi * min(epoch / total_epochs, 1.0)))
