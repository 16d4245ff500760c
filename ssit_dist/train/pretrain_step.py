"""One SSiT optimizer step, written once: the DeepSpeed trainer, bench/perf/model_step.py, the ZeRO test and
the reference-parity test all run `train_step`.

The reference's semantics, in order:
1. move the fp32 momentum network towards the query encoder and projector by `momentum` (before the keys:
   the keys come from the updated momentum network);
2. per micro batch: keys of each view from its most salient patches (no gradient), the symmetric
   contrastive loss and the saliency loss through the trainable side, weighted, backward, step.

The trainable side is an "engine": DeepSpeed's engine, or `PlainEngine` (a torch optimizer behind the
same three calls) where no DeepSpeed is wanted. Both scale the loss by 1 / gradient accumulation in
`backward` and take the optimizer step at the last micro batch of the step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from ssit_dist.dist import flat_master, full_fp32_parameters
from ssit_dist.models.momentum import MomentumNetwork
from ssit_dist.models.ssit import OnlineNetwork

Views = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # x1, x2, saliency 1, saliency 2, on the device


class Engine(Protocol):
    module: OnlineNetwork

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...
    def backward(self, loss: torch.Tensor) -> Any: ...
    def step(self) -> Any: ...


class PlainEngine:
    """A torch optimizer behind DeepSpeed's engine calls: `backward` scales the loss by 1 /
    `accumulation`, `step` clips and steps at every `accumulation`-th call. Gradients are cleared at
    the first backward of a step, so after a step they can still be read."""

    def __init__(
        self, module: nn.Module, optimizer: torch.optim.Optimizer, accumulation: int = 1, clip_grad: float | None = 1.0
    ):
        self.module, self.optimizer, self.accumulation, self.clip_grad = module, optimizer, accumulation, clip_grad
        self._micro = 0

    def __call__(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.module(*inputs)

    def backward(self, loss: torch.Tensor) -> None:
        if self._micro == 0:
            self.optimizer.zero_grad(set_to_none=True)
        (loss / self.accumulation).backward()

    def step(self) -> None:
        self._micro += 1
        if self._micro < self.accumulation:
            return
        self._micro = 0
        if self.clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.clip_grad)
        self.optimizer.step()


@dataclass(frozen=True)
class StepLosses:
    """Mean losses over the step's micro batches, still on the device (reading them syncs the host)."""

    contrastive: torch.Tensor
    saliency: torch.Tensor


def update_momentum(engine: Engine, momentum_net: MomentumNetwork, m: float, dtype: torch.dtype) -> None:
    """Collective. The momentum network follows the query side's fp32 weights: under ZeRO 1, 2 and 3
    from each rank's own master partition with one all-gather in `dtype` (the training precision),
    otherwise from the full fp32 weights (ZeRO-0 and plain modules, see full_fp32_parameters)."""
    sources = engine.module.ema_source()
    optimizer = getattr(engine, "optimizer", None)
    params = [p for module in sources for p in module.parameters()]
    master = flat_master(optimizer, params) if optimizer is not None else None
    if master is not None:
        momentum_net.update_partition(master, m, dtype)
    else:
        momentum_net.update(full_fp32_parameters(*sources), m)


def train_step(
    engine: Engine,
    momentum_net: MomentumNetwork,
    micro_batches: Iterable[Views],
    momentum: float,
    contrastive_weight: float,
    saliency_weight: float,
    precision: torch.dtype | None = None,
) -> StepLosses:
    """One optimizer step over `micro_batches` (as many as the engine accumulates), on the device the
    batches are on. `precision`: autocast dtype (bf16 / fp16) or None for fp32."""
    update_momentum(engine, momentum_net, momentum, precision or torch.float32)
    contrastive_sum: torch.Tensor | float = 0.0
    saliency_sum: torch.Tensor | float = 0.0
    count = 0
    for x1, x2, s1, s2 in micro_batches:
        device_type = x1.device.type
        autocast = torch.autocast(device_type, dtype=precision) if precision is not None else contextlib.nullcontext()
        with autocast:
            if precision is not None:  # the views enter the engine in its precision; saliency stays fp32
                x1, x2 = x1.to(precision), x2.to(precision)
            k1, k2 = momentum_net.pair_keys(x1, s1, x2, s2)
            contrastive, saliency = engine(x1, x2, s1, s2, k1, k2)
            loss = contrastive_weight * contrastive + saliency_weight * saliency
        engine.backward(loss)
        engine.step()
        contrastive_sum = contrastive_sum + contrastive.detach().float()
        saliency_sum = saliency_sum + saliency.detach().float()
        count += 1
    if count == 0:
        raise ValueError("train_step got no micro batch")
    return StepLosses(contrastive_sum / count, saliency_sum / count)  # type: ignore[arg-type]
