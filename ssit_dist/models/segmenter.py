"""The segmentation model of the SSiT paper's evaluation: the encoder's patch tokens (class token dropped)
on their grid, a 1x1 convolution to classes x patch^2 channels and a PixelShuffle back to the input's
resolution: the shape of SSiT's saliency head, one channel per mask class."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ssit_dist.models.heads import PixelHead


class Segmenter(nn.Module):
    def __init__(self, encoder: VisionTransformer, classes: int):
        super().__init__()
        self.encoder = encoder
        self.prefix = encoder.num_prefix_tokens  # the class (and register) tokens before the patches
        patch = int(encoder.patch_embed.patch_size[0])
        self.head = PixelHead(encoder.embed_dim, patch, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, classes, H, W) logits; H and W the encoder's input size."""
        tokens = self.encoder.forward_features(x)[:, self.prefix :]
        return self.head(tokens)
