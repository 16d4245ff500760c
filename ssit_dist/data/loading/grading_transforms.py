"""Image transforms for DR grading: the reference's training augmentation and the evaluation resize.

Training (the SSiT fine-tuning recipe): random resized crop with scale 0.87-1.15 and ratio 0.7-1.3,
horizontal and vertical flips, colour jitter 0.2/0.2/0.1/0.1, rotation by up to 180 degrees, translation
by up to 10%. Both end normalised with the shards' mean/std. Inputs are RGB uint8 (3, H, W) tensors.
"""

from __future__ import annotations

import torch
from torchvision.transforms import v2


def train_transform(size: int, mean: list[float], std: list[float]) -> v2.Compose:
    return v2.Compose(
        [
            v2.RandomResizedCrop(size, scale=(0.87, 1.15), ratio=(0.7, 1.3), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandomVerticalFlip(),
            v2.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.1, hue=0.1),
            v2.RandomRotation(180),
            v2.RandomAffine(degrees=0, translate=(0.1, 0.1)),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


def eval_transform(size: int, mean: list[float], std: list[float]) -> v2.Compose:
    return v2.Compose(
        [
            v2.Resize((size, size), antialias=True),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )
