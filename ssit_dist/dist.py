"""Distributed plumbing: ranks, gathering keys, and the full fp32 view of (possibly sharded) parameters."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import torch
import torch.distributed as torch_dist
from torch import nn


def free_port() -> int:
    """A TCP port free on this machine now: several runs on one machine must not collide on 29500."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_distributed() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def rank() -> int:
    return torch_dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return torch_dist.get_world_size() if is_distributed() else 1


@torch.no_grad()
def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate `tensor` from every rank along dim 0, in rank order; no gradient flows back."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    torch_dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def full_fp32_parameters(module: nn.Module) -> Iterator[torch.Tensor]:
    """Every parameter of `module`, whole and in fp32, in `module.parameters()` order.

    Plain modules yield their own tensors (cast where not fp32). Under DeepSpeed the full fp32 master
    copy is assembled from the optimizer's partitions (ZeRO 1-3, mixed precision), or, for a ZeRO-3
    parameter without a master mapping, gathered from its shards. Collective: every rank must call it.
    """
    for param in module.parameters():
        if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
            from deepspeed.utils import safe_get_full_fp32_param

            full = safe_get_full_fp32_param(param)
            if full is None:  # not (yet) mapped by an optimizer, e.g. a frozen ZeRO-3 parameter
                import deepspeed

                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    full = param.detach().float().clone()
            yield full
        else:
            yield param.detach() if param.dtype == torch.float32 else param.detach().float()
