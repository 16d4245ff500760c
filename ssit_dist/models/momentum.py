"""The momentum (key) network: an fp32 exponential moving average of the query encoder and projector.

It lives outside any training engine on purpose: inside DeepSpeed's bf16 engine it would be cast to
bf16, where the (1 - m) updates round away (at m = 0.99 the rounding error exceeds the whole EMA
movement). It is updated from the full fp32 parameters, see `ssit_dist.dist.full_fp32_parameters`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

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
        self._scratch: list[torch.Tensor] | None = None  # working space of `update`, not state
        self._compiled: Callable[..., None] | None = None
        self._weight = torch.zeros(())  # m - 1 for the compiled update

    @torch.no_grad()
    def update(self, source: Iterable[torch.Tensor], m: float) -> None:
        """self <- m * self + (1 - m) * source, for the query encoder's and projector's full fp32
        parameters in `parameters()` order (buffers are not averaged, as in MoCo v3)."""
        mine: list[torch.Tensor] = list(self.parameters())
        theirs = [t.to(p.device, torch.float32) for p, t in zip(mine, source, strict=True)]
        if self._compensation[0].device != mine[0].device:
            self._compensation = [c.to(mine[0].device) for c in self._compensation]
        if self._scratch is None or self._scratch[0].device != mine[0].device:
            self._scratch = [torch.empty_like(p) for p in mine]
        if self._compiled is None:
            compensated_update(mine, theirs, self._compensation, self._scratch, m - 1.0)
        else:  # the weight as a tensor on the device: a new m every step must not recompile (or sync)
            if self._weight.device != mine[0].device:
                self._weight = self._weight.to(mine[0].device)
            self._compiled(mine, theirs, self._compensation, self._scratch, self._weight.fill_(m - 1.0))

    def compile_update(self) -> None:
        """Fuse `update`'s seven passes into one per tensor (inductor): for ViT-S's 41 M averaged
        parameters 74 -> 23 ms on 2 CPU cores, the same parameters (to the last bit, where a compiler
        contracts a multiply-add)."""
        self._compiled = torch.compile(compensated_update)

    def get_extra_state(self) -> dict[str, list[torch.Tensor]]:
        return {"compensation": self._compensation}

    def set_extra_state(self, state: dict[str, list[torch.Tensor]]) -> None:
        self._compensation = [c.clone() for c in state["compensation"]]

    @torch.no_grad()
    def forward(self, x: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
        """Keys (B, out_dim) from the most salient patches of each image (every patch without a mask ratio)."""
        return self.projector(self._features(x, saliency))

    @torch.no_grad()
    def pair_keys(
        self, x1: torch.Tensor, s1: torch.Tensor, x2: torch.Tensor, s2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys of both views, `forward(x1, s1), forward(x2, s2)`, with one encoder pass over the two
        (half the kernel launches); the projector's BatchNorm still sees each view on its own."""
        f1, f2 = self._features(torch.cat([x1, x2]), torch.cat([s1, s2])).chunk(2)
        return self.projector(f1), self.projector(f2)

    def _features(self, x: torch.Tensor, saliency: torch.Tensor) -> torch.Tensor:
        keep = None
        if self.mask_ratio is not None:
            patch = int(self.encoder.patch_embed.patch_size[0])
            keep = salient_token_indices(saliency, patch, self.mask_ratio, self.pool)
        # Weights stay fp32; under autocast the matmuls run in the training precision, like the query's.
        return encode(self.encoder, x, keep)[:, 0]


def compensated_update(
    mine: list[torch.Tensor],
    theirs: list[torch.Tensor],
    increment: list[torch.Tensor],
    scratch: list[torch.Tensor],
    weight: float | torch.Tensor,
) -> None:
    """mine <- mine + (1 - m)(theirs - mine) with Kahan compensation, `weight` = m - 1 (a 0-dim tensor
    when compiled). `increment` holds the compensation between calls, `scratch` is working space.

    Seven passes of `torch._foreach_*` ops over flat lists and no allocation: a per-step allocation of
    the network's size costs page faults on a CPU every step (glibc maps large blocks afresh)."""
    torch._foreach_copy_(scratch, mine)
    torch._foreach_sub_(scratch, theirs)  # mine - theirs
    if isinstance(weight, torch.Tensor):
        torch._foreach_mul_(scratch, weight)
        torch._foreach_add_(increment, scratch)
    else:
        torch._foreach_add_(increment, scratch, alpha=weight)  # (1 - m)(theirs - mine) + compensation
    torch._foreach_copy_(scratch, mine)
    torch._foreach_add_(mine, increment)
    torch._foreach_sub_(scratch, mine)  # -(what the addition really applied)
    torch._foreach_add_(increment, scratch)  # the rounding the addition dropped: next step's compensation
