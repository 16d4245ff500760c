"""The momentum (key) network: an fp32 exponential moving average of the query encoder and projector.

It lives outside any training engine on purpose: inside DeepSpeed's bf16 engine it would be cast to
bf16, where the (1 - m) updates round away (at m = 0.99 the rounding error exceeds the whole EMA
movement). It is updated from the full fp32 parameters, see `ssit_dist.dist.full_fp32_parameters`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ssit_dist.data.salient_patches import salient_token_indices
from ssit_dist.models.vit import encode


class MomentumNetwork(nn.Module):
    """Key encoder + key projector; parameters fp32, never trained by gradient."""

    def __init__(self, encoder: VisionTransformer, projector: nn.Module, mask_ratio: float | None, pool: str):
        """`mask_ratio`: share of the least salient patches the keys leave out; None: no selection, every
        patch (MoCo v3)."""
        super().__init__()
        self.encoder = copy.deepcopy(encoder).float()
        self.projector = copy.deepcopy(projector).float()
        self.mask_ratio, self.pool = mask_ratio, pool
        self.requires_grad_(False)

        # Kahan compensation: what fp32 rounding dropped from each update, added back at the next.
        # Without it the rounding error of p + (1 - m)(t - p) is systematic when (t - p) drifts slowly
        # and builds up over ~1/(1 - m) steps (7e-6 after 1000 steps at m = 0.999 in a test, against
        # under 1e-7 with it).
        self._compensation = [torch.zeros_like(p) for p in self.parameters()]

    @torch.no_grad()
    def update(self, source: Iterable[torch.Tensor], m: float) -> None:
        """self <- m * self + (1 - m) * source, for the query encoder's and projector's full fp32
        parameters in `parameters()` order (buffers are not averaged, as in MoCo v3)."""
        mine: list[torch.Tensor] = list(self.parameters())
        theirs = [t.to(p.device, torch.float32) for p, t in zip(mine, source, strict=True)]
        if self._compensation[0].device != mine[0].device:
            self._compensation = [c.to(mine[0].device) for c in self._compensation]
        step = torch._foreach_sub(theirs, mine)
        torch._foreach_mul_(step, 1.0 - m)
        torch._foreach_add_(step, self._compensation)
        updated = torch._foreach_add(mine, step)
        applied = torch._foreach_sub(updated, mine)
        self._compensation = list(torch._foreach_sub(step, applied))
        torch._foreach_copy_(mine, updated)

    def get_extra_state(self) -> dict[str, list[torch.Tensor]]:
        return {"compensation": self._compensation}

    def set_extra_state(self, state: dict[str, list[torch.Tensor]]) -> None:
        self._compensation = [c.clone() for c in state["compensation"]]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
        """Keys (B, out_dim) from the most salient patches of each image (every patch without a mask ratio)."""
        keep = None
        if self.mask_ratio is not None:
            patch = int(self.encoder.patch_embed.patch_size[0])
            keep = salient_token_indices(saliency, patch, self.mask_ratio, self.pool)
        # Weights stay fp32; under autocast the matmuls run in the training precision, like the query's.
        return self.projector(encode(self.encoder, x, keep)[:, 0])
