"""Bytes each rank sends per optimizer step, by collective kind, and host syncs per step; prints JSON.

Real DeepSpeed engines of SSiT ViT-S/16 on CPU ranks (gloo), world 2 and 4, with the shipped DeepSpeed
configs of each ZeRO stage (zero0_fp32, zero1_bf16, zero2_bf16, zero3_bf16), run the trainer's own
`train_step` on random views (64 px: the collectives' sizes depend on the parameters, not the image).
Every torch.distributed collective is wrapped and attributed by its caller:

- ema: the momentum network's update (dist.gather_partitions under ZeRO 1-3; dist.full_fp32_parameters
  where it falls back),
- batchnorm: the cross-rank BatchNorm statistics (dist._SumOverRanks, forward and backward),
- loss_gathers: the contrastive loss's key gathers (dist.all_gather_cat),
- gradients / parameters: DeepSpeed's reductions (all_reduce, reduce_scatter, reduce) and its
  all-gathers and broadcasts of parameters,

and counted as the bytes a rank sends under ring algorithms: all-reduce 2(W-1)/W of the tensor,
all-gather and reduce-scatter (W-1)/W of the whole, broadcast and reduce the tensor. Host syncs are the
calls that read a tensor's value on the host (`item`, `tolist`, `cpu`, `numpy`, `bool`, `float`, `int`)
inside `train_step`, by the caller's package (`--where`: by its file and line), and the calls that
synchronise a stream on a GPU only (DeepSpeed's per-parameter ZeRO-3 fp32 accessor). Targets (issues 23, 34):
ema at most 0.5 x gradients where gradients are all-reduced (ZeRO 0-2; ZeRO-3 reduce-scatters them, half
the bytes, and a bf16 all-gather of the mirrored parameters cannot be less than about that), no host read
per parameter. The engine is built as the trainer builds it (`OnlineNetwork.optimizer_groups`). Two
warm-up steps (ZeRO-3 records its parameter trace over the first two and checks it across ranks once,
with one host read per parameter), then `--steps` measured.

Usage: python bench/perf/collectives.py [--worlds 2 4] [--stages 0 1 2 3] [--steps 2] [--where]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

SHIPPED = {0: "zero0_fp32", 1: "zero1_bf16", 2: "zero2_bf16", 3: "zero3_bf16"}
COLLECTIVES = {  # name -> share of the (largest) tensor a rank sends, as a function of the world size
    "all_reduce": lambda w: 2 * (w - 1) / w,
    "all_gather": lambda w: (w - 1) / w,
    "all_gather_into_tensor": lambda w: (w - 1) / w,
    "_all_gather_base": lambda w: (w - 1) / w,
    "reduce_scatter": lambda w: (w - 1) / w,
    "reduce_scatter_tensor": lambda w: (w - 1) / w,
    "_reduce_scatter_base": lambda w: (w - 1) / w,
    "broadcast": lambda w: 1.0,
    "reduce": lambda w: 1.0,
}
WARMUP = 2
TRANSFERS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")
OURS = {
    "full_fp32_parameters": "ema",
    "gather_partitions": "ema",
    "_SumOverRanks": "batchnorm",
    "all_gather_cat": "loss_gathers",
}


def _kind(name: str) -> str:
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_filename.endswith(os.path.join("ssit_dist", "dist.py")):
            for marker, kind in OURS.items():
                if marker in code.co_qualname:
                    return kind
        frame = frame.f_back  # type: ignore[assignment]
    return "parameters" if name.startswith(("all_gather", "_all_gather", "broadcast")) else "gradients"


def _tensor_bytes(args: tuple, kwargs: dict) -> int:
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    tensors += [t for a in (*args, *kwargs.values()) if isinstance(a, list) for t in a if isinstance(t, torch.Tensor)]
    return max((t.numel() * t.element_size() for t in tensors), default=0)


def _wrap(sent: Counter, calls: Counter, world: int, active: list[bool]) -> None:
    for module in (torch_dist, torch_dist.distributed_c10d):
        for name, share in COLLECTIVES.items():
            original = getattr(module, name, None)
            if original is None or getattr(original, "_counted", False):
                continue

            def counted(*args, _original=original, _name=name, _share=share, **kwargs):  # type: ignore[no-untyped-def]
                if active[0]:
                    kind = _kind(_name)
                    size = _tensor_bytes(args, kwargs)
                    if _name.startswith(("all_gather", "_all_gather")) and args and isinstance(args[0], list):
                        size *= world  # a list of outputs: the whole is world times one part
                    sent[kind] += int(size * _share(world))
                    calls[kind] += 1
                return _original(*args, **kwargs)

            counted._counted = True  # type: ignore[attr-defined]
            setattr(module, name, counted)


def _count_host_reads(reads: Counter, active: list[bool], where: bool) -> None:
    for name in TRANSFERS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, _name=name, **kwargs):  # type: ignore[no-untyped-def]
            if active[0]:
                frame = sys._getframe(1)
                caller = frame.f_code.co_filename
                package = next(
                    (p for p in ("ssit_dist", "deepspeed", "torch") if f"{os.sep}{p}{os.sep}" in caller), "other"
                )
                at = f":{caller.split(f'{os.sep}{package}{os.sep}')[-1]}:{frame.f_lineno}" if where else ""
                reads[f"{package}:{_name}{at}"] += 1
            return _original(self, *args, **kwargs)

        setattr(torch.Tensor, name, counted)


def _count_gpu_syncs(optimizer: object, reads: Counter, active: list[bool]) -> None:
    """Calls that synchronise a stream on a GPU and nothing on CPU ranks, so that no tensor read shows
    them here: DeepSpeed's ZeRO-3 accessor of one parameter's fp32 partition."""
    accessor = getattr(optimizer, "_get_fp32_opt_state_partition", None)
    if accessor is None:
        return

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        if active[0]:
            reads["deepspeed:stream_sync_on_gpu:_get_fp32_opt_state_partition"] += 1
        return accessor(*args, **kwargs)

    optimizer._get_fp32_opt_state_partition = counted  # type: ignore[attr-defined]


def _rank(rank: int, world: int, port: int, stage: int, steps: int, out: str, where: bool) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ.update(MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import deepspeed

    from ssit_dist.config import PretrainConfig, deepspeed_config
    from ssit_dist.dist import init_process_group, shutdown
    from ssit_dist.models.batchnorm import convert_batchnorm
    from ssit_dist.models.ssit import SSiT
    from ssit_dist.train.pretrain_step import train_step

    sent: Counter = Counter()
    calls: Counter = Counter()
    reads: Counter = Counter()
    active = [False]
    _wrap(sent, calls, world, active)
    _count_host_reads(reads, active, where)
    device = init_process_group(600)
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = PretrainConfig(global_batch=2 * world)
    cfg.model.img_size = 64
    ds = deepspeed_config(SHIPPED[stage], cfg, world)
    torch.manual_seed(0)
    model = SSiT(cfg.model)
    convert_batchnorm(model)
    parameters = sum(p.numel() for p in model.online.parameters())  # before ZeRO-3 partitions them
    groups = model.online.optimizer_groups()
    mirrored = sum(p.numel() for p in groups[0]["params"])  # what the momentum network averages
    engine, *_ = deepspeed.initialize(model=model.online, model_parameters=groups, config=ds)
    momentum = model.momentum.to(device)
    _count_gpu_syncs(engine.optimizer, reads, active)
    precision = torch.bfloat16 if engine.bfloat16_enabled() else None
    generator = torch.Generator().manual_seed(rank)
    views = [torch.randn(2, 3, 64, 64, generator=generator) for _ in range(2)]
    maps = [torch.rand(2, 1, 64, 64, generator=generator) for _ in range(2)]
    batch = (views[0], views[1], maps[0], maps[1])
    try:
        for step in range(steps + WARMUP):
            active[0] = step >= WARMUP
            train_step(engine, momentum, [batch], 0.99, 1.0, 10.0, precision)
        active[0] = False
        Path(out, f"rank{rank}.json").write_text(
            json.dumps(
                {"sent": sent, "calls": calls, "reads": reads, "online_parameters": parameters, "mirrored": mirrored}
            )
        )
    finally:
        shutdown()


def measure(world: int, stage: int, steps: int, where: bool) -> dict:
    from ssit_dist.dist import free_port

    with tempfile.TemporaryDirectory() as out:
        args = (world, free_port(), stage, steps, out, where)
        mp.start_processes(_rank, args=args, nprocs=world, start_method="spawn")
        ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]
    sent = {
        k: round(sum(r["sent"].get(k, 0) for r in ranks) / world / steps)
        for k in sorted({k for r in ranks for k in r["sent"]})
    }
    reads: Counter = Counter()
    for r in ranks:
        reads.update(r["reads"])
    return {
        "world": world,
        "zero_stage": stage,
        "ds_config": SHIPPED[stage],
        "online_parameters": ranks[0]["online_parameters"],
        "mirrored_parameters": ranks[0]["mirrored"],
        "sent_bytes_per_rank_per_step": sent,
        "ema_over_gradients": round(sent.get("ema", 0) / sent["gradients"], 3) if sent.get("gradients") else None,
        "host_syncs_per_step": {k: v / world / steps for k, v in sorted(reads.items())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--where", action="store_true", help="host reads by file and line, not by package")
    args = parser.parse_args()
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    runs = [measure(world, stage, args.steps, args.where) for world in args.worlds for stage in args.stages]
    print(json.dumps({"cpu": cpu, "model": "vit_small_patch16_224 (SSiT, 64 px views)", "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
