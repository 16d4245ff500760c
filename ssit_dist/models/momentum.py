"""The momentum (key) network: an fp32 exponential moving average of the query encoder and projector.

It lives outside any training engine on purpose: inside DeepSpeed's bf16 engine it would be cast to
bf16, where the (1 - m) updates round away (at m = 0.99 the rounding error exceeds the whole EMA
movement). Two ways to update it, the same fp32 arithmetic element by element:
- `update`, from the full fp32 parameters (`ssit_dist.dist.full_fp32_parameters`: ZeRO-0 and plain
  modules);
- `update_partition` under ZeRO 1, 2 and 3, where each rank's optimizer holds the fp32 master of one
  partition of the parameters (`ssit_dist.dist.FlatMaster` says how they are laid out): each rank keeps
  the fp32 average of its own partition only, updates it locally, and one all-gather in the training
  precision gives every rank the weights the keys are computed with (the key encoder runs under
  autocast anyway). Where the all-reduce of the whole fp32 network sent 2(W-1)/W x 4 bytes per
  parameter (the all-gather of ZeRO-3's fp32 partitions (W-1)/W x 4), this sends (W-1)/W x 2 in bf16,
  for the query encoder and projector only: the trainer gives them an optimizer group of their own
  (`OnlineNetwork.optimizer_groups`), so the predictor's and saliency head's partitions are not sent.
  `materialize` gathers the exact fp32 average back into the parameters before a checkpoint.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ssit_dist.data.salient_patches import salient_token_indices
from ssit_dist.dist import FlatMaster, gather_partitions
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
        # update_partition's state: this rank's fp32 average and compensation, one flat tensor per
        # (sub)group, laid out as the optimizer's master partitions (None: build from the parameters).
        self._master: FlatMaster | None = None
        self._average: list[torch.Tensor] | None = None
        self._average_compensation: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, source: Iterable[torch.Tensor], m: float) -> None:
        """self <- m * self + (1 - m) * source, for the query encoder's and projector's full fp32
        parameters in `parameters()` order (buffers are not averaged, as in MoCo v3)."""
        mine: list[torch.Tensor] = list(self.parameters())
        theirs = [t.to(p.device, torch.float32) for p, t in zip(mine, source, strict=True)]
        if self._compensation[0].device != mine[0].device:
            self._compensation = [c.to(mine[0].device) for c in self._compensation]
        self._follow(mine, theirs, self._compensation, m)

    @torch.no_grad()
    def update_partition(self, master: FlatMaster, m: float, dtype: torch.dtype) -> None:
        """`update` under ZeRO 1, 2 and 3: this rank's partition of the fp32 average follows `master`
        (the optimizer's fp32 master partitions of the query encoder and projector, `master.places` in
        `parameters()` order), locally and with no host read, then one all-gather per group in `dtype`
        sets the parameters. Collective: every rank calls it."""
        mine: list[torch.Tensor] = list(self.parameters())
        if self._average is None or self._master is None or not self._master.same_layout(master):
            self._average = self._partition(master, mine)
            self._average_compensation = self._partition(master, self._compensation, fill=0.0)
        self._master = master
        self._follow(self._average, master.partitions, self._average_compensation, m)
        master.copy_into(gather_partitions(master, self._average, dtype, mine[0].device), mine)

    @torch.no_grad()
    def materialize(self) -> None:
        """Collective where `update_partition` ran: the exact fp32 average and its compensation, gathered
        from every rank, into the parameters and `get_extra_state` (a checkpoint must hold them, not the
        training-precision copy). A no-op otherwise."""
        if self._average is None or self._master is None:
            return
        mine: list[torch.Tensor] = list(self.parameters())
        device = mine[0].device
        self._master.copy_into(gather_partitions(self._master, self._average, torch.float32, device), mine)
        compensation = gather_partitions(self._master, self._average_compensation, torch.float32, device)
        self._master.copy_into(compensation, self._compensation)

    def _partition(self, master: FlatMaster, full: list[torch.Tensor], fill: float | None = None) -> list[torch.Tensor]:
        """This rank's partition of `full` (tensors in `parameters()` order) laid out as `master.partitions`:
        positions no tensor covers (padding; other parameters where they share a group) take the master's
        values, or `fill`."""
        parts = [t.detach().clone() if fill is None else torch.full_like(t, fill) for t in master.partitions]
        master.scatter(full, parts)
        return parts

    def _follow(
        self, mine: list[torch.Tensor], theirs: list[torch.Tensor], compensation: list[torch.Tensor], m: float
    ) -> None:
        """mine <- m * mine + (1 - m) * theirs, compensated (`compensated_update`)."""
        scratch = self._scratch
        if (
            scratch is None
            or scratch[0].device != mine[0].device
            or [t.shape for t in scratch] != [t.shape for t in mine]
        ):
            scratch = self._scratch = [torch.empty_like(t) for t in mine]
        if self._compiled is None:
            compensated_update(mine, theirs, compensation, scratch, m - 1.0)
        else:  # the weight as a tensor on the device: a new m every step must not recompile (or sync)
            if self._weight.device != mine[0].device:
                self._weight = self._weight.to(mine[0].device)
            self._compiled(mine, theirs, compensation, scratch, self._weight.fill_(m - 1.0))

    def compile_update(self) -> None:
        """Fuse `update`'s seven passes into one per tensor (inductor): for ViT-S's 41 M averaged
        parameters 74 -> 23 ms on 2 CPU cores, the same parameters (to the last bit, where a compiler
        contracts a multiply-add)."""
        self._compiled = torch.compile(compensated_update)

    def get_extra_state(self) -> dict[str, list[torch.Tensor]]:
        return {"compensation": self._compensation}

    def set_extra_state(self, state: dict[str, list[torch.Tensor]]) -> None:
        self._compensation = [c.clone() for c in state["compensation"]]
        self._average = None  # loaded parameters: update_partition rebuilds its partition from them

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
