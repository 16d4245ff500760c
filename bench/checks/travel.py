"""Prepare the folder that travels to a GPU machine for `make gpu-run`; prints its manifest as JSON.

A GPU machine of this project is lent for about 15 minutes at a time, has no network and no ../shared,
and takes at most 64 MiB with the checkout. Its Python (3.12) image has torch, timm, accelerate and
OpenCV (without the contrib saliency module) but not DeepSpeed, webdataset or pydantic. So everything is
packed here, once:
- OUT/eval/NAME: each graded folder as labelled shards without saliency maps (`--saliency none`: features
  and fine-tuning need none, and at 256 px a map is three quarters of a sample's bytes); the first folder
  also split train/val/test, for the GPU check's fine-tuning;
- OUT/wheels: the packages the image lacks, at requirements.lock's versions, for CPython 3.12 x86-64;
- OUT/pretrain: the unlabelled photographs as pretraining shards with their maps: as many as fit in what
  is left (a seeded random subset; at 256 px and quality 75 about 46 KB each, so about 700 of 2,000);
- OUT/manifest.json: sizes, counts, resolution, JPEG quality, the shard indexes' sha256.
It refuses (exit 1) when the checkout's tracked files and OUT together would exceed the limit.

    python bench/checks/travel.py [--images DIR] [--eval-data DIR ...] [--out .travel] [--size 256]
        [--quality 75] [--no-wheels]

Then, there, with `.travel` carried: `make gpu-run PY=python3 GPU_OUT=$OUT`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

from ssit_dist.data.index import read_index
from ssit_dist.stage import cli_command, run_stage

ROOT = Path(__file__).resolve().parents[2]  # the repository
FUNDUS = ROOT.parent / "shared" / "data" / "fundus"
LIMIT_BYTES = 64 * 2**20
MARGIN_BYTES = 2**20  # the manifest, the logs, and what the checkout gains before the run
# What the GPU image lacks of the lock (DeepSpeed and its pydantic; webdataset and its braceexpand).
MISSING_ON_GPU = [
    "deepspeed",
    "hjson",
    "pydantic",
    "pydantic-core",
    "annotated-types",
    "typing-inspection",
    "webdataset",
    "braceexpand",
]
GPU_PYTHON = "3.12"
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]


def locked_versions(lock: Path = ROOT / "requirements.lock") -> dict[str, str]:
    pins = {}
    for line in lock.read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep and not line.startswith((" ", "#")):
            pins[name.strip().lower()] = version.strip()
    return pins


def fetch_wheels(out: Path) -> list[str]:
    """The MISSING_ON_GPU packages as wheels for the GPU's Python. DeepSpeed ships only an sdist: its
    wheel (pure Python; the ops compile on first use there) is built here."""
    pins = locked_versions()
    out.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    for name in MISSING_ON_GPU:
        spec = f"{name}=={pins[name]}"
        if name == "deepspeed":
            command = [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), spec]
        else:
            targets = [f"--platform={p}" for p in PLATFORMS]
            command = [*pip, "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(out), *targets]
            command += ["--python-version", GPU_PYTHON, "--implementation", "cp", spec]
        subprocess.run(command, check=True)
    return sorted(p.name for p in out.glob("*.whl"))


def pack(images: Path, out: Path, args: argparse.Namespace, *extra: str) -> dict:
    """`ssit-dist shard IMAGES OUT` at the travel size and quality, its log in args.out/logs."""
    options = ["--size", str(args.size), "--quality", str(args.quality), "--workers", "0", "--overwrite"]
    command = cli_command("shard", *options, *extra, str(images), str(out))
    run_stage(f"pack {images}", command, args.out / "logs" / f"{out.name}.log")
    index = read_index(out)
    return {
        "from": str(images.resolve()),
        "samples": {name: split.num_samples for name, split in index.splits.items()},
        "skipped": len(index.skipped),
        "bytes": folder_bytes(out),
        "index_sha256": hashlib.sha256((out / "_info.json").read_bytes()).hexdigest(),
    }


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def checkout_bytes() -> int:
    """What travels besides the carried folder: the files git tracks or would track (not ignored); outside a
    git checkout (an exported tree), every file but the environment, caches and travel folders."""
    listed = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True)
    if listed.returncode == 0:
        names = [ROOT / n for n in listed.stdout.decode().split("\0") if n]
    else:
        skip = {".git", ".venv", ".cache", ".travel", "__pycache__", ".pytest_cache"}
        names = [p for p in ROOT.rglob("*") if not skip & set(p.relative_to(ROOT).parts)]
    return sum(p.stat().st_size for p in names if p.is_file())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, default=FUNDUS / "unlabelled", help="unlabelled photographs")
    parser.add_argument(
        "--eval-data",
        type=Path,
        nargs="+",
        default=[FUNDUS / "graded", FUNDUS / "graded_natural"],
        help="folders of graded photographs, each with its labels.csv (image,grade[,patient])",
    )
    parser.add_argument("--out", type=Path, default=ROOT / ".travel")
    parser.add_argument("--size", type=int, default=256, help="packed side in pixels (the photographs are 256)")
    parser.add_argument("--quality", type=int, default=75, help="JPEG quality of the packed photographs")
    parser.add_argument("--no-wheels", action="store_true", help="leave the wheels out (a CPU smoke run)")
    return parser.parse_args()


def pack_pretraining(args: argparse.Namespace, room: int) -> dict:
    """All unlabelled photographs, or, where they do not fit in `room` bytes, the seeded random subset
    that does (packed a second time: shards and their index describe exactly what travels)."""
    out = args.out / "pretrain"
    packed = pack(args.images, out, args)
    if packed["bytes"] <= room:
        return packed
    photos = sorted(p for p in args.images.iterdir() if p.is_file())
    count = int(len(photos) * room / packed["bytes"] * 0.98)
    subset = args.out / "subset"
    subset.mkdir()
    for photo in random.Random(0).sample(photos, count):
        (subset / photo.name).symlink_to(photo.resolve())
    packed = pack(subset, out, args) | {"from": str(args.images.resolve()), "subset_of": len(photos)}
    shutil.rmtree(subset)
    return packed


def main() -> int:
    args = parse_args()
    if not args.images.is_dir():
        raise SystemExit(f"{args.images}: not found; pass --images DIR (unlabelled photographs)")
    for folder in args.eval_data:
        if not (folder / "labels.csv").is_file():
            raise SystemExit(f"{folder}/labels.csv: not found; pass --eval-data with folders holding one")
    if args.out.exists():
        shutil.rmtree(args.out)
    manifest: dict = {"size": args.size, "jpeg_quality": args.quality, "eval": {}, "eval_split": args.eval_data[0].name}
    for i, folder in enumerate(args.eval_data):
        split = ["--split", "train=0.7,val=0.15,test=0.15"] if i == 0 else []
        options = ["--labels", str(folder / "labels.csv"), "--saliency", "none", *split]
        manifest["eval"][folder.name] = pack(folder, args.out / "eval" / folder.name, args, *options)
    manifest["wheels"] = [] if args.no_wheels else fetch_wheels(args.out / "wheels")
    room = LIMIT_BYTES - MARGIN_BYTES - checkout_bytes() - folder_bytes(args.out)
    manifest["pretrain"] = pack_pretraining(args, room)
    manifest["bytes"] = {"travel": folder_bytes(args.out), "checkout": checkout_bytes(), "limit": LIMIT_BYTES}
    (args.out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps(manifest, indent=1))
    if manifest["bytes"]["travel"] + manifest["bytes"]["checkout"] > LIMIT_BYTES:
        travel, checkout = (manifest["bytes"][k] / 2**20 for k in ("travel", "checkout"))
        print(f"{args.out} ({travel:.1f} MiB) and the checkout ({checkout:.1f} MiB) exceed the 64 MiB that travels: "
              "lower --quality or --size", file=sys.stderr)  # fmt: skip
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
