"""SSiT's two losses: MoCo v3 contrastive loss across ranks, and saliency segmentation BCE."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ssit_dist.dist import all_gather_cat, rank


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of local queries against the keys of every rank, scaled by 2T as in MoCo v3.

    q: (N, C) with gradient; k: (N, C) keys (no gradient). Query i's positive is key i of this rank, at
    index i + rank * N of the gathered keys.
    """
    with torch.autocast(q.device.type, enabled=False):  # logits in fp32 whatever the training precision
        q = F.normalize(q.float(), dim=1)
        k = all_gather_cat(F.normalize(k.float(), dim=1))
        logits = q @ k.T / temperature
        targets = torch.arange(q.shape[0], device=q.device) + rank() * q.shape[0]
        return F.cross_entropy(logits, targets) * (2 * temperature)


def saliency_loss(logits: torch.Tensor, saliency: torch.Tensor, threshold: float) -> torch.Tensor:
    """BCE of per-pixel logits against the saliency map thresholded at `threshold` (maps in [0, 1])."""
    return F.binary_cross_entropy_with_logits(logits.float(), (saliency > threshold).float())
