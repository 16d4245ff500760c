"""A tiny DR grader (a 2-block ViT at 32 px) and a fine-tuning run folder around it, written in this process
by fine-tuning's own functions (grader_meta, run_fingerprint, save_grader) over real packed shards: what
the grader-file and export tests read without launching a trainer."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from ssit_dist.atomic import write_json
from ssit_dist.config import FinetuneConfig, save_config
from ssit_dist.data.index import read_index
from ssit_dist.data.loading.grading_transforms import eval_transform
from ssit_dist.data.loading.labelled import LabelledShards, SplitSource, check_labels
from ssit_dist.data.packing.inputs import discover
from ssit_dist.data.packing.options import ShardOptions
from ssit_dist.data.packing.shard import pack
from ssit_dist.eval.over_split import evaluate
from ssit_dist.models.grader import Grader, save_grader
from ssit_dist.models.pretrained import load_encoder
from ssit_dist.models.vit import create_encoder
from ssit_dist.train.checkpoint import write_fingerprint
from ssit_dist.train.finetune import grader_meta, run_fingerprint, splits

ARCH = "vit_small_patch16_224"
TINY = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}
SIZE = 32


def tiny_grader(pool: str, objective: str = "regression", seed: int = 0) -> Grader:
    """One seed, one encoder whatever the pool; a head far from zero, so that logits differ by pool."""
    torch.manual_seed(seed)
    grader = Grader(create_encoder(ARCH, SIZE, **TINY), objective, 5, pool)
    torch.nn.init.normal_(grader.head.weight, std=0.5)
    return grader.eval()


def fixed_input(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(7))


def pack_graded(graded_dir: Path, folder: Path, count: int = 12) -> Path:
    """The first `count` real graded photographs at 64 px, JPEG quality 90, split train / val / test,
    packed in this process by the packer `ssit-dist shard` runs; returns the shards folder."""
    src = folder / "src"
    src.mkdir(parents=True)
    rows = (graded_dir / "labels.csv").read_text().splitlines()
    for row in rows[1 : count + 1]:
        (src / row.split(",")[0]).symlink_to(graded_dir / row.split(",")[0])
    (src / "labels.csv").write_text("\n".join(rows[: count + 1]) + "\n")
    out = folder / "graded64"
    inputs = discover(src, [src / "labels.csv"], split="train=0.5,val=0.25,test=0.25")
    pack(src, out, inputs, ShardOptions(size=64, shard_size=8, quality=90, saliency="none"))
    return out


def write_run(folder: Path, shards: Path, pool: str, objective: str = "regression") -> Grader:
    """A fine-tuning run folder as `ssit-dist finetune` leaves it for its readers: config.yaml,
    fingerprint.json, best.safetensors with the meta fine-tuning writes beside it, and report.json with
    the grader's metrics on the val and test splits with their intervals, as fine-tuning reports them."""
    cfg = FinetuneConfig(
        run_dir=str(folder),
        train=f"{shards}:train",
        arch=ARCH,
        timm_kwargs=TINY,
        img_size=SIZE,
        pool=pool,  # type: ignore[arg-type]
        objective=objective,  # type: ignore[arg-type]
    )
    sources = splits(cfg)
    indexes = {name: check_labels(s, cfg.num_classes) for name, s in sources.items()}
    _, source = load_encoder("random", SIZE, ARCH, TINY)
    grader = tiny_grader(pool, objective)
    folder.mkdir(parents=True)
    save_config(cfg, folder)
    write_fingerprint(folder, run_fingerprint(cfg, 1, sources, indexes))
    report = {name: split_metrics(grader, s) for name, s in sources.items() if name != "train"}
    meta = grader_meta(cfg, grader, asdict(source), indexes["train"])
    save_grader(grader, folder / "best.safetensors", {**meta, "epoch": 1, "val": report["val"], "select_by": "qwk"})
    write_json(folder / "report.json", {"best_epoch": 1, "objective": objective, **report})
    return grader


def split_metrics(grader: Grader, source: SplitSource) -> dict:
    """The grader's metrics on a split, with their intervals, by fine-tuning's own evaluation of the best
    weights (eval/over_split.py)."""
    from accelerate import Accelerator

    index = read_index(source.folder)
    data = LabelledShards(source, eval_transform(SIZE, index.mean, index.std), grader.num_classes)
    return evaluate(grader, data, Accelerator(cpu=True), batch_size=8, intervals=True)["metrics"]
