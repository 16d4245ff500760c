"""Benchmark `ssit-dist shard` on the real graded photographs; prints one JSON object.

Measures, in one run on one machine:
- our single-pass packer with 1 and 2 worker processes (images/s, default options: 512 px, fine-grained
  saliency with the JPEG round trip, quality 95);
- the reference layout, re-implemented here so it runs on the same machine in the same run: pass 1 crops
  to 512 px and writes a quality-100 4:4:4 JPEG per image, pass 2 reads it back, enhances, computes the
  saliency and writes a float32 .npy, each pass over 2 processes;
- bytes per sample: our jpg + sal.png (and whole shards, tar headers included) against the reference's
  JPEG + .npy.

Usage: python bench/perf/shard.py [--images DIR] [--limit N]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from ssit_dist.data.packing.fundus import crop_to_disc
from ssit_dist.data.packing.inputs import discover
from ssit_dist.data.packing.options import ShardOptions
from ssit_dist.data.packing.shard import pack

REPORTED_REFERENCE_IPS = 23.8  # issue 2: its two passes, 2 processes, these 300 images
REPORTED_REFERENCE_BYTES = 1_270_452


def _reference_crop(job: tuple[Path, Path]) -> None:
    src, dst = job
    Image.fromarray(crop_to_disc(src.read_bytes(), 512).image).save(dst, quality=100, subsampling=0)


def _reference_saliency(job: tuple[Path, Path]) -> None:
    src, dst = job
    img = cv2.imread(str(src))
    mask = np.zeros(img.shape)
    cv2.circle(mask, (256, 256), int(256 * 0.98), (1, 1, 1), -1, 8, 0)
    weighted = cv2.addWeighted(img, 4, cv2.GaussianBlur(img, (0, 0), 512 / 30), -4, 128)
    enhanced = (weighted * mask + 128 * (1 - mask)).astype(np.uint8)
    enhanced = cv2.imdecode(cv2.imencode(".jpeg", enhanced)[1], cv2.IMREAD_COLOR)
    _, raw = cv2.saliency.StaticSaliencyFineGrained_create().computeSaliency(enhanced)
    raw *= cv2.circle(np.zeros((512, 512)), (256, 256), 240, 1, -1)
    np.save(dst, raw)


def reference_layout(images: list[Path], work: Path) -> dict[str, float]:
    crops, maps = work / "crops", work / "maps"
    crops.mkdir()
    maps.mkdir()
    started = time.perf_counter()
    with get_context("spawn").Pool(2) as pool:
        pool.map(_reference_crop, [(p, crops / (p.stem + ".jpg")) for p in images], chunksize=4)
    with get_context("spawn").Pool(2) as pool:
        pool.map(
            _reference_saliency, [(crops / (p.stem + ".jpg"), maps / (p.stem + ".npy")) for p in images], chunksize=4
        )
    elapsed = time.perf_counter() - started
    jpg = sum(f.stat().st_size for f in crops.iterdir()) / len(images)
    npy = sum(f.stat().st_size for f in maps.iterdir()) / len(images)
    return {
        "images_per_s": round(len(images) / elapsed, 2),
        "jpg_bytes": round(jpg),
        "npy_bytes": round(npy),
        "bytes_per_sample": round(jpg + npy),
    }


def ours(root: Path, labels: Path | None, work: Path, workers: int, limit: int) -> tuple[float, Path]:
    inputs = discover(root, [labels] if labels else [])
    inputs.items = inputs.items[:limit]
    out = work / f"ours{workers}"
    started = time.perf_counter()
    pack(root, out, inputs, ShardOptions(workers=workers))
    return len(inputs.items) / (time.perf_counter() - started), out


def member_bytes(out: Path) -> dict[str, float]:
    import tarfile

    sizes: dict[str, list[int]] = {}
    for tar_path in out.glob("*.tar"):
        with tarfile.open(tar_path) as tar:
            for m in tar.getmembers():
                sizes.setdefault(m.name.split(".", 1)[1], []).append(m.size)
    n = len(sizes["jpg"])
    shard_total = sum(p.stat().st_size for p in out.glob("*.tar"))
    return {
        "jpg": round(np.mean(sizes["jpg"])),
        "sal.png": round(np.mean(sizes["sal.png"])),
        "jpg_plus_sal": round(np.mean(sizes["jpg"]) + np.mean(sizes["sal.png"])),
        "shard_bytes_per_sample": round(shard_total / n),
    }


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main() -> None:
    default = Path(__file__).resolve().parents[3] / "shared" / "data" / "fundus" / "graded"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, default=default)
    parser.add_argument("--limit", type=int, default=300)
    args = parser.parse_args()
    if not args.images.is_dir():
        raise SystemExit(f"{args.images} not found: pass --images DIR with fundus photographs")
    labels = args.images / "labels.csv"
    labels = labels if labels.is_file() else None
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ips1, _ = ours(args.images, labels, work, 1, args.limit)
        ips2, out2 = ours(args.images, labels, work, 2, args.limit)
        sizes = member_bytes(out2)
        images = [args.images / i.rel for i in discover(args.images, [labels] if labels else []).items[: args.limit]]
        baseline = reference_layout(images, work)
    print(
        json.dumps(
            {
                "machine": {"cpu": cpu_model(), "cores": __import__("os").cpu_count(), "opencv": cv2.__version__},
                "images": len(images),
                "ours_images_per_s": {"workers_1": round(ips1, 2), "workers_2": round(ips2, 2)},
                "reference_layout_in_run": baseline,
                "speedup_2_workers_vs_reference_in_run": round(ips2 / baseline["images_per_s"], 2),
                "speedup_2_workers_vs_reported_23.8": round(ips2 / REPORTED_REFERENCE_IPS, 2),
                "bytes_per_sample": sizes,
                "bytes_vs_reference_in_run": round(sizes["jpg_plus_sal"] / baseline["bytes_per_sample"], 4),
                "bytes_vs_reported_1270452": round(sizes["jpg_plus_sal"] / REPORTED_REFERENCE_BYTES, 4),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
