"""BatchNorm over the global batch on every backend.

MoCo v3 normalises projector and predictor activations with statistics of the whole global batch.
torch's SyncBatchNorm does that on CUDA only (on CPU it raises "expected input tensor to be on GPU"), so
CPU runs with several ranks use CrossRankBatchNorm1d: the same arithmetic, with the per-feature sums
all-reduced (differentiably) over gloo. On one process both reduce to nn.BatchNorm1d.
"""

from __future__ import annotations

import torch
from torch import nn

from ssit_dist.dist import sum_over_ranks_differentiable, world_size


class CrossRankBatchNorm1d(nn.BatchNorm1d):
    """nn.BatchNorm1d whose training statistics are those of the batch concatenated across ranks."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        x32 = x.float()  # statistics in fp32 whatever the autocast dtype
        stats = torch.cat([x32.sum(0), (x32 * x32).sum(0), x32.new_tensor([x.shape[0]])])
        stats = sum_over_ranks_differentiable(stats)
        features = x.shape[1]
        count = stats[-1]
        mean = stats[:features] / count
        var = stats[features : 2 * features] / count - mean * mean
        if self.track_running_stats and self.running_mean is not None and self.running_var is not None:
            with torch.no_grad():
                assert self.num_batches_tracked is not None  # tracked statistics come with the counter
                self.num_batches_tracked += 1
                factor = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * count / (count - 1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        out = (x32 - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            out = out * self.weight + self.bias
        return out.to(x.dtype)


def convert_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """Make every BatchNorm1d in `module` use global-batch statistics: SyncBatchNorm on CUDA,
    CrossRankBatchNorm1d elsewhere. Weights and running statistics are kept."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            replacement = CrossRankBatchNorm1d(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            replacement.load_state_dict(child.state_dict())
            setattr(module, name, replacement.to(next(child.buffers()).device))
        else:
            convert_batchnorm(child, device_type)
    return module
