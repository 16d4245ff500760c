"""Benchmark one SSiT training step on CPU; prints one JSON object.

A step = momentum update, keys from the salient patches of both views, online forward and backward,
grad clip 1.0, AdamW. ViT-S/16 at 224, batch 8 pairs, one process, 2 threads by default, in fp32 and
under bf16 autocast. Reported per precision: pairs/s of ssit-dist's step and of a reference-style step
measured in the same run, one step of each in turn, medians (the reference-style step sends each view
through each encoder on its own, uses explicit softmax attention, a per-parameter Python EMA loop and
torch's default AdamW, as the reference implementation does), the FLOPs of one step counted with
torch.utils.flop_counter, and utilisation against a matmul peak measured in the same run.

ssit-dist's step runs as the trainer runs it on that device: attention per `model.attention=auto`
(explicit on CPUs, fused on GPUs), both views through each encoder in one pass, the allocation-free
compensated EMA, fused AdamW. `--compile` adds a third step, with the transformer blocks and the
momentum update compiled (`model.compile`); `--profile` the top operators of each step by self time
(torch.profiler) and, on a CPU, the seconds per step in matrix products, with
`ceiling_speedup_matmul_bound`: the reference-style step's time over ours spent in matrix products alone.

On a GPU (`--device cuda`) the same two steps run there; the peak is an 8192^3 matmul on that GPU.

Usage: python bench/perf/model_step.py [--arch vit_small_patch16_224] [--batch 8] [--steps 5] [--threads 2]
       [--img-size 224] [--device cpu] [--compile] [--profile]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from ssit_dist.info import cpu_runs_natively
from ssit_dist.models.compile import compile_model
from ssit_dist.models.losses import contrastive_loss, saliency_loss
from ssit_dist.models.model_config import ModelConfig
from ssit_dist.models.ssit import OnlineNetwork, SSiT
from ssit_dist.models.vit import encode
from ssit_dist.train.pretrain_step import PlainEngine, train_step


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


# The operators that do a CPU step's matrix products (timm's linears, attention, the patch embedding).
MATMUL_OPERATORS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution")


def profile_step(step, inputs, count: int = 12) -> dict:  # type: ignore[no-untyped-def]
    """The `count` operators with the most self time over two steps, per step; on a CPU also the time
    per step in matrix products, whose complement is all a faster implementation can remove."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if inputs[0].is_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(2):
            step(*inputs)
    key = "self_device_time_total" if inputs[0].is_cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    summary: dict = {
        "top_operators": [
            {"op": e.key, "ms_per_step": round(getattr(e, key) / 2e3, 1), "calls_per_step": e.count // 2}
            for e in events[:count]
        ]
    }
    if not inputs[0].is_cuda:  # on a GPU the products are kernels named per library, not these operators
        matmul_us = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPERATORS)
        summary["matmul_s_per_step"] = round(matmul_us / 2e6, 3)
    return summary


@dataclass
class Variant:
    """One way of taking the step, ready to run on its inputs."""

    step: Callable[..., float]
    inputs: tuple[torch.Tensor, ...]
    flops: int = 0
    seconds: list[float] = field(default_factory=list)

    def run(self, device: torch.device) -> float:
        sync(device)
        start = time.perf_counter()
        self.step(*self.inputs)
        sync(device)
        return time.perf_counter() - start

    def result(self, batch: int, peak: float, profile: bool) -> dict:
        seconds = statistics.median(self.seconds)
        result: dict = {
            "pairs_per_s": round(batch / seconds, 3),
            "step_s": round(seconds, 3),
            "step_s_min_max": [round(min(self.seconds), 3), round(max(self.seconds), 3)],
            "gflop_per_step": round(self.flops / 1e9, 1),
            "achieved_gflop_s": round(self.flops / seconds / 1e9, 1),
            "utilisation": round(self.flops / seconds / peak, 3),
        }
        if profile:
            result.update(profile_step(self.step, self.inputs))
        return result


def prepare(
    arch: str,
    batch: int,
    reference_style: bool,
    bf16: bool,
    device: torch.device,
    compiled: bool = False,
    img_size: int = 224,
) -> Variant | str:
    """The step warmed up and its FLOPs counted, or why it cannot run."""
    torch.manual_seed(0)
    cfg = ModelConfig(arch=arch, img_size=img_size)
    model = SSiT(cfg).train().to(device)
    if not reference_style:
        model.use_fused_attention(cfg.fused_attention(device.type))
    if compiled:
        reason = compile_model(model.online.encoder, model.momentum, device, zero_stage=0)
        if reason is not None:
            return reason
    x1, x2 = (torch.randn(batch, 3, img_size, img_size, device=device) for _ in range(2))
    s1, s2 = (torch.rand(batch, 1, img_size, img_size, device=device) for _ in range(2))
    variant = Variant(make_step(model, reference_style, bf16), (x1, x2, s1, s2))
    for _ in range(1 if device.type == "cpu" and not compiled else 3):
        variant.run(device)  # warm-up (allocations, kernel selection, cuDNN/cuBLAS heuristics, compilation)
    with FlopCounterMode(display=False) as counter:
        variant.run(device)
    variant.flops = counter.get_total_flops()
    return variant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224, help="input size in pixels (a multiple of 16)")
    parser.add_argument("--steps", type=int, default=5, help="Timed steps per variant (median reported).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--force-bf16", action="store_true", help="Measure bf16 even without native bf16.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: where the step runs (threads: CPU only).")
    parser.add_argument("--compile", action="store_true", help="Also measure the step with model.compile on.")
    parser.add_argument("--profile", action="store_true", help="Add each step's top operators (torch.profiler).")
    parser.add_argument("--only-bf16", action="store_true", help="Leave fp32 out (the GPU run measures bf16).")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    report: dict[str, object] = {
        "arch": args.arch,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch": args.batch,
        "img_size": args.img_size,
        "threads": args.threads,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    for name, bf16 in (("fp32", False), ("bf16_autocast", True))[1 if args.only_bf16 else 0 :]:
        peak = matmul_peak(torch.bfloat16 if bf16 else torch.float32, device)
        if bf16 and device.type == "cpu" and not (cpu_runs_natively(torch.bfloat16) or args.force_bf16):
            # Emulated bf16 runs at a fraction of fp32 here: a step takes minutes and says nothing.
            report[name] = {
                "skipped": "no AVX512-BF16/AMX on this CPU (--force-bf16 to measure anyway)",
                "matmul_peak_gflop_s": round(peak / 1e9, 1),
            }
            continue
        variants = {
            "ssit_dist": prepare(args.arch, args.batch, False, bf16, device, img_size=args.img_size),
            "reference_style": prepare(args.arch, args.batch, True, bf16, device, img_size=args.img_size),
        }
        if args.compile:
            variants["ssit_dist_compiled"] = prepare(
                args.arch, args.batch, False, bf16, device, compiled=True, img_size=args.img_size
            )
        ready = {k: v for k, v in variants.items() if isinstance(v, Variant)}
        # Interleaved, one step of each in turn, medians: a drift of the machine's speed during the run
        # (a neighbour, the clock) falls on every variant alike instead of on whichever ran then.
        for _ in range(args.steps):
            for variant in ready.values():
                variant.seconds.append(variant.run(device))
        results = {k: v.result(args.batch, peak, args.profile) for k, v in ready.items()}
        ours, ref = results["ssit_dist"], results["reference_style"]
        section: dict = {
            "matmul_peak_gflop_s": round(peak / 1e9, 1),
            **results,
            "speedup": round(ours["pairs_per_s"] / ref["pairs_per_s"], 3),
            # The most any step can gain over reference-style by speed alone: all its FLOPs at the matmul peak.
            "ceiling_speedup_at_peak": round(
                peak / (ref["achieved_gflop_s"] * 1e9) * ref["gflop_per_step"] / ours["gflop_per_step"], 3
            ),
        }
        if ours.get("matmul_s_per_step"):
            # The most ours can gain by speed alone with its matrix products as fast as they run now: every
            # other operator (casts, softmax, GELU, norms, the EMA, AdamW) and all overhead taking no time.
            section["ceiling_speedup_matmul_bound"] = round(ref["step_s"] / ours["matmul_s_per_step"], 3)
        if "ssit_dist_compiled" in results:
            section["compiled_speedup"] = round(results["ssit_dist_compiled"]["pairs_per_s"] / ref["pairs_per_s"], 3)
        elif args.compile:
            section["ssit_dist_compiled"] = {"skipped": variants["ssit_dist_compiled"]}
        report[name] = section
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
