"""Benchmark the pretraining data pipeline on real photographs; prints one JSON object.

Measured in one run: ssit-dist's pair stream (512 px shards -> two 224 px views + saliency maps, batch 16)
in-process and with 2 loader workers, against a reference-style loader on the same images: one 512 px
quality-100 JPEG read with PIL per sample plus a float32 .npy saliency map, augmented with torchvision's
PIL transforms as the reference recipe does. Pairs/s per worker is the figure to compare.

Both augmentation paths: `cpu` (OpenCV in the workers) and `gpu` (workers read the bytes, decode the
saliency PNG and draw parameters; the training device decodes the JPEGs and augments the batch), the
device-side part measured on the training device (here whatever `--device` is).

The gpu path's input side, for sizing `data.workers` and SLURM's `--cpus-per-task`: the handoff of a batch
of 64 (a GPU's micro batch in the ViT-S recipe) from 2 workers, as one tensor per JPEG (the former
EncodedBatch) and as one buffer (collate_encoded), alternately in one run: CPU milliseconds per batch of the
thread that takes the batch. Then what one worker does per sample (read, saliency PNG decode, checks and
draws, collate: CPU time of this thread), the pairs per CPU-second of a worker process (psutil), and the
workers each target rate needs with 1.5x headroom (`--target`, beside the recipes' 3,000 and 1,500 pairs/s).

End to end (launch/pretrain.py, ViT-S/16 at 224, global batch 8, fp32, a few steps after a warm-up step):
pairs/s for 1 rank x 2 threads and 2 ranks x 1 thread (ZeRO 0), and peak RSS per rank under ZeRO 0, 2, 3,
and 1 rank x 2 threads with the gpu path; `loader_keeps_up`, per path: the 2-worker loader's pairs/s
against the fastest end-to-end run's. With CUDA (`--cuda`): ViT-S/16 and ViT-B/16 at 224, bf16 ZeRO-2,
compile off/on, cpu vs gpu augmentation, one rank on one GPU: pairs/s, MFU (FLOPs counted by
torch.utils.flop_counter over the GPU's dense bf16 peak) and peak memory.
`--no-end-to-end` measures the data pipeline only.

Usage: python bench/perf/pretrain.py [--images DIR] [--limit N] [--batches N] [--steps N] [--target PAIRS_PER_S]
       [--no-end-to-end] [--cuda]
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import os
import random
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch
from PIL import Image, ImageFilter, ImageOps
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torchvision import transforms
from torchvision.transforms import functional as TF

from ssit_dist.data.decode import decode_gray
from ssit_dist.data.loading.augment import PairAugment
from ssit_dist.data.loading.device_augment import DevicePairAugment, collate_encoded
from ssit_dist.data.loading.epoch import EpochPlan
from ssit_dist.data.loading.prefetch import Prefetcher
from ssit_dist.data.loading.sources import ShardSet, open_shards
from ssit_dist.data.loading.stream import PairStream, jpeg_and_draws, pair_loader
from ssit_dist.data.loading.workers import worker_options
from ssit_dist.data.packing.inputs import discover
from ssit_dist.data.packing.options import ShardOptions
from ssit_dist.data.packing.shard import pack
from ssit_dist.info import collect

BATCH = 16
HANDOFF_BATCH = 64  # a GPU's micro batch in the ViT-S recipe: global batch 512 on 8 GPUs
HEADROOM = 1.5  # workers are sized for this multiple of the target rate
RECIPE_TARGETS = {"vit_small_patch16_224": 3000, "vit_base_patch16_224": 1500}  # pairs/s per GPU
TRAINER_CORES = 2  # the training process itself: its main thread, the prefetch and pin-memory threads


class ReferenceStyle(Dataset):
    """PIL image + float .npy per sample, torchvision PIL transforms with shared geometric parameters."""

    def __init__(self, pairs: list[tuple[Path, Path]], mean: list[float], std: list[float]):
        self.pairs = pairs
        self.jitter = transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8)
        self.grey = transforms.RandomGrayscale(p=0.2)
        self.normalize = transforms.Normalize(mean, std)

    def __len__(self) -> int:
        return len(self.pairs)

    def _view(
        self, img: Image.Image, sal: Image.Image, scale: tuple[float, float], blur_p: float, solarize_p: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        i, j, h, w = transforms.RandomResizedCrop.get_params(img, scale, (3 / 4, 4 / 3))
        img, sal = TF.resized_crop(img, i, j, h, w, [224, 224]), TF.resized_crop(sal, i, j, h, w, [224, 224])
        img = self.grey(self.jitter(img))
        if random.random() < blur_p:
            img = img.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))
        if random.random() < solarize_p:
            img = ImageOps.solarize(img)
        if random.random() < 0.8:
            angle = random.uniform(-180, 180)
            img, sal = TF.rotate(img, angle), TF.rotate(sal, angle)
        if random.random() < 0.5:
            img, sal = TF.hflip(img), TF.hflip(sal)
        if random.random() < 0.5:
            img, sal = TF.vflip(img), TF.vflip(sal)
        return self.normalize(TF.to_tensor(img)), TF.to_tensor(sal)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, ...]:
        image_path, sal_path = self.pairs[k]
        with open(image_path, "rb") as f:
            img = Image.open(f).convert("RGB")
        sal = Image.fromarray(np.uint8(np.load(sal_path) * 255))
        x1, s1 = self._view(img, sal, (0.08, 0.8), 1.0, 0.0)
        x2, s2 = self._view(img, sal, (0.8, 1.0), 0.1, 0.2)
        return x1, x2, s1, s2


def rate(loader, batches: int) -> float:  # type: ignore[no-untyped-def]
    it = iter(loader)
    next(it)  # start-up (worker spawn, first shard) is not throughput
    start = time.perf_counter()
    done = sum(1 for _ in itertools.islice(it, batches))
    assert done == batches, f"the loader ran dry after {done} batches"
    return batches * BATCH / (time.perf_counter() - start)


def one_rank_stream(
    shards: ShardSet, augment: PairAugment, workers: int, encoded: bool = False, batch: int = BATCH
) -> PairStream:
    """One rank's stream with `workers` loader processes, epochs of `batch`-sized batches."""
    batches = max((shards.num_samples or 0) // batch, 1)
    plan = EpochPlan(tuple(shards.lengths), 1, workers, batch, batches, shuffle_buffer=64)  # type: ignore[arg-type]
    return PairStream(shards, augment, plan, rank=0, encoded=encoded)


def collate_as_list(samples: list[tuple]) -> tuple:
    """The handoff before EncodedBatch's one buffer: one 1-D tensor per JPEG and the stacked maps."""
    jpegs, maps, view1, view2, names = zip(*samples, strict=True)
    tensors = [torch.frombuffer(bytearray(jpeg), dtype=torch.uint8) for jpeg in jpegs]
    stacked = torch.stack([torch.from_numpy(m).unsqueeze(0) for m in maps])
    return tensors, stacked, np.stack(view1), np.stack(view2), list(names)


def handoff_ms(stream: PairStream, collate, batches: int, prefetch: bool = False) -> list[float]:  # type: ignore[no-untyped-def]
    """CPU milliseconds of this thread per batch taken from `stream`'s workers, `collate` making the batches;
    with `prefetch`, taken by the trainer's Prefetcher thread and handed to this one. CPU time, not wall
    time: waiting for a worker costs none, unpickling and receiving the shared memory do."""
    loader = DataLoader(
        stream, batch_size=stream.batch_size, drop_last=True, collate_fn=collate, **worker_options(stream.plan.workers)
    )
    it = iter(loader)
    if prefetch:
        it = Prefetcher(it, lambda batch: (batch.data,), torch.device("cpu"))
    next(it)  # start-up
    times = []
    for _ in range(batches):
        start = time.thread_time()
        next(it)
        times.append((time.thread_time() - start) * 1e3)
    if prefetch:
        it.close()
    del it
    return times


def handoffs(shards: ShardSet, augment: PairAugment, batches: int, rounds: int = 2) -> dict:
    """Both handoffs of the gpu path from 2 workers, batch HANDOFF_BATCH, alternately (`rounds` each), so
    that the machine's load weighs on both alike, and what is left of the one buffer's on the training
    thread when the Prefetcher's thread takes the batches: medians of the per-batch CPU milliseconds."""
    ways = {
        "list_of_tensors": (collate_as_list, False),
        "one_buffer": (collate_encoded, False),
        "one_buffer_training_thread_with_prefetcher": (collate_encoded, True),
    }
    times: dict[str, list[float]] = {way: [] for way in ways}
    for _ in range(rounds):
        for way, (collate, prefetch) in ways.items():
            stream = one_rank_stream(shards, augment, workers=2, encoded=True, batch=HANDOFF_BATCH)
            times[way] += handoff_ms(stream, collate, batches, prefetch)
    median = {way: round(statistics.median(t), 2) for way, t in times.items()}
    return {
        "batch": HANDOFF_BATCH,
        "workers": 2,
        "thread_cpu_ms_per_batch": median,
        "speedup": round(median["list_of_tensors"] / median["one_buffer"], 2),
        "batches_each": len(times["one_buffer"]),
    }


def worker_breakdown(shards: ShardSet, augment: PairAugment) -> dict:
    """CPU milliseconds per sample of what a gpu-path worker does, in this thread, over every packed sample:
    the saliency PNG decode is most of it."""
    reader = shards.reader()
    start = time.thread_time()
    samples = [reader.read(i) for i in range(shards.num_samples or 0)]
    read = time.thread_time() - start
    reader.close()
    start = time.thread_time()
    for sample in samples:
        decode_gray(sample["sal.png"])
    png = time.thread_time() - start
    start = time.thread_time()
    items = [jpeg_and_draws(s, augment, np.random.default_rng([0, 0, 0, i])) for i, s in enumerate(samples)]
    prepare = time.thread_time() - start
    start, collated = time.thread_time(), 0
    while collated < 10 * HANDOFF_BATCH:  # a fresh buffer each time, as in a worker: page faults included
        collated += len(collate_encoded(items[:HANDOFF_BATCH]).names)  # type: ignore[arg-type]
    collate = (time.thread_time() - start) / collated * len(items)
    per_sample = {
        "read": read,
        "saliency_png_decode": png,
        "checks_and_draws": prepare - png,  # jpeg_and_draws decodes the map too
        "collate_one_buffer": collate,
    }
    out = {key: round(value / len(samples) * 1e3, 3) for key, value in per_sample.items()}
    total = sum(per_sample.values())
    return {
        "cpu_ms_per_sample": out,
        "saliency_png_share": round(png / total, 2),
        "jpeg_kb": round(float(np.mean([len(s["jpg"]) for s in samples])) / 1e3, 1),
        "saliency_png_kb": round(float(np.mean([len(s["sal.png"]) for s in samples])) / 1e3, 1),
    }


def worker_rate(shards: ShardSet, augment: PairAugment, batches: int, repeats: int = 3) -> dict:
    """The gpu path's loader with one worker process, `repeats` times: pairs/s (wall) and pairs per
    CPU-second of the worker (psutil: user + system), the rate a core of its own gives, which others' load
    moves much less than the wall-clock rate. Medians, and each run's CPU-time rate."""
    wall_rates, cpu_rates = [], []
    for _ in range(repeats):
        it = iter(pair_loader(one_rank_stream(shards, augment, workers=1, encoded=True)))
        next(it)  # start-up
        worker = psutil.Process(it._workers[0].pid)  # type: ignore[attr-defined]
        cpu, start = sum(worker.cpu_times()[:2]), time.perf_counter()
        done = sum(1 for _ in itertools.islice(it, batches))
        wall, cpu = time.perf_counter() - start, sum(worker.cpu_times()[:2]) - cpu
        del it
        wall_rates.append(done * BATCH / wall)
        cpu_rates.append(done * BATCH / cpu)
    return {
        "pairs_per_s": round(statistics.median(wall_rates), 1),
        "pairs_per_cpu_s": round(statistics.median(cpu_rates), 1),
        "pairs_per_cpu_s_each_run": [round(r, 1) for r in cpu_rates],
    }


def workers_needed(per_worker: float, targets: dict[str, float]) -> dict:
    """Loader workers per GPU for each target rate with HEADROOM, and the cores per rank that asks for."""
    out = {}
    for name, target in targets.items():
        workers = math.ceil(target * HEADROOM / per_worker)
        out[name] = {"target_pairs_per_s": target, "workers": workers, "cpus_per_task": workers + TRAINER_CORES}
    return out


def device_rate(stream: PairStream, augment: DevicePairAugment, device: torch.device, batches: int) -> float:
    """Pairs/s of the device-side half of the gpu path (batched JPEG decode and augmentation) alone, on
    batches the workers prepared beforehand."""
    loader = iter(pair_loader(stream))
    ready = [next(loader) for _ in range(batches + 1)]
    augment(ready[0], device)  # warm-up (kernel selection, allocations)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for batch in ready[1:]:
        augment(batch, device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batches * BATCH / (time.perf_counter() - start)


def end_to_end(
    shards: Path,
    work: Path,
    ranks: int,
    threads: int,
    stage: int,
    steps: int,
    augment_on: str = "cpu",
    arch: str = "vit_small_patch16_224",
    global_batch: int = 8,
    bf16: bool = False,
    compile_blocks: bool = False,
    workers: int = 1,
    log_every: int = 1,
    throughput_timer: bool = False,
) -> dict[str, float]:
    """One short pretraining run through launch/pretrain.py; medians over the steps after the first
    `log_every` (start-up). The loop reads the device once per `log_every` steps: on a GPU, 1 makes
    every step wait for the one before it. `throughput_timer`: DeepSpeed's, which syncs the device twice
    per micro-batch (off in every shipped config)."""
    import socket
    import subprocess
    import sys

    import yaml

    ds = work / f"zero{stage}_timer{int(throughput_timer)}.json"
    ds.write_text(
        json.dumps(
            {
                "train_batch_size": "auto",
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "zero_optimization": {"stage": stage},
                "bf16": {"enabled": bf16},
                "steps_per_print": 10**6,
                "optimizer": {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}},
                "timers": {"throughput": {"enabled": throughput_timer}},
            }
        )
    )
    run = work / f"run_r{ranks}_t{threads}_z{stage}_{augment_on}_{arch}_{global_batch}_{bf16}_{compile_blocks}"
    run = run.with_name(f"{run.name}_timer{int(throughput_timer)}")
    cfg = work / f"{run.name}.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(run),
                "ds_config": str(ds),
                "global_batch": global_batch,
                "epochs": 1,
                "steps_per_epoch": steps + log_every,
                "checkpoint_every": 10**6,
                "log_every": log_every,  # the first interval (start-up) is left out of the medians
                "model": {"arch": arch, "img_size": 224, "compile": compile_blocks},
                "data": {
                    "shards": [str(shards)],
                    "workers": workers,
                    "shuffle_buffer": 32,
                    "augment_on": augment_on,
                },
            }
        )
    )
    script = Path(__file__).resolve().parents[2] / "launch" / "pretrain.py"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MASTER_PORT": str(port)}
    if ranks == 1:
        command = [sys.executable, str(script), "--config", str(cfg)]
    else:
        command = [
            str(Path(sys.executable).with_name("torchrun")),
            "--nproc_per_node",
            str(ranks),
            "--master_port",
            str(port),
            str(script),
            "--config",
            str(cfg),
        ]
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][log_every:]
    median = lambda key: float(np.median([r[key] for r in rows]))  # noqa: E731
    return {
        "pairs_per_s": round(median("pairs_per_s"), 2),
        "data_wait_s": round(median("data_wait_s"), 4),
        "step_s": round(median("step_s"), 3),
        "peak_mem_mb_rank0": round(max(r["peak_mem_mb"] for r in rows)),
    }


def keeps_up(loader_pairs_s: dict[str, float], e2e: dict) -> dict:
    """Per augmentation path, whether the 2-worker loader outpaces the model on the same machine: its
    pairs/s against the fastest end-to-end run's (a ratio above 1 keeps up)."""
    if not e2e:
        return {"skipped": "needs the end-to-end runs (drop --no-end-to-end)"}
    model = max(r["pairs_per_s"] for r in e2e.values())
    out = {}
    for path, rate in loader_pairs_s.items():
        ratio = rate / model
        out[f"{path}_augmentation"] = {"keeps_up": ratio >= 1, "ratio": round(ratio, 2), "model_pairs_per_s": model}
    return out


# Dense bf16 peaks from the vendors' data sheets (TFLOP/s, without sparsity), for MFU.
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


def flops_per_pair(arch: str, device: str | torch.device) -> float:
    """FLOPs of one SSiT training step per pair at 224 px, counted by torch.utils.flop_counter."""
    from torch.utils.flop_counter import FlopCounterMode

    from ssit_dist.models.model_config import ModelConfig
    from ssit_dist.models.ssit import SSiT
    from ssit_dist.train.pretrain_step import PlainEngine, train_step

    model = SSiT(ModelConfig(arch=arch)).train().to(device)
    engine = PlainEngine(model.online, torch.optim.AdamW(model.online.parameters()))
    views = (torch.randn(4, 3, 224, 224, device=device),) * 2 + (torch.rand(4, 1, 224, 224, device=device),) * 2
    with FlopCounterMode(display=False) as counter:
        train_step(engine, model.momentum, [views], 0.99, 1.0, 10.0, torch.bfloat16)
    del model, engine
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return counter.get_total_flops() / 4


def cuda_runs(shards: Path, work: Path, steps: int) -> dict:
    """ViT-S/16 and ViT-B/16 at 224, bf16 ZeRO-2, one rank on GPU 0: compile off/on x cpu/gpu augmentation."""
    device = torch.device("cuda", 0)
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in name), None)
    out: dict = {"device": name, "bf16_peak_tflops": peak}
    for arch, batch in (("vit_small_patch16_224", 256), ("vit_base_patch16_224", 128)):
        flops = flops_per_pair(arch, device)
        for compiled in (False, True):
            for augment_on in ("cpu", "gpu"):
                key = f"{arch}_b{batch}_{'compiled' if compiled else 'eager'}_{augment_on}_augmentation"
                try:
                    run = end_to_end(shards, work, 1, 8, 2, steps, augment_on, arch, batch, True, compiled, log_every=5)
                except Exception as e:  # one configuration that fails (memory) does not end the others
                    out[key] = {"failed": str(e)[-300:]}
                    continue
                if peak:
                    run["mfu"] = round(run["pairs_per_s"] * flops / (peak * 1e12), 3)
                out[key] = run
    return out


def main() -> None:
    default = Path(__file__).resolve().parents[3] / "shared" / "data" / "fundus" / "unlabelled"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, default=default)
    parser.add_argument("--limit", type=int, default=160)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--no-end-to-end", dest="end_to_end", action="store_false")
    parser.add_argument("--cuda", action="store_true", help="Also the GPU runs (ViT-S/B, bf16 ZeRO-2, compile, paths).")
    parser.add_argument("--target", type=float, default=3000, help="Pairs/s per GPU to size the workers for.")
    args = parser.parse_args()
    if not args.images.is_dir():
        raise SystemExit(f"{args.images} not found: pass --images DIR with fundus photographs")
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]  # others' load slows the wall-clock rates; the CPU-time ones much less
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        inputs = discover(args.images)
        inputs.items = inputs.items[: args.limit]
        index = pack(args.images, work / "shards", inputs, ShardOptions(workers=2, shard_size=32))
        shards = open_shards([work / "shards"])
        augment = PairAugment(224, shards.mean, shards.std)
        ours0 = rate(pair_loader(one_rank_stream(shards, augment, workers=0)), args.batches)
        ours2 = rate(pair_loader(one_rank_stream(shards, augment, workers=2)), args.batches)
        encoded = one_rank_stream(shards, augment, workers=2, encoded=True)
        encoded2 = rate(pair_loader(encoded), args.batches)
        handoff = handoffs(shards, augment, args.batches)
        one_worker = worker_rate(shards, augment, args.batches)
        breakdown = worker_breakdown(shards, augment)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.set_num_threads(2)  # the training process's share of this machine, as in the 1-rank run
        on_device = device_rate(encoded, DevicePairAugment(224, shards.mean, shards.std), device, args.batches)
        torch.set_num_threads(1)

        # The reference layout of the same samples: the packed JPEG re-saved at quality 100, float .npy map.
        pairs = []
        for shard in shards.paths:
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    key, ext = member.name.split(".", 1)
                    data = tar.extractfile(member).read()  # type: ignore[union-attr]
                    if ext == "jpg":
                        Image.open(io.BytesIO(data)).save(work / f"{key}.jpg", quality=100, subsampling=0)
                    elif ext == "sal.png":
                        sal = np.asarray(Image.open(io.BytesIO(data)), np.float32) / 255
                        np.save(work / f"{key}.npy", sal)
                        pairs.append((work / f"{key}.jpg", work / f"{key}.npy"))
        ref = ReferenceStyle(pairs, shards.mean, shards.std)
        # Sampling with replacement: as many batches as measured, whatever the number of images.
        sampler = RandomSampler(ref, replacement=True, num_samples=BATCH * (args.batches + 1))
        ref0 = rate(DataLoader(ref, BATCH, sampler=sampler, num_workers=0), args.batches)
        ref2 = rate(
            DataLoader(ref, BATCH, sampler=sampler, num_workers=2, multiprocessing_context="forkserver"), args.batches
        )
        e2e = {}
        if args.end_to_end:
            e2e = {
                "1_rank_x_2_threads_zero0": end_to_end(work / "shards", work, 1, 2, 0, args.steps),
                "2_ranks_x_1_thread_zero0": end_to_end(work / "shards", work, 2, 1, 0, args.steps),
                "2_ranks_x_1_thread_zero2": end_to_end(work / "shards", work, 2, 1, 2, args.steps),
                "2_ranks_x_1_thread_zero3": end_to_end(work / "shards", work, 2, 1, 3, args.steps),
                "1_rank_x_2_threads_zero0_gpu_augmentation": end_to_end(
                    work / "shards", work, 1, 2, 0, args.steps, augment_on="gpu"
                ),
            }
        cuda = None
        if args.cuda and torch.cuda.is_available():
            cuda = cuda_runs(work / "shards", work, args.steps)
    targets = RECIPE_TARGETS | {"target": args.target}
    print(
        json.dumps(
            {
                "machine": collect()["cpu"] | {"torch": torch.__version__},
                "load_average_1_min": {"start": round(load_before, 1), "end": round(os.getloadavg()[0], 1)},
                "images": index.num_samples,
                "batch": BATCH,
                "view_size": 224,
                "shard_image_size": 512,
                "ssit_dist": {
                    "in_process_pairs_per_s": round(ours0, 1),
                    "workers_2_pairs_per_s": round(ours2, 1),
                    "per_worker_pairs_per_s": round(ours2 / 2, 1),
                },
                "reference_style": {
                    "in_process_pairs_per_s": round(ref0, 1),
                    "workers_2_pairs_per_s": round(ref2, 1),
                    "per_worker_pairs_per_s": round(ref2 / 2, 1),
                },
                "gpu_augmentation_path": {
                    "workers_2_pairs_per_s": round(encoded2, 1),
                    "per_worker_pairs_per_s": round(encoded2 / 2, 1),
                    "device": str(device),
                    "device_decode_and_augment_pairs_per_s": round(on_device, 1),
                    "handoff": handoff,
                    "one_worker": one_worker,
                    "worker_breakdown": breakdown,
                    # Sized by the CPU-time rate: what a worker with a core of its own prepares.
                    "workers_needed": workers_needed(one_worker["pairs_per_cpu_s"], targets),
                    "headroom": HEADROOM,
                    "trainer_cores": TRAINER_CORES,
                },
                "reported_reference": {"in_process_pairs_per_s": 81.7, "workers_2_pairs_per_s": 140.5},
                "speedup_in_process": round(ours0 / ref0, 2),
                "speedup_2_workers": round(ours2 / ref2, 2),
                "end_to_end_vit_s_224_fp32_global_batch_8": e2e,
                "loader_keeps_up": keeps_up({"cpu": ours2, "gpu": encoded2}, e2e),
                "cuda": cuda if cuda is not None else "skipped: no CUDA device (or no --cuda)",
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
