"""The momentum network's source of truth under DeepSpeed ZeRO-3: full fp32 parameters from shards.

Two real gloo ranks, a real DeepSpeed engine with ZeRO stage 3 partitioning the online network.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.multiprocessing as mp

from ssit_dist.dist import free_port, full_fp32_parameters
from ssit_dist.models.ssit import ModelConfig, SSiT
from ssit_dist.train.step import train_step

TINY = ModelConfig(
    arch="vit_small_patch16_224",
    img_size=32,
    timm_kwargs=dict(patch_size=8, embed_dim=48, depth=1, num_heads=3),
    proj_hidden=64,
    proj_dim=32,
)


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = SSiT(TINY)
    original = [p.detach().clone() for m in model.online.ema_source() for p in m.parameters()]
    optimizer = torch.optim.AdamW(model.online.parameters(), lr=1e-2)
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    }
    engine, _, _, _ = deepspeed.initialize(model=model.online, optimizer=optimizer, config=config)
    sharded = [p for m in engine.module.ema_source() for p in m.parameters()]
    shard_sizes = [p.numel() for p in sharded]  # 0 under ZeRO-3: the module holds no full weights

    full = [t.clone() for t in full_fp32_parameters(engine.module.encoder)]
    full += [t.clone() for t in full_fp32_parameters(engine.module.projector)]

    g = torch.Generator().manual_seed(rank)
    x1, x2 = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)
    s1, s2 = torch.rand(2, 1, 32, 32, generator=g), torch.rand(2, 1, 32, 32, generator=g)
    # The trainer's step, twice: its momentum update (from the full fp32 weights, before the engine's
    # step) moves the momentum network at the second step, once the weights have changed.
    for _ in range(2):
        train_step(engine, model.momentum, [(x1, x2, s1, s2)], 0.5, 1.0, 1.0)
    torch.save(
        {
            "original": original,
            "full": full,
            "shard_sizes": shard_sizes,
            "momentum_after": [p.detach().clone() for p in model.momentum.parameters()],
        },
        f"{out}/rank{rank}.pt",
    )


def test_full_fp32_parameters_reassemble_zero3_shards(tmp_path: Path) -> None:
    mp.start_processes(_worker, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r in ranks:
        assert sum(r["shard_sizes"]) == 0, "ZeRO-3 did not partition the parameters"
        assert len(r["full"]) == len(r["original"])
        for full, original in zip(r["full"], r["original"], strict=True):
            assert full.dtype == torch.float32 and full.shape == original.shape
            torch.testing.assert_close(full, original, rtol=0, atol=0)
    # Both ranks moved their momentum networks identically, away from the start.
    for a, b in zip(ranks[0]["momentum_after"], ranks[1]["momentum_after"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    after, start = ranks[0]["momentum_after"], ranks[0]["original"]
    moved = max((a - s).abs().max().item() for a, s in zip(after, start, strict=True))
    assert moved > 1e-4
