"""How fast `ssit-dist predict` grades photographs on this machine: photographs per second of the whole
path (read, fundus crop, JPEG as packed, decode, resize, normalise in loader workers; the grader on the
device), for ViT-S at 224 and 384 px with 1 and 2 loader workers, and the loader alone (no model) to show
which side limits. Prints one JSON object.

Two sets of real photographs: the graded EyePACS photographs (256 px JPEGs, already cropped by their source:
those of ../shared, or on a machine without it the packed photographs of `--photos-from SHARDS`, written out
as files) and scikit-image's CC0 retina (1411 x 1411, the size a fundus camera writes; copies of it, as a
clinic's folder of full-size photographs would be; left out where scikit-image is not installed). The
grader is a randomly initialised `--arch` with the grading head: speed does not depend on the weights. The
rate is taken after the first batch (whose time, `first_batch_s`, holds the start-up: loader workers
importing, the model's first call). On a GPU the grader runs there, as `ssit-dist predict` runs it.

Usage: python bench/perf/predict.py [--photos 64] [--batch-size 16] [--sizes 224,384] [--workers 1,2]
    [--arch vit_small_patch16_224] [--photos-from SHARDS]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from PIL import Image
from torch.utils.data import DataLoader

from ssit_dist.data.loading.photographs import collate_photographs, find_photographs
from ssit_dist.data.loading.workers import worker_options
from ssit_dist.eval.grade_photographs import grade, photograph_dataset
from ssit_dist.info import collect
from ssit_dist.models.grader import Grader
from ssit_dist.models.grader_files import GraderInfo
from ssit_dist.models.vit import create_encoder

GRADED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "fundus" / "graded"
PACKED_SIZE, QUALITY = 512, 95  # `ssit-dist shard`'s defaults: what a grader trained on default shards records


def photo_sets(folder: Path, count: int, shards: Path | None) -> dict[str, list[str]]:
    """Real photographs to grade: `count` of the graded EyePACS set, and `count` copies of the full-size
    CC0 retina written as camera JPEGs."""
    sets = {}
    if shards is not None:
        sets["eyepacs_packed"] = write_packed(shards, folder / "packed", count)
    elif GRADED.is_dir():
        sets["eyepacs_256px"] = find_photographs([str(GRADED)])[:count]
    try:
        from skimage import data
    except ImportError:  # the GPU image has no scikit-image: the packed photographs alone
        return sets
    retina = Image.fromarray(data.retina()).convert("RGB")
    (folder / "retina").mkdir()
    for i in range(count):
        retina.save(folder / "retina" / f"retina_{i:04d}.jpg", quality=92)
    sets["retina_1411px"] = find_photographs([str(folder / "retina")])
    return sets


def write_packed(shards: Path, folder: Path, count: int) -> list[str]:
    """The first `count` packed photographs of a shard folder (every split) as JPEG files."""
    import tarfile

    from ssit_dist.data.index import read_index

    folder.mkdir()
    index = read_index(shards)
    written = 0
    for shard in [path for split in index.splits for path in index.shard_paths(shards, split)]:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".jpg") and written < count:
                    (folder / Path(member.name).name).write_bytes(tar.extractfile(member).read())  # type: ignore[union-attr]
                    written += 1
    return find_photographs([str(folder)])


def grader_at(arch: str, size: int) -> tuple[Grader, GraderInfo]:
    torch.manual_seed(0)
    grader = Grader(create_encoder(arch, size), "regression", 5).eval()
    info = GraderInfo(
        arch=arch,
        timm_kwargs={},
        img_size=size,
        objective="regression",
        num_classes=5,
        pool="cls+avg",
        mean=[0.5, 0.5, 0.5],
        std=[0.25, 0.25, 0.25],
        crop_size=PACKED_SIZE,
        jpeg_quality=QUALITY,
        thresholds=(0.5, 1.5, 2.5, 3.5),
        source=f"random {arch}",
    )
    return grader, info


class Clock:
    """Times of each batch's end: the first batch carries the start-up (workers importing, the model's first
    call); the rate is taken over the batches after it."""

    def __init__(self) -> None:
        self.started = time.perf_counter()
        self.marks: list[tuple[int, float]] = []

    def __call__(self, done: int, total: int = 0) -> None:
        self.marks.append((done, time.perf_counter()))

    def report(self) -> dict[str, float]:
        (first_done, first_at), (done, at) = self.marks[0], self.marks[-1]
        return {
            "photos_per_s": round((done - first_done) / (at - first_at), 2),
            "first_batch_s": round(first_at - self.started, 2),
        }


def predict_rate(photos: list[str], grader_info: tuple[Grader, GraderInfo], workers: int, batch: int) -> dict:
    """The grading loop (eval/grade_photographs.grade: loader workers, the model on the device)."""
    grader, info = grader_info
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    clock = Clock()
    graded = grade(grader, photograph_dataset(photos, info), accelerator, batch, workers, on_progress=clock)
    assert len(graded.indices) == len(photos), graded.problems
    return clock.report()


def loader_rate(photos: list[str], info: GraderInfo, workers: int, batch: int) -> dict:
    """The preprocessing alone: what the loader workers can feed."""
    dataset = photograph_dataset(photos, info)
    loader = DataLoader(dataset, batch_size=batch, collate_fn=collate_photographs, **worker_options(workers))
    clock, seen = Clock(), 0
    for b in loader:
        seen += len(b.indices)
        clock(seen)
    assert seen == len(photos)
    return clock.report()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--sizes", default="224,384")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--arch", default="vit_small_patch16_224", help="the grader's timm architecture")
    parser.add_argument("--photos-from", type=Path, default=None, help="a shard folder whose photographs to grade")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    workers = [int(w) for w in args.workers.split(",")]
    graders = {size: grader_at(args.arch, size) for size in sizes}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, photos in photo_sets(Path(tmp), args.photos, args.photos_from).items():
            results[name] = {
                f"{size}px_workers{w}": {
                    "predict": predict_rate(photos, graders[size], w, args.batch_size),
                    "loader_only": loader_rate(photos, graders[size][1], w, args.batch_size),
                }
                for size in sizes
                for w in workers
            }
    machine = collect()
    print(
        json.dumps(
            {
                "machine": machine["cpu"] | {"torch": torch.__version__},
                "cuda": machine["cuda"],
                "arch": args.arch,
                "photos": args.photos,
                "batch_size": args.batch_size,
                "packed_size": PACKED_SIZE,
                "rates": results,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
