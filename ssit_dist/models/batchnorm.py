"""BatchNorm over the global batch on every backend, in fp32 whatever the training precision.

MoCo v3 normalises projector and predictor activations with statistics of the whole global batch.
CrossRankBatchNorm1d does it with one differentiable all-reduce of the per-feature sums, sums of
squares and the count, on CPU (gloo) and CUDA (NCCL) alike, a no-op on one process. Not torch's
SyncBatchNorm: it runs on CUDA only, and in every training forward with more than one rank it reads
the gathered counts on the host (a boolean-mask index in torch/nn/modules/_functions.py; pytorch
issue 78656), a device-to-host sync in each of the projector's and predictor's BatchNorms, every step.
It also takes what DeepSpeed's bf16 engine makes of a BatchNorm, bf16 weights beside fp32 running
statistics, which torch's CPU kernel refuses ("expected scalar type BFloat16 but found Float").
"""

from __future__ import annotations

import torch
from torch import nn

from ssit_dist.dist import sum_over_ranks_differentiable


class CrossRankBatchNorm1d(nn.BatchNorm1d):
    """nn.BatchNorm1d whose training statistics are those of the batch concatenated across ranks,
    computed in fp32 and returned in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        if self.training or self.running_mean is None or self.running_var is None:
            # new_full, not new_tensor: a fill on the device, not a copy from the host (a sync on CUDA).
            stats = torch.cat([x32.sum(0), (x32 * x32).sum(0), x32.new_full((1,), x.shape[0])])
            stats = sum_over_ranks_differentiable(stats)
            features = x.shape[1]
            count = stats[-1]
            mean = stats[:features] / count
            # E[x^2] - mean^2 cancels: where a feature's spread is tiny against its mean, rounding can take
            # it below zero (999.9 in every row, in fp32: -0.125), and rsqrt(var + eps) of that is NaN.
            var = (stats[features : 2 * features] / count - mean * mean).clamp_min(0)
            if self.training and self.running_mean is not None and self.running_var is not None:
                self._track(mean.detach(), var.detach() * count / (count - 1))
        else:
            mean, var = self.running_mean.float(), self.running_var.float()
        out = (x32 - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight.float() + self.bias.float()
        return out.to(x.dtype)

    @torch.no_grad()
    def _track(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        assert self.running_mean is not None and self.running_var is not None and self.num_batches_tracked is not None
        self.num_batches_tracked += 1
        factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased_var.to(self.running_var.dtype), factor)


def convert_batchnorm(module: nn.Module) -> nn.Module:
    """Make every BatchNorm1d in `module` a CrossRankBatchNorm1d (global-batch statistics), keeping its
    weights and running statistics."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            replacement = CrossRankBatchNorm1d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement.to(next(child.buffers()).device))
        else:
            convert_batchnorm(child)
    return module
