"""SSiT's heads: MoCo v3 projector and predictor MLPs, and the saliency segmentation head."""

from __future__ import annotations

import torch
from torch import nn


def mlp(num_layers: int, in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """MoCo v3 MLP: Linear (no bias) + BN + ReLU between layers, a BN without affine at the end.

    Module indices match the reference (0, 1, 3, 4, 6, 7 for three layers), so its state dicts load as is.
    """
    layers: list[nn.Module] = []
    for i in range(num_layers):
        last = i == num_layers - 1
        layers.append(nn.Linear(in_dim if i == 0 else hidden_dim, out_dim if last else hidden_dim, bias=False))
        if not last:
            layers += [nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        else:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def projector(embed_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> nn.Sequential:
    return mlp(3, embed_dim, hidden_dim, out_dim)


def predictor(out_dim: int = 256, hidden_dim: int = 4096) -> nn.Sequential:
    return mlp(2, out_dim, hidden_dim, out_dim)


class PixelHead(nn.Module):
    """Per-pixel logits from patch tokens: 1x1 conv to classes*p*p channels, then PixelShuffle(p). SSiT's
    saliency head (one class) and the segmentation head (one channel per mask class)."""

    def __init__(self, embed_dim: int, patch: int, classes: int = 1):
        super().__init__()
        self.proj = nn.Conv2d(embed_dim, classes * patch * patch, kernel_size=1)
        self.shuffle = nn.PixelShuffle(patch)

    def forward(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """(B, h*w, D) tokens of a square grid -> (B, classes, h*p, w*p) logits."""
        b, n, d = patch_tokens.shape
        side = int(n**0.5)
        grid = patch_tokens.transpose(1, 2).reshape(b, d, side, side)
        return self.shuffle(self.proj(grid))
