"""`ssit-dist demo`: the whole pipeline on a built-in synthetic set, in minutes on 2 CPU cores.

1. write synthetic fundus photographs (ssit_dist/data/synthetic.py): an unlabelled pool for pretraining
   and a graded set (equal numbers per grade), or take the user's own folder and labels CSV;
2. pack them into shards with saliency maps (the graded set split train/val/test, stratified);
3. pretrain SSiT with DeepSpeed on 2 local ranks (launch/configs/tiny_cpu.yaml, fitted to the demo);
4. export the encoder;
5. fine-tune on the train split from the export and from random init, the same recipe for both, model
   selection on val; weighted kNN on frozen features; view retrieval;
6. print one table and the paths of the pictures (saliency preview, curves, attention, confusion).

Each stage that trains runs as its own process (as a user would run it); its log is under OUT/logs.
"""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2

from ssit_dist import atomic
from ssit_dist.config import RUN_CONFIGS
from ssit_dist.data.index import ShardIndex

SYNTHETIC = "synthetic fundus (generated)"


@dataclass(frozen=True)
class DemoPlan:
    """Sizes and budget, chosen so the whole demo ends in under 10 minutes on 2 CPU cores."""

    pretrain_images: int = 800
    graded_per_grade: int = 80
    split: str = "train=0.5,val=0.125,test=0.375"
    generate_size: int = 256
    pack_size: int = 128
    # tiny_cpu.yaml's ViT at 128 px with 16 px patches: as many tokens as its 64 px / 8 px, and lesions
    # twice the size in pixels.
    img_size: int = 128
    patch_size: int = 16
    pretrain_epochs: int = 12
    # Classification: with the regression objective (MSE on the grade) both inits stayed at a constant
    # prediction on 200 training images in 20 epochs.
    objective: str = "classification"
    finetune_epochs: int = 20
    finetune_lr: float = 3e-4
    knn_k: int = 10
    attention_images: int = 4
    ranks: int = 2  # CPU ranks; on a GPU machine one rank per GPU, at most this many
    seed: int = 0


# `ssit-dist demo --quick`: every stage, about a minute; checks an installation, its numbers mean nothing.
QUICK = DemoPlan(pretrain_images=64, graded_per_grade=12, pretrain_epochs=1, finetune_epochs=1, attention_images=2)


@dataclass
class Stage:
    """What a stage reports to the progress display: done / total units of `unit`."""

    name: str
    total: int
    unit: str = ""
    done: int = 0
    notes: list[str] = field(default_factory=list)


Report = Callable[[Stage], None]


def _write_synthetic(job: tuple[int, int, int, Path]) -> None:
    from ssit_dist.data.synthetic import synthetic_fundus

    grade, seed, size, path = job
    image = synthetic_fundus(grade, seed, size)
    if not cv2.imwrite(str(path), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92]):
        raise OSError(f"could not write {path}")


def write_synthetic_set(folder: Path, per_grade: int, pool: int, size: int, seed: int, report: Report) -> None:
    """folder/synthetic_pretrain/*.jpg (unlabelled pool, grades in equal shares) and
    folder/synthetic_graded/*.jpg with its labels.csv (image,grade), written by 2 processes."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from ssit_dist.data.synthetic import GRADES

    jobs, rows = [], []
    for part, count, offset in (("pretrain", pool, 0), ("graded", per_grade * GRADES, 500_000)):
        images = folder / f"synthetic_{part}"
        images.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            name = f"synthetic_{part}_{i:05d}.jpg"
            jobs.append((i % GRADES, seed * 1_000_003 + offset + i, size, images / name))
            if part == "graded":
                rows.append((name, i % GRADES))
    stage = Stage("generate synthetic photographs", len(jobs), "images")
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool_:
        for _ in pool_.map(_write_synthetic, jobs, chunksize=16):
            stage.done += 1
            report(stage)
    with open(folder / "synthetic_graded" / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "grade"])
        writer.writerows(rows)


def pack_folder(
    images: Path, out: Path, plan: DemoPlan, report: Report, labels: Path | None = None, preview: int = 0
) -> ShardIndex:
    from ssit_dist.data.inputs import discover
    from ssit_dist.data.shard import ShardOptions, pack

    split = plan.split if labels else None
    inputs = discover(images, labels, split, plan.seed)
    stage = Stage(f"pack {images.name}", len(inputs.items), "images")
    opts = ShardOptions(
        size=plan.pack_size, shard_size=256, workers=2, overwrite=True, split=split, seed=plan.seed, preview=preview
    )

    def advance(_: object) -> None:
        stage.done += 1
        report(stage)

    index = pack(images, out, inputs, opts, labels, advance)
    if index.skipped:
        stage.notes += [f"skipped {s['path']}: {s['reason']}" for s in index.skipped]
        report(stage)
    return index


def watch(command: list[str], log: Path, stage: Stage, count: Callable[[], int], report: Report) -> None:
    """Run `command` with its output in `log`, updating `stage` from `count()` while it runs."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        process = subprocess.Popen(command, stdout=f, stderr=subprocess.STDOUT)
        while process.poll() is None:
            time.sleep(0.5)
            stage.done = min(count(), stage.total)
            report(stage)
    if process.returncode:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise RuntimeError(f"{stage.name} failed (exit {process.returncode}); log {log}:\n{tail}")
    stage.done = stage.total
    report(stage)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from ssit_dist.cli import app; app()", *args]


def pretrain(
    shards: list[str],
    timm_kwargs: dict,
    split: str,
    val: str,
    run_dir: Path,
    steps_per_epoch: int,
    plan: DemoPlan,
    logs: Path,
    report: Report,
) -> None:
    overrides = [
        f"run_dir={run_dir}",
        f"data.shards=[{','.join(shards)}]",
        f"data.split={split}",
        f"model.img_size={plan.img_size}",
        f"model.timm_kwargs={json.dumps(timm_kwargs)}",
        f"epochs={plan.pretrain_epochs}",
        "optim.warmup_epochs=0.5",
        f"checkpoint_every={steps_per_epoch * plan.pretrain_epochs}",
        f"retrieval.shards={val}",
        f"retrieval.every={steps_per_epoch}",
        f"seed={plan.seed}",
    ]
    config = RUN_CONFIGS / "tiny_cpu.yaml"
    import torch

    gpus = torch.cuda.device_count()
    ranks = min(plan.ranks, gpus) if gpus else plan.ranks
    where = f"{ranks} GPU{'s' * (ranks > 1)}" if gpus else f"{ranks} CPU ranks"
    stage = Stage(f"pretrain SSiT (DeepSpeed, {where})", steps_per_epoch * plan.pretrain_epochs, "steps")
    command = _cli("pretrain", "--config", str(config), "--nproc", str(ranks), *overrides)
    watch(command, logs / "pretrain.log", stage, lambda: _lines(run_dir / "metrics.jsonl"), report)


def finetune(
    graded: Path, init: str, run_dir: Path, plan: DemoPlan, model_args: list[str], logs: Path, report: Report
) -> dict:
    overrides = [
        f"train={graded}:train",
        f"val={graded}:val",
        f"test={graded}:test",
        f"init={init}",
        f"run_dir={run_dir}",
        f"img_size={plan.img_size}",
        f"epochs={plan.finetune_epochs}",
        f"lr={plan.finetune_lr}",
        f"objective={plan.objective}",
        "warmup_epochs=1",
        "workers=0",  # a few hundred small images: decoding in-process beats starting workers each epoch
        f"seed={plan.seed}",
        *model_args,
    ]
    stage = Stage(
        f"fine-tune from {'random init' if init == 'random' else 'the SSiT export'}", plan.finetune_epochs, "epochs"
    )
    command = [sys.executable, "-m", "ssit_dist.train.finetune", *overrides]
    watch(command, logs / f"{run_dir.name}.log", stage, lambda: _lines(run_dir / "metrics.jsonl"), report)
    return json.loads((run_dir / "report.json").read_text())


def knn(graded: Path, init: str, plan: DemoPlan, random_arch: dict | None) -> dict:
    """Weighted kNN grading and view retrieval on the test split (in this process, seeded)."""
    import torch

    from ssit_dist.eval.knn import knn_evaluate

    torch.manual_seed(plan.seed)  # a random init is drawn from the global generator
    arch = random_arch or {}
    return knn_evaluate(
        f"{graded}:train",
        f"{graded}:test",
        init,
        plan.img_size,
        ks=(plan.knn_k,),
        arch=arch.get("arch"),
        timm_kwargs=arch.get("timm_kwargs"),
    )


def pictures(out: Path, pretrain_run: Path, encoder: Path, photos: dict[Path, int], title: str) -> dict[str, Path]:
    """Training curves of the pretraining run and the export's attention over a few graded photographs
    (path -> grade)."""
    from ssit_dist.eval.attention import attention_png, cls_attention, load_photographs
    from ssit_dist.eval.report import curves_png, run_curves
    from ssit_dist.models.pretrained import load_encoder

    folder = out / "pictures"
    folder.mkdir(parents=True, exist_ok=True)
    x_name, series = run_curves(pretrain_run)
    curves = folder / "pretrain_curves.png"
    curves_png(curves, {k.replace("_", " "): v for k, v in series.items()}, x_name, f"SSiT pretraining, {title}")
    meta = json.loads(encoder.with_suffix(".json").read_text())
    model, _ = load_encoder(str(encoder), meta["img_size"])
    images, inputs = load_photographs(list(photos), meta["img_size"], meta.get("mean"), meta.get("std"))
    attention = folder / "attention.png"
    names = [f"{p.name}, grade {g}" for p, g in photos.items()]
    maps = cls_attention(model.eval(), inputs)
    attention_png(attention, images, maps, names, f"attention of the SSiT export, {title}")
    return {"pretraining curves": curves, "attention (SSiT export)": attention}


def run_demo(
    out: Path, report: Report, data: Path | None = None, labels: Path | None = None, plan: DemoPlan | None = None
) -> dict:
    """The demo's stages in order; returns the results table's rows, the pictures and the notes."""
    from ssit_dist.config import PretrainConfig, load_config
    from ssit_dist.train.checkpoint import export_encoder

    plan = plan or DemoPlan()
    started = time.perf_counter()
    logs, shards = out / "logs", out / "shards"
    synthetic = data is None
    if synthetic:
        write_synthetic_set(
            out / "images", plan.graded_per_grade, plan.pretrain_images, plan.generate_size, plan.seed, report
        )
        data, labels = out / "images" / "synthetic_graded", out / "images" / "synthetic_graded" / "labels.csv"
    assert data is not None and labels is not None
    graded = shards / "graded"
    index = pack_folder(data, graded, plan, report, labels, preview=6)
    pretrain_shards, split = [str(graded)], "train"  # never the val or test photographs
    if synthetic:
        pool = pack_folder(out / "images" / "synthetic_pretrain", shards / "pretrain", plan, report)
        pretrain_shards = [str(shards / "pretrain"), str(graded)]  # the pool and the graded train split
        pretraining_images = pool.splits["train"].num_samples + index.splits["train"].num_samples
    else:
        pretraining_images = index.splits["train"].num_samples
    tiny = load_config(RUN_CONFIGS / "tiny_cpu.yaml", [], PretrainConfig)
    steps_per_epoch = max(1, pretraining_images // tiny.global_batch)
    name = "synthetic_" if synthetic else ""
    run_dir = out / "runs" / f"{name}pretrain"
    timm_kwargs = {**tiny.model.timm_kwargs, "patch_size": plan.patch_size}
    pretrain(pretrain_shards, timm_kwargs, split, f"{graded}:val", run_dir, steps_per_epoch, plan, logs, report)

    encoder = out / "encoder.safetensors"
    export_encoder(run_dir, encoder, overwrite=True)
    random_arch = {"arch": tiny.model.arch, "timm_kwargs": timm_kwargs}
    random_args = [f"arch={tiny.model.arch}", f"timm_kwargs={json.dumps(timm_kwargs)}"]
    rows, runs = {}, {}
    for label, init, args in (("SSiT pretrained", str(encoder), []), ("random init", "random", random_args)):
        run = out / "runs" / f"{name}finetune_{'ssit' if init != 'random' else 'random'}"
        tuned = finetune(graded, init, run, plan, args, logs, report)
        stage = Stage(f"kNN and view retrieval ({label})", 1, "")
        report(stage)
        near = knn(graded, init, plan, None if init != "random" else random_arch)
        stage.done = 1
        report(stage)
        k = near["k"][str(plan.knn_k)]
        rows[label] = {
            "finetune_qwk": tuned["test"]["qwk"],
            "finetune_accuracy": tuned["test"]["accuracy"],
            "knn_qwk": k["qwk"],
            "knn_accuracy": k["accuracy"],
            "view_retrieval": near["view_retrieval"]["top1"],
        }
        runs[label] = run
    test_samples = k["samples"]

    with open(labels) as f:
        by_grade = {int(r["grade"]): r["image"] for r in csv.DictReader(f) if r.get("grade", "").isdigit()}
    photos = {data / by_grade[g]: g for g in sorted(by_grade, reverse=True)[: plan.attention_images]}
    title = "SYNTHETIC images" if synthetic else data.name
    shown = pictures(out, run_dir, encoder, photos, title)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    contrastive = [m["contrastive_loss"] for m in metrics if "contrastive_loss" in m]
    result = {
        "data": "synthetic" if synthetic else str(data),
        "test_samples": test_samples,
        "rows": rows,
        "chance": {
            "view_retrieval": 1 / max(1, min(test_samples, 256)),
            # Always answering the test split's commonest grade.
            "accuracy": max((index.splits["test"].label_histogram or {"": 0}).values()) / test_samples,
            # Keys that say nothing: each side's loss is 2T ln(batch), two sides.
            "contrastive_loss": 2 * 2 * tiny.model.temperature * math.log(tiny.global_batch),
        },
        "contrastive_first20": sum(contrastive[:20]) / len(contrastive[:20]),
        "contrastive_last20": sum(contrastive[-20:]) / len(contrastive[-20:]),
        "pictures": {
            "saliency preview": graded / "preview.png",
            **shown,
            "confusion (SSiT fine-tuned)": runs["SSiT pretrained"] / "confusion.png",
            "confusion (random init fine-tuned)": runs["random init"] / "confusion.png",
            "fine-tuning curves (SSiT)": runs["SSiT pretrained"] / "curves.png",
        },
        "runs": {"pretrain": run_dir, **runs},
        "seconds": round(time.perf_counter() - started, 1),
    }
    atomic.write_json(out / "results.json", json.loads(json.dumps(result, default=str)))
    return result
