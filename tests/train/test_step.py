"""train_step and PlainEngine: gradient accumulation steps the optimizer once per step, the momentum
network moves before the keys are computed, and the losses come back as device tensors."""

from __future__ import annotations

import pytest
import torch

from ssit_dist.models.model_config import ModelConfig
from ssit_dist.models.ssit import SSiT
from ssit_dist.train.pretrain_step import PlainEngine, train_step

TINY = ModelConfig(
    arch="vit_small_patch16_224",
    img_size=32,
    proj_hidden=32,
    proj_dim=16,
    timm_kwargs=dict(patch_size=8, embed_dim=24, depth=1, num_heads=2),
)


def pairs(n: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 3, 32, 32, generator=g),
        torch.randn(n, 3, 32, 32, generator=g),
        torch.rand(n, 1, 32, 32, generator=g),
        torch.rand(n, 1, 32, 32, generator=g),
    )


def test_accumulation_steps_once_and_averages_the_losses() -> None:
    torch.manual_seed(0)
    model = SSiT(TINY)
    engine = PlainEngine(model.online, torch.optim.SGD(model.online.parameters(), lr=0.1), accumulation=2)
    start = [p.detach().clone() for p in model.online.parameters()]
    seen: list[bool] = []

    def micro_batches():  # records, before the second micro batch, whether the weights moved yet
        yield pairs(4, 1)
        seen.append(all(torch.equal(a, b) for a, b in zip(start, model.online.parameters(), strict=True)))
        yield pairs(4, 2)

    losses = train_step(engine, model.momentum, micro_batches(), 0.99, 1.0, 10.0)
    assert seen == [True]  # no optimizer step after the first micro batch
    # One optimizer step after the second micro batch.
    assert not all(torch.equal(a, b) for a, b in zip(start, model.online.parameters(), strict=True))
    assert losses.contrastive.dim() == 0 and isinstance(losses.contrastive, torch.Tensor)


def test_the_momentum_network_moves_before_the_keys() -> None:
    torch.manual_seed(0)
    model = SSiT(TINY)
    with torch.no_grad():
        for p in model.online.parameters():
            p.add_(0.5)
    before = [p.detach().clone() for p in model.momentum.parameters()]
    engine = PlainEngine(model.online, torch.optim.SGD(model.online.parameters(), lr=0.0))
    keys_from: list[list[torch.Tensor]] = []
    hook = model.momentum.encoder.patch_embed.register_forward_pre_hook(  # the keys' first layer
        lambda *_: keys_from.append([p.detach().clone() for p in model.momentum.parameters()])
    )
    train_step(engine, model.momentum, [pairs(4, 1)], 0.9, 1.0, 1.0)
    hook.remove()
    assert not torch.equal(keys_from[0][0], before[0])  # keys came from the updated momentum network


def test_no_micro_batch_is_an_error() -> None:
    model = SSiT(TINY)
    engine = PlainEngine(model.online, torch.optim.SGD(model.online.parameters(), lr=0.0))
    with pytest.raises(ValueError, match="no micro batch"):
        train_step(engine, model.momentum, [], 0.99, 1.0, 10.0)
