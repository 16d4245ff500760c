"""Benchmark one SSiT training step on CPU; prints one JSON object.

A step = momentum update, keys from the salient patches of both views, online forward and backward,
grad clip 1.0, AdamW. ViT-S/16 at 224, batch 8 pairs, one process, 2 threads by default, in fp32 and
under bf16 autocast. Reported per precision: pairs/s of ssit-dist's step and of a reference-style step
measured in the same run (each view through each encoder on its own, explicit softmax attention, a
per-parameter Python EMA loop, torch's default AdamW, as the reference implementation does it), the
FLOPs of one step counted with torch.utils.flop_counter, and utilisation against a matmul peak measured
in the same run.

ssit-dist's step runs as the trainer runs it on that device: attention per `model.attention=auto`
(explicit on CPUs, fused on GPUs), both views through each encoder in one pass, the allocation-free
compensated EMA, fused AdamW. `--compile` adds a measurement with the transformer blocks and the
momentum update compiled (`model.compile`), `--profile` the top operators of each step by self time (torch.profiler).

On a GPU (`--device cuda`) the same two steps run there; the peak is an 8192^3 matmul on that GPU.

Usage: python bench/model_step.py [--arch vit_small_patch16_224] [--batch 8] [--steps 5] [--threads 2] [--device cpu]
       [--compile] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from ssit_dist.info import cpu_runs_natively
from ssit_dist.models.compile import compile_model
from ssit_dist.models.losses import contrastive_loss, saliency_loss
from ssit_dist.models.ssit import ModelConfig, OnlineNetwork, SSiT
from ssit_dist.models.vit import encode
from ssit_dist.train.step import PlainEngine, train_step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(dtype: torch.dtype, device: torch.device, repeats: int = 5) -> float:
    """FLOP/s of a square matmul through F.linear, the op behind the model's linear layers."""
    n = 8192 if device.type == "cuda" else 2048
    a, b = torch.randn(n, n, dtype=dtype, device=device), torch.randn(n, n, dtype=dtype, device=device)
    torch.nn.functional.linear(a, b)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.nn.functional.linear(a, b)
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def reference_online_forward(
    online: OnlineNetwork,
    x1: torch.Tensor,
    x2: torch.Tensor,
    s1: torch.Tensor,
    s2: torch.Tensor,
    k1: torch.Tensor,
    k2: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The query side as the reference runs it (MoCo v3's forward): each view through the encoder and
    heads on its own, the same losses as `OnlineNetwork.forward`, which sends both views in one pass."""
    cfg, prefix = online.cfg, online.encoder.num_prefix_tokens
    assert online.saliency_head is not None
    queries, saliency = [], []
    for x, s in ((x1, s1), (x2, s2)):
        tokens = encode(online.encoder, x)
        queries.append(online.predictor(online.projector(tokens[:, 0])))
        saliency.append(saliency_loss(online.saliency_head(tokens[:, prefix:]), s, cfg.saliency_threshold))
    t = cfg.temperature
    return contrastive_loss(queries[0], k2, t) + contrastive_loss(queries[1], k1, t), saliency[0] + saliency[1]


def make_step(model: SSiT, reference_style: bool, bf16: bool):  # type: ignore[no-untyped-def]
    """ssit-dist's step is `train_step`, the one the trainer runs; the reference-style step is the
    baseline, written here as the reference code does it."""
    params = list(model.online.parameters())
    if not reference_style:
        engine = PlainEngine(model.online, torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, fused=True))
        precision = torch.bfloat16 if bf16 else None

        def step(x1, x2, s1, s2) -> float:  # type: ignore[no-untyped-def]
            losses = train_step(engine, model.momentum, [(x1, x2, s1, s2)], 0.99, 1.0, 10.0, precision)
            return (losses.contrastive + 10 * losses.saliency).item()

        return step

    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1)
    for block in [*model.online.encoder.blocks, *model.momentum.encoder.blocks]:
        block.attn.fused_attn = False
    sources = [p for m in model.online.ema_source() for p in m.parameters()]

    def reference_step(x1, x2, s1, s2) -> float:  # type: ignore[no-untyped-def]
        autocast = torch.autocast(x1.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            with torch.no_grad():
                for p_b, p_m in zip(sources, model.momentum.parameters(), strict=True):
                    p_m.data = p_m.data * 0.99 + p_b.data * (1.0 - 0.99)
            k1, k2 = model.momentum(x1, s1), model.momentum(x2, s2)
            cl, ss = reference_online_forward(model.online, x1, x2, s1, s2, k1, k2)
            loss = cl + 10 * ss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss.item()

    return reference_step


def top_operators(step, inputs, count: int = 12) -> list[dict]:  # type: ignore[no-untyped-def]
    """The `count` operators with the most self time over two steps, per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if inputs[0].is_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            step(*inputs)
    key = "self_device_time_total" if inputs[0].is_cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)[:count]
    return [
        {"op": e.key, "ms_per_step": round(getattr(e, key) / 2e3, 1), "calls_per_step": e.count // 2} for e in events
    ]


def measure(
    arch: str,
    batch: int,
    steps: int,
    reference_style: bool,
    bf16: bool,
    device: torch.device,
    compiled: bool = False,
    profile: bool = False,
) -> dict:
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch)
    model = SSiT(cfg).train().to(device)
    if not reference_style:
        model.use_fused_attention(cfg.fused_attention(device.type))
    if compiled:
        reason = compile_model(model.online.encoder, model.momentum, device, zero_stage=0)
        if reason is not None:
            return {"skipped": reason}
    step = make_step(model, reference_style, bf16)
    x1, x2 = (torch.randn(batch, 3, 224, 224, device=device) for _ in range(2))
    s1, s2 = (torch.rand(batch, 1, 224, 224, device=device) for _ in range(2))
    for _ in range(1 if device.type == "cpu" and not compiled else 3):
        step(x1, x2, s1, s2)  # warm-up (allocations, kernel selection, cuDNN/cuBLAS heuristics, compilation)
    with FlopCounterMode(display=False) as counter:
        step(x1, x2, s1, s2)
    flops = counter.get_total_flops()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step(x1, x2, s1, s2)
    sync(device)
    seconds = (time.perf_counter() - start) / steps
    result: dict = {
        "pairs_per_s": round(batch / seconds, 3),
        "step_s": round(seconds, 3),
        "gflop_per_step": round(flops / 1e9, 1),
        "achieved_gflop_s": round(flops / seconds / 1e9, 1),
    }
    if profile:
        result["top_operators"] = top_operators(step, (x1, x2, s1, s2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--force-bf16", action="store_true", help="Measure bf16 even without native bf16.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the step runs (threads: CPU only).")
    parser.add_argument("--compile", action="store_true", help="Also measure the step with model.compile on.")
    parser.add_argument("--profile", action="store_true", help="Add each step's top operators (torch.profiler).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    report: dict[str, object] = {
        "arch": args.arch,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch": args.batch,
        "threads": args.threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    for name, bf16 in (("fp32", False), ("bf16_autocast", True)):
        peak = matmul_peak(torch.bfloat16 if bf16 else torch.float32, device)
        if bf16 and device.type == "cpu" and not (cpu_runs_natively(torch.bfloat16) or args.force_bf16):
            # Emulated bf16 runs at a fraction of fp32 here: a step takes minutes and says nothing.
            report[name] = {
                "skipped": "no AVX512-BF16/AMX on this CPU (--force-bf16 to measure anyway)",
                "matmul_peak_gflop_s": round(peak / 1e9, 1),
            }
            continue
        ours = measure(args.arch, args.batch, args.steps, False, bf16, device, profile=args.profile)
        ref = measure(args.arch, args.batch, args.steps, True, bf16, device, profile=args.profile)
        report[name] = {
            "matmul_peak_gflop_s": round(peak / 1e9, 1),
            "ssit_dist": {**ours, "utilisation": round(ours["achieved_gflop_s"] * 1e9 / peak, 3)},
            "reference_style": {**ref, "utilisation": round(ref["achieved_gflop_s"] * 1e9 / peak, 3)},
            "speedup": round(ours["pairs_per_s"] / ref["pairs_per_s"], 3),
            # The most any step can gain over reference-style by speed alone: all its FLOPs at the matmul peak.
            "ceiling_speedup_at_peak": round(
                peak / (ref["achieved_gflop_s"] * 1e9) * ref["gflop_per_step"] / ours["gflop_per_step"], 3
            ),
        }
        if args.compile:
            fast = measure(args.arch, args.batch, args.steps, False, bf16, device, compiled=True)
            if "pairs_per_s" in fast:
                fast["speedup"] = round(fast["pairs_per_s"] / ref["pairs_per_s"], 3)
            report[name]["ssit_dist_compiled"] = fast
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
