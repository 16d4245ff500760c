"""Which patches SSiT's key encoder keeps: the most salient ones, from the saliency map alone.

It lives with the data because the choice is a function of the saliency map (the model and the shard
preview both ask it), and the model side only gathers the tokens it names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def salient_token_indices(saliency: torch.Tensor, patch: int, mask_ratio: float, pool: str = "max") -> torch.Tensor:
    """Token indices a key encoder keeps: CLS (0) plus the top (1 - mask_ratio) patches by pooled saliency.

    saliency: (B, 1, H, W). Returns (B, 1 + n_keep) int64, patches sorted by decreasing saliency, ties
    broken by the lower patch index so the choice is deterministic.
    """
    if not 0 <= mask_ratio < 1:
        raise ValueError(f"mask_ratio {mask_ratio} must be in [0, 1)")
    pooled = F.max_pool2d(saliency, patch) if pool == "max" else F.avg_pool2d(saliency, patch)
    scores = pooled.flatten(1)
    keep = max(1, int((1 - mask_ratio) * scores.shape[1]))
    order = torch.argsort(scores, dim=1, descending=True, stable=True)[:, :keep]
    cls = torch.zeros_like(order[:, :1])
    return torch.cat([cls, order + 1], dim=1)
