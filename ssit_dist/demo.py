"""`ssit-dist demo`: the whole pipeline on a built-in synthetic set, in minutes on 2 CPU cores.

1. write synthetic fundus photographs (ssit_dist/data/packing/synthetic.py): an unlabelled pool for pretraining
   and a graded set (equal numbers per grade), or take the user's own folder and labels CSV;
2. pack them into shards with saliency maps (the graded set split train/val/test, stratified);
3. pretrain SSiT with DeepSpeed on 2 local ranks (launch/configs/tiny_cpu.yaml, fitted to the demo);
4. export the encoder;
5. fine-tune on the train split from the export and from random init, the same recipe for both, model
   selection on val; weighted kNN on frozen features; view retrieval;
6. grade the held-out test photographs from their original files with `ssit-dist predict` (the fine-tuned
   SSiT grader, scored against the labels CSV) and write its page;
7. print one table and the paths of the pictures (saliency preview, curves, attention, confusion, the page).

Each stage that trains runs as its own process (as a user would run it); its log is under OUT/logs.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import cv2
from pydantic import Field

from ssit_dist import atomic
from ssit_dist.config import RUN_CONFIGS
from ssit_dist.configclass import configclass, require
from ssit_dist.data.index import ShardIndex, split_sources
from ssit_dist.stage import cli_command, finetune_command, run_stage, segment_command


@configclass(frozen=True)
class DemoPlan:
    """Sizes and budget, chosen so the whole demo ends in under 10 minutes on 2 CPU cores."""

    pretrain_images: int = Field(default=800, description="synthetic photographs to pretrain on", ge=8)
    graded_per_grade: int = Field(default=80, description="synthetic graded photographs per DR grade", ge=4)
    split: str = Field(
        default="train=0.5,val=0.125,test=0.375", description="split of the graded set, stratified by grade"
    )
    generate_size: int = Field(default=256, description="side of the generated photographs, pixels", ge=32)
    pack_size: int = Field(default=128, description="side of the packed crops, pixels", ge=32)
    # tiny_cpu.yaml's ViT at 128 px with 16 px patches: as many tokens as its 64 px / 8 px, and lesions
    # twice the size in pixels.
    img_size: int = Field(default=128, description="model input size, pixels", gt=0)
    patch_size: int = Field(default=16, description="ViT patch size, pixels", gt=0)
    pretrain_epochs: int = Field(default=12, description="pretraining length", ge=1)
    # Classification: with the regression objective (MSE on the grade) both inits stayed at a constant
    # prediction on 200 training images in 20 epochs.
    objective: Literal["regression", "classification"] = Field(
        default="classification", description="fine-tuning objective"
    )
    finetune_epochs: int = Field(default=20, description="fine-tuning length", ge=1)
    finetune_lr: float = Field(default=3e-4, description="fine-tuning learning rate", gt=0)
    knn_k: int = Field(default=10, description="neighbours of the kNN grading", ge=1)
    attention_images: int = Field(default=4, description="photographs in the attention picture", ge=1)
    segment_photos: int = Field(
        default=32, description="synthetic photographs with vessel masks: half train, a quarter val and test", ge=4
    )
    segment_iterations: int = Field(default=240, description="segmentation steps from each init", ge=4)
    ranks: int = Field(default=2, description="CPU ranks; on a GPU machine one rank per GPU, at most this many", ge=1)
    seed: int = Field(default=0, description="seeds generation, pretraining and fine-tuning", ge=0)

    def validate(self) -> None:
        require(self.img_size % self.patch_size == 0, "img_size", self.img_size, "must be a multiple of patch_size")


# `ssit-dist demo --quick`: every stage, about a minute; checks an installation, its numbers mean nothing.
QUICK = DemoPlan(
    pretrain_images=64,
    graded_per_grade=12,
    pretrain_epochs=1,
    finetune_epochs=1,
    attention_images=2,
    segment_photos=8,
    segment_iterations=4,
)


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
    from ssit_dist.data.packing.synthetic import synthetic_fundus

    grade, seed, size, path = job
    image = synthetic_fundus(grade, seed, size)
    if not cv2.imwrite(str(path), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92]):
        raise OSError(f"could not write {path}")


def write_synthetic_set(folder: Path, plan: DemoPlan, report: Report) -> None:
    """folder/synthetic_pretrain/*.jpg (plan.pretrain_images, an unlabelled pool, grades in equal shares)
    and folder/synthetic_graded/*.jpg (plan.graded_per_grade of each grade) with its labels.csv
    (image,grade), written by 2 processes."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    from ssit_dist.data.packing.synthetic import GRADES

    jobs, rows = [], []
    for part, count, offset in (
        ("pretrain", plan.pretrain_images, 0),
        ("graded", plan.graded_per_grade * GRADES, 500_000),
    ):
        images = folder / f"synthetic_{part}"
        images.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            name = f"synthetic_{part}_{i:05d}.jpg"
            jobs.append((i % GRADES, plan.seed * 1_000_003 + offset + i, plan.generate_size, images / name))
            if part == "graded":
                rows.append((name, i % GRADES))
    stage = Stage("generate synthetic photographs", len(jobs), "images")
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        for _ in pool.map(_write_synthetic, jobs, chunksize=16):
            stage.done += 1
            report(stage)
    with open(folder / "synthetic_graded" / "labels.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "grade"])
        writer.writerows(rows)


def pack_folder(
    images: Path, out: Path, plan: DemoPlan, report: Report, labels: Path | None = None, preview: int = 0
) -> ShardIndex:
    from ssit_dist.data.packing.inputs import discover
    from ssit_dist.data.packing.options import ShardOptions
    from ssit_dist.data.packing.shard import pack

    split = plan.split if labels else None
    inputs = discover(images, [labels] if labels else [], split, plan.seed)
    stage = Stage(f"pack {images.name}", len(inputs.items), "images")
    opts = ShardOptions(
        size=plan.pack_size, shard_size=256, workers=2, overwrite=True, split=split, seed=plan.seed, preview=preview
    )

    def advance(_: object) -> None:
        stage.done += 1
        report(stage)

    index = pack(images, out, inputs, opts, advance)
    if index.skipped:
        stage.notes += [f"skipped {s['path']}: {s['reason']}" for s in index.skipped]
        report(stage)
    return index


@dataclass(frozen=True)
class DemoRun:
    """One demo's folder, plan and progress display: what its stages share."""

    out: Path
    plan: DemoPlan
    report: Report
    synthetic: bool

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def graded(self) -> Path:
        return self.out / "shards" / "graded"

    def run_dir(self, name: str) -> Path:
        """OUT/runs/NAME, named synthetic_NAME on the synthetic set."""
        return self.out / "runs" / f"{'synthetic_' if self.synthetic else ''}{name}"


@dataclass(frozen=True)
class Packed:
    """The graded set's shards (split train/val/test) and what pretraining reads."""

    index: ShardIndex
    pretrain_shards: list[str]
    pretraining_images: int


def watch(command: list[str], log: Path, stage: Stage, count: Callable[[], int], report: Report) -> None:
    """Run `command` as its own process with its output in `log`, updating `stage` from `count()`."""

    def progress() -> None:
        stage.done = min(count(), stage.total)
        report(stage)

    run_stage(stage.name, command, log, progress)
    stage.done = stage.total
    report(stage)


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.is_file() else 0


def photographs(demo: DemoRun, data: Path | None, labels: Path | None) -> tuple[Path, Path]:
    """The graded photographs and their labels CSV: the user's own, or a synthetic set written now."""
    if data is None:
        images = demo.out / "images"
        write_synthetic_set(images, demo.plan, demo.report)
        data, labels = images / "synthetic_graded", images / "synthetic_graded" / "labels.csv"
    assert labels is not None
    return data, labels


def pack_all(demo: DemoRun, data: Path, labels: Path) -> Packed:
    """The graded set, split and with a saliency preview; on the synthetic set also the unlabelled pool.
    Pretraining reads the pool and the graded train split, never the val or test photographs."""
    index = pack_folder(data, demo.graded, demo.plan, demo.report, labels, preview=6)
    graded_train = index.splits["train"].num_samples
    if not demo.synthetic:
        return Packed(index, [str(demo.graded)], graded_train)
    pool = demo.out / "shards" / "pretrain"
    pool_index = pack_folder(demo.out / "images" / "synthetic_pretrain", pool, demo.plan, demo.report)
    return Packed(index, [str(pool), str(demo.graded)], pool_index.splits["train"].num_samples + graded_train)


def _ranks(plan: DemoPlan) -> tuple[int, str]:
    """Pretraining ranks: one per GPU (at most plan.ranks), else plan.ranks CPU ranks; and their name."""
    import torch

    gpus = torch.cuda.device_count()
    ranks = min(plan.ranks, gpus) if gpus else plan.ranks
    return ranks, f"{ranks} GPU{'s' * (ranks > 1)}" if gpus else f"{ranks} CPU ranks"


def pretrain(demo: DemoRun, shards: list[str], timm_kwargs: dict, run_dir: Path, steps_per_epoch: int) -> None:
    """tiny_cpu.yaml fitted to the demo: its images and patches, retrieval on the graded val split."""
    plan = demo.plan
    overrides = [
        f"run_dir={run_dir}",
        f"data.shards=[{','.join(shards)}]",
        "data.split=train",
        f"model.img_size={plan.img_size}",
        f"model.timm_kwargs={json.dumps(timm_kwargs)}",
        f"epochs={plan.pretrain_epochs}",
        "optim.warmup_epochs=0.5",
        f"checkpoint_every={steps_per_epoch * plan.pretrain_epochs}",
        f"retrieval.shards={demo.graded}:val",
        f"retrieval.every={steps_per_epoch}",
        f"seed={plan.seed}",
    ]
    ranks, where = _ranks(plan)
    stage = Stage(f"pretrain SSiT (DeepSpeed, {where})", steps_per_epoch * plan.pretrain_epochs, "steps")
    command = cli_command("pretrain", "--config", str(RUN_CONFIGS / "tiny_cpu.yaml"), "--nproc", str(ranks), *overrides)
    watch(command, demo.logs / "pretrain.log", stage, lambda: _lines(run_dir / "metrics.jsonl"), demo.report)


def finetune(demo: DemoRun, init: str, run_dir: Path, model_args: list[str]) -> dict:
    """Fine-tune on the graded train split, model selection on val; the report on test."""
    plan = demo.plan
    overrides = [
        f"train={demo.graded}:train",
        f"val={demo.graded}:val",
        f"test={demo.graded}:test",
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
    log = demo.logs / f"{run_dir.name}.log"
    watch(finetune_command(*overrides), log, stage, lambda: _lines(run_dir / "metrics.jsonl"), demo.report)
    return json.loads((run_dir / "report.json").read_text())


def knn(demo: DemoRun, label: str, init: str, random_arch: dict | None) -> dict:
    """Weighted kNN grading and view retrieval on the test split (in this process, seeded)."""
    import torch

    from ssit_dist.eval.knn import KnnConfig, knn_evaluate

    stage = Stage(f"kNN and view retrieval ({label})", 1, "")
    demo.report(stage)
    torch.manual_seed(demo.plan.seed)  # a random init is drawn from the global generator
    arch = random_arch or {}
    config = KnnConfig(
        train=f"{demo.graded}:train",
        test=f"{demo.graded}:test",
        init=init,
        img_size=demo.plan.img_size,
        ks=[demo.plan.knn_k],
        arch=arch.get("arch"),
        timm_kwargs=arch.get("timm_kwargs"),
    )
    result = knn_evaluate(config)
    stage.done = 1
    demo.report(stage)
    return result


def compare_inits(demo: DemoRun, encoder: Path, random_arch: dict) -> tuple[dict, dict[str, Path], int]:
    """Fine-tuning and kNN from the SSiT export and from a random init of the same architecture: the
    table's rows, the fine-tuning runs, and the number of test photographs."""
    random_args = [f"arch={random_arch['arch']}", f"timm_kwargs={json.dumps(random_arch['timm_kwargs'])}"]
    rows, runs = {}, {}
    for label, init, args in (("SSiT pretrained", str(encoder), []), ("random init", "random", random_args)):
        run = demo.run_dir(f"finetune_{'ssit' if init != 'random' else 'random'}")
        tuned = finetune(demo, init, run, args)
        near = knn(demo, label, init, None if init != "random" else random_arch)
        k = near["k"][str(demo.plan.knn_k)]
        rows[label] = {
            "finetune_qwk": tuned["test"]["qwk"],
            "finetune_accuracy": tuned["test"]["accuracy"],
            "knn_qwk": k["qwk"],
            "knn_accuracy": k["accuracy"],
            "view_retrieval": near["view_retrieval"]["top1"],
        }
        runs[label] = run
    return rows, runs, k["samples"]


def grade_held_out(demo: DemoRun, data: Path, labels: Path, grader_run: Path) -> dict:
    """`ssit-dist predict` on the test split's original photographs with the fine-tuned grader, scored
    against the labels CSV: the last step a user takes. Its metrics must equal the fine-tuning run's own
    test metrics: the same photographs, preprocessed by the same code."""
    photos = [str(data / source) for source in split_sources(demo.graded, "test")]
    out = demo.out / "predictions"
    stage = Stage("grade the held-out photographs (predict)", 1, "")
    demo.report(stage)
    command = cli_command(
        "predict", *photos, "--model", str(grader_run), "--labels", str(labels), "-o", str(out / "predictions.csv")
    )
    command += ["--html", str(out / "report.html"), "--workers", "0", "--overwrite"]
    run_stage(stage.name, command, demo.logs / "predict.log")
    stage.done = 1
    demo.report(stage)
    metrics = json.loads((out / "metrics.json").read_text())
    values = {name: metrics[name]["value"] for name in ("qwk", "accuracy")}
    return values | {"photographs": len(photos), "page": out / "report.html", "csv": out / "predictions.csv"}


def attention_photos(data: Path, labels: Path, count: int) -> dict[Path, int]:
    """One photograph of each of the `count` highest grades (path -> grade)."""
    with open(labels) as f:
        by_grade = {int(r["grade"]): r["image"] for r in csv.DictReader(f) if r.get("grade", "").isdigit()}
    return {data / by_grade[g]: g for g in sorted(by_grade, reverse=True)[:count]}


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


def contrastive_ends(run_dir: Path) -> dict[str, float]:
    """The pretraining's mean contrastive loss over its first and its last 20 steps."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    contrastive = [m["contrastive_loss"] for m in metrics if "contrastive_loss" in m]
    return {
        "contrastive_first20": sum(contrastive[:20]) / len(contrastive[:20]),
        "contrastive_last20": sum(contrastive[-20:]) / len(contrastive[-20:]),
    }


def chance_levels(index: ShardIndex, test_samples: int, temperature: float, batch: int) -> dict[str, float]:
    """What each number of the table is without learning anything."""
    return {
        "view_retrieval": 1 / max(1, min(test_samples, 256)),
        # Always answering the test split's commonest grade.
        "accuracy": max((index.splits["test"].label_histogram or {"": 0}).values()) / test_samples,
        # Keys that say nothing: each side's loss is 2T ln(batch), two sides.
        "contrastive_loss": 2 * 2 * temperature * math.log(batch),
    }


def segment_vessels(demo: DemoRun, encoder: Path, random_arch: dict) -> dict[str, dict]:
    """Vessels of synthetic photographs (the generator writes their masks), `ssit-dist segment` from the
    SSiT export and from a random init: test Dice, AUC-PR and the constant-prediction Dice per init."""
    from ssit_dist.data.packing.synthetic import write_synthetic_segmentation

    plan = demo.plan
    quarter = plan.segment_photos // 4
    counts = {"train": plan.segment_photos - 2 * quarter, "val": quarter, "test": quarter}
    data = write_synthetic_segmentation(demo.out / "synthetic_vessels", counts, plan.generate_size, seed=plan.seed + 1)
    random_args = [f"arch={random_arch['arch']}", f"timm_kwargs={json.dumps(random_arch['timm_kwargs'])}"]
    every = max(plan.segment_iterations // 4, 1)
    results = {}
    for label, init, args in (("SSiT pretrained", str(encoder), []), ("random init", "random", random_args)):
        run_dir = demo.run_dir(f"segment_{'ssit' if init != 'random' else 'random'}")
        overrides = [f"data={data}", f"init={init}", f"run_dir={run_dir}", f"img_size={plan.img_size}"]
        overrides += [f"resize={plan.generate_size}", f"iterations={plan.segment_iterations}", f"eval_every={every}"]
        overrides += [f"warmup={plan.segment_iterations // 10}", "workers=0", f"seed={plan.seed}", *args]
        stage = Stage(f"segment vessels from {'the SSiT export' if init != 'random' else 'random init'}", 4, "checks")
        count = lambda run=run_dir: _lines(run / "metrics.jsonl")  # noqa: E731
        watch(segment_command(*overrides), demo.logs / f"{run_dir.name}.log", stage, count, demo.report)
        vessels = json.loads((run_dir / "report.json").read_text())["test"]["classes"]["vessels"]
        results[label] = {k: vessels[k] for k in ("dice", "auc_pr", "constant_dice")} | {"run": run_dir}
    return results


def run_demo(
    out: Path, report: Report, data: Path | None = None, labels: Path | None = None, plan: DemoPlan | None = None
) -> dict:
    """The demo's stages in order; returns the results table's rows, the pictures and the notes."""
    from ssit_dist.config import PretrainConfig, load_config
    from ssit_dist.train.export import export_encoder

    started = time.perf_counter()
    demo = DemoRun(out, plan or DemoPlan(), report, synthetic=data is None)
    data, labels = photographs(demo, data, labels)
    packed = pack_all(demo, data, labels)
    tiny = load_config(RUN_CONFIGS / "tiny_cpu.yaml", [], PretrainConfig)
    timm_kwargs = {**tiny.model.timm_kwargs, "patch_size": demo.plan.patch_size}
    run_dir = demo.run_dir("pretrain")
    steps_per_epoch = max(1, packed.pretraining_images // tiny.global_batch)
    pretrain(demo, packed.pretrain_shards, timm_kwargs, run_dir, steps_per_epoch)
    encoder = out / "encoder.safetensors"
    export_encoder(run_dir, encoder, overwrite=True)
    rows, runs, test_samples = compare_inits(demo, encoder, {"arch": tiny.model.arch, "timm_kwargs": timm_kwargs})
    # Segmentation needs masks: the synthetic set has them, a folder of one's own photographs does not.
    arch = {"arch": tiny.model.arch, "timm_kwargs": timm_kwargs}
    vessels = segment_vessels(demo, encoder, arch) if demo.synthetic else {}
    graded = grade_held_out(demo, data, labels, runs["SSiT pretrained"])
    photos = attention_photos(data, labels, demo.plan.attention_images)
    shown = pictures(out, run_dir, encoder, photos, "SYNTHETIC images" if demo.synthetic else data.name)
    result = {
        "data": "synthetic" if demo.synthetic else str(data),
        "test_samples": test_samples,
        "rows": rows,
        "chance": chance_levels(packed.index, test_samples, tiny.model.temperature, tiny.global_batch),
        **contrastive_ends(run_dir),
        "pictures": {
            "saliency preview": demo.graded / "preview.png",
            **shown,
            "confusion (SSiT fine-tuned)": runs["SSiT pretrained"] / "confusion.png",
            "confusion (random init fine-tuned)": runs["random init"] / "confusion.png",
            "fine-tuning curves (SSiT)": runs["SSiT pretrained"] / "curves.png",
            **({"vessel segmentation (SSiT)": vessels["SSiT pretrained"]["run"] / "overlays.png"} if vessels else {}),
        },
        "segmentation": {label: {k: v for k, v in r.items() if k != "run"} for label, r in vessels.items()},
        "predict": graded,
        "runs": {"pretrain": run_dir, **runs},
        "seconds": round(time.perf_counter() - started, 1),
    }
    atomic.write_json(out / "results.json", json.loads(json.dumps(result, default=str)))
    return result
