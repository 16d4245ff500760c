"""The momentum network's source of truth under DeepSpeed ZeRO: full fp32 parameters from partitions,
and under ZeRO 1, 2 and 3 the momentum network's own partitioned update, exactly the full update's, with
one all-gather per step in the training precision of the query encoder's and projector's group alone.

Two real gloo ranks, a real DeepSpeed engine around the online network with the trainer's optimizer
groups: ZeRO stage 1 in bf16 (DeepSpeed's bf16 optimizer), 2 (fp32 master fragments) or 3 (parameters
partitioned too) in fp32 and bf16.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from gloo_ranks import start_ranks
from ssit_dist.dist import free_port, full_fp32_parameters
from ssit_dist.models.batchnorm import convert_batchnorm
from ssit_dist.models.model_config import ModelConfig
from ssit_dist.models.ssit import SSiT
from ssit_dist.train.pretrain_step import train_step

pytestmark = pytest.mark.multiprocess

COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "all_gather", "broadcast", "reduce_scatter_tensor")
TINY = ModelConfig(
    arch="vit_small_patch16_224",
    img_size=32,
    timm_kwargs=dict(patch_size=8, embed_dim=48, depth=1, num_heads=3),
    proj_hidden=64,
    proj_dim=32,
)


@contextlib.contextmanager
def counting_collectives() -> Iterator[list[tuple[str, str, int, torch.dtype]]]:
    """The torch.distributed collectives called inside the block, in order: name, calling function, and
    the elements and dtype of the first tensor (the output of an all-gather)."""
    seen: list[tuple[str, str, int, torch.dtype]] = []
    originals = {name: getattr(torch.distributed, name) for name in COLLECTIVES}

    def counted(name: str, call: Callable) -> Callable:
        def wrapper(*args: object, **kwargs: object) -> object:
            tensor = args[0] if args else next(iter(kwargs.values()), None)
            numel, dtype = (tensor.numel(), tensor.dtype) if isinstance(tensor, torch.Tensor) else (0, None)
            seen.append((name, sys._getframe(1).f_code.co_name, numel, dtype))
            return call(*args, **kwargs)

        return wrapper

    for name, call in originals.items():
        setattr(torch.distributed, name, counted(name, call))
    try:
        yield seen
    finally:
        for name, call in originals.items():
            setattr(torch.distributed, name, call)


def _worker(rank: int, port: int, out: str, stage: int, bf16: bool) -> None:
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
    convert_batchnorm(model)  # as the trainer does: BatchNorm over both ranks, taking bf16 weights
    original = [p.detach().clone() for m in model.online.ema_source() for p in m.parameters()]
    optimizer = torch.optim.AdamW(model.online.optimizer_groups(), lr=1e-2)  # as the trainer builds it
    config = {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
    }
    if stage < 3:
        config["zero_optimization"] = {"stage": stage}
    if bf16:
        config["bf16"] = {"enabled": True}
    reference = copy.deepcopy(model.momentum)  # updated the plain way: from the full fp32 weights
    engine, _, _, _ = deepspeed.initialize(model=model.online, optimizer=optimizer, config=config)
    sharded = [p for m in engine.module.ema_source() for p in m.parameters()]
    shard_sizes = [p.numel() for p in sharded]  # 0 under ZeRO-3: the module holds no full weights

    with counting_collectives() as collectives:
        full = [t.clone() for t in full_fp32_parameters(engine.module.encoder, engine.module.projector)]

    g = torch.Generator().manual_seed(rank)
    x1, x2 = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 32, 32, generator=g)
    s1, s2 = torch.rand(2, 1, 32, 32, generator=g), torch.rand(2, 1, 32, 32, generator=g)
    # DeepSpeed's per-parameter fp32 accessor synchronises a stream at each call on a GPU (not on CPU
    # ranks, so the calls are counted): the trainer's step must not use it.
    accessor_calls = [0]
    if stage == 3:
        accessor = engine.optimizer._get_fp32_opt_state_partition

        def counted_accessor(*args: object, **kwargs: object) -> object:
            accessor_calls[0] += 1
            return accessor(*args, **kwargs)

        engine.optimizer._get_fp32_opt_state_partition = counted_accessor
    # The trainer's step, twice: its momentum update (from the full fp32 weights, before the engine's
    # step) moves the momentum network at the second step, once the weights have changed.
    steps = []
    for _ in range(2):
        reference.update(full_fp32_parameters(*engine.module.ema_source()), 0.5)
        calls_before = accessor_calls[0]
        with counting_collectives() as step_collectives:
            train_step(engine, model.momentum, [(x1, x2, s1, s2)], 0.5, 1.0, 1.0, torch.bfloat16 if bf16 else None)
        steps.append({"collectives": step_collectives, "accessor_calls": accessor_calls[0] - calls_before})
    partitioned = model.momentum._average is not None
    model.momentum.materialize()
    torch.save(
        {
            "partitioned": partitioned,
            "exact": [p.detach().clone() for p in model.momentum.parameters()],
            "reference": [p.detach().clone() for p in reference.parameters()],
            "compensation": model.momentum.get_extra_state()["compensation"],
            "reference_compensation": reference.get_extra_state()["compensation"],
            "original": original,
            "full": full,
            "shard_sizes": shard_sizes,
            "collectives": [name for name, *_ in collectives],
            "ema_gathers": [
                [
                    (numel, str(dtype))
                    for _, caller, numel, dtype in step["collectives"]
                    if caller == "gather_partitions"
                ]
                for step in steps
            ],
            "accessor_calls": [step["accessor_calls"] for step in steps],
            "ema_numel": sum(t.numel() for t in original),
            "online_numel": sum(getattr(p, "ds_numel", p.numel()) for p in model.online.parameters()),
        },
        f"{out}/rank{rank}.pt",
    )


@pytest.mark.parametrize("stage, bf16", [(1, True), (2, False), (3, False), (3, True)])
def test_full_fp32_parameters_reassemble_the_master_in_one_collective(tmp_path: Path, stage: int, bf16: bool) -> None:
    args = (free_port(), str(tmp_path), stage, bf16)
    start_ranks(_worker, args)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for r in ranks:
        # One collective for every parameter tensor of the encoder and projector, not one each.
        assert r["collectives"] == ["all_gather_into_tensor" if stage == 3 else "all_reduce"], r["collectives"]
        assert stage < 3 or sum(r["shard_sizes"]) == 0, "ZeRO-3 did not partition the parameters"
        assert len(r["full"]) == len(r["original"])
        for full, original in zip(r["full"], r["original"], strict=True):
            assert full.dtype == torch.float32 and full.shape == original.shape
            # A bf16 engine keeps its fp32 master from the bf16 weights it was given.
            torch.testing.assert_close(full, original.bfloat16().float() if bf16 else original, rtol=0, atol=0)
        # Each rank averaged its own partition, and the gathered fp32 average is the plain update's to
        # the last bit, compensation included.
        assert r["partitioned"]
        # One all-gather a step, in the training precision, of the query encoder's and projector's group:
        # their parameters and the partitions' padding, none of the predictor's and saliency head's.
        dtype = str(torch.bfloat16 if bf16 else torch.float32)
        for gathers in r["ema_gathers"]:
            assert len(gathers) == 1 and gathers[0][1] == dtype, gathers
            assert r["ema_numel"] <= gathers[0][0] < r["ema_numel"] + 64, (gathers, r["ema_numel"], r["online_numel"])
        assert r["online_numel"] - r["ema_numel"] > 64
        assert r["accessor_calls"] == [0, 0]
        for name in ("exact", "compensation"):
            for ours, plain in zip(
                r[name], r["reference" if name == "exact" else "reference_compensation"], strict=True
            ):
                torch.testing.assert_close(ours, plain, rtol=0, atol=0)
    # Both ranks moved their momentum networks identically, away from the start.
    for a, b in zip(ranks[0]["exact"], ranks[1]["exact"], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    after, start = ranks[0]["exact"], ranks[0]["original"]
    moved = max((a - s).abs().max().item() for a, s in zip(after, start, strict=True))
    assert moved > 1e-4
