"""A tiny SSiT (a 2-block ViT at 32 px) and a random batch for it: what the in-process model tests train."""

from __future__ import annotations

import torch

from ssit_dist.models.model_config import ModelConfig
from ssit_dist.models.ssit import SSiT

TINY = dict(
    arch="vit_small_patch16_224",
    img_size=32,
    timm_kwargs=dict(patch_size=8, embed_dim=48, depth=2, num_heads=3),
    proj_hidden=64,
    proj_dim=32,
)


def tiny(**overrides: object) -> SSiT:
    torch.manual_seed(0)
    return SSiT(ModelConfig(**{**TINY, **overrides}))  # type: ignore[arg-type]


def batch(n: int = 6, size: int = 32, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 3, size, size, generator=g),
        torch.randn(n, 3, size, size, generator=g),
        torch.rand(n, 1, size, size, generator=g),
        torch.rand(n, 1, size, size, generator=g),
    )
