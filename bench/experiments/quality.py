"""Quality benchmark: does SSiT pretraining give better features than plain MoCo v3 and than random init?
Prints one JSON object; asserts nothing about the outcome.

On this CPU, within a time budget (default 38 minutes in all):
1. pack the unlabelled photographs (pretraining) and the graded ones (evaluation: train 0.6, val 0.15,
   test 0.25, stratified by grade) at 128 px;
2. pretrain, for each of 3 seeds, SSiT and the same setup with saliency off (`model.saliency=false`: plain
   MoCo v3, keys from every patch, no saliency head), launch/configs/tiny_cpu.yaml on 2 local ranks, the
   same number of steps each (fitted to the budget from a short calibration run);
3. evaluate each export and a random init of the same architecture (per seed) on the graded set:
   weighted kNN (k = 10) QWK and accuracy, linear-probe QWK and accuracy (`ssit-dist finetune --linear`, 10 epochs,
   model selected on val, reported on test), and view retrieval (top-1 partner view, chance 1/N) on the
   test split; means and population standard deviations over the seeds.

    python bench/experiments/quality.py [--images DIR] [--eval-data DIR --labels CSV] [--budget MIN] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ssit_dist.config import PretrainConfig, load_config
from ssit_dist.info import collect
from ssit_dist.models.ssit import ModelConfig
from ssit_dist.stage import StageFailed, cli_command, finetune_command, run_stage

ROOT = Path(__file__).resolve().parents[2]  # the repository
FUNDUS = ROOT.parent / "shared" / "data" / "fundus"
CONFIG = ROOT / "launch" / "configs" / "tiny_cpu.yaml"
PACK_SIZE = 128
KNN_K = 10
CALIBRATION_STEPS = 30
PROBE_EPOCHS = 10
METHODS = {"ssit": [], "moco_v3": ["model.saliency=false"]}


def pretrain(work: Path, name: str, seed: int, steps: int, extra: list[str]) -> dict:
    """A tiny_cpu.yaml run of `steps` steps on 2 ranks, exported; its metrics and wall time."""
    run_dir = work / "runs" / name
    # Ten epochs (the loader restarts at each), warmup the config's share of the run (2 of 30 epochs).
    epochs = min(10, steps)
    overrides = [
        f"run_dir={run_dir}",
        f"data.shards=[{work / 'pretrain'}]",
        f"seed={seed}",
        f"epochs={epochs}",
        f"steps_per_epoch={steps // epochs}",
        f"optim.warmup_epochs={epochs * 2 / 30:.4f}",
        f"checkpoint_every={steps}",
    ]
    started = time.perf_counter()
    command = cli_command("pretrain", "--config", str(CONFIG), "--nproc", "2", *overrides, *extra)
    run_stage(f"pretrain {name}", command, work / f"{name}.log")
    wall = time.perf_counter() - started
    command = cli_command("export", str(run_dir), "-o", str(work / "exports" / name))
    run_stage(f"export {name}", command, work / f"{name}.export.log")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "contrastive_loss" in r]
    contrastive = [r["contrastive_loss"] for r in rows]
    return {
        "steps": len(rows),
        "wall_s": round(wall, 1),
        "step_s": statistics.median(r["step_s"] for r in rows[1:] or rows),
        "contrastive_first20": round(statistics.fmean(contrastive[:20]), 4),
        "contrastive_last20": round(statistics.fmean(contrastive[-20:]), 4),
        "encoder": str(work / "exports" / f"{name}.safetensors"),
    }


def evaluate(work: Path, name: str, init: str, seed: int, model: ModelConfig) -> dict:
    """kNN (in this process, seeded so that a random init differs per seed), view retrieval, linear probe.
    A random init takes `model`'s architecture; an export carries its own."""
    from ssit_dist.eval.knn import KnnConfig, knn_evaluate

    random = init == "random"
    torch.manual_seed(seed)
    config = KnnConfig(
        train=f"{work / 'eval'}:train",
        test=f"{work / 'eval'}:test",
        init=init,
        img_size=model.img_size,
        ks=[KNN_K],
        arch=model.arch if random else None,
        timm_kwargs=model.timm_kwargs if random else None,
    )
    knn = knn_evaluate(config)
    probe_dir = work / "probes" / name
    overrides = [
        f"train={work / 'eval'}:train",
        f"val={work / 'eval'}:val",
        f"test={work / 'eval'}:test",
        f"init={init}",
        f"run_dir={probe_dir}",
        "linear=true",
        f"img_size={model.img_size}",
        f"seed={seed}",
        f"epochs={PROBE_EPOCHS}",
        "workers=0",  # a few hundred small images: decoding in-process beats starting a worker each epoch
    ]
    if random:
        overrides += [f"arch={model.arch}", f"timm_kwargs={json.dumps(model.timm_kwargs)}"]
    run_stage(f"linear probe {name}", finetune_command(*overrides), work / f"{name}.probe.log")
    probe = json.loads((probe_dir / "report.json").read_text())["test"]
    k = knn["k"][str(KNN_K)]
    return {
        "knn_qwk": k["qwk"],
        "knn_accuracy": k["accuracy"],
        "linear_qwk": probe["qwk"],
        "linear_accuracy": probe["accuracy"],
        "view_retrieval": knn["view_retrieval"]["top1"],
        "retrieval_chance": knn["view_retrieval"]["chance"],
        "test_samples": k["samples"],
    }


def summary(values: list[float]) -> dict:
    return {
        "mean": round(statistics.fmean(values), 4),
        "std": round(statistics.pstdev(values), 4),
        "values": [round(v, 4) for v in values],
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, default=FUNDUS / "unlabelled", help="Unlabelled pretraining photos.")
    parser.add_argument("--eval-data", type=Path, default=FUNDUS / "graded", help="Labelled photographs.")
    parser.add_argument("--labels", type=Path, default=None, help="CSV image,grade (default EVAL_DATA/labels.csv).")
    parser.add_argument("--budget", type=float, default=38.0, help="Minutes for the whole benchmark.")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="Keep shards, runs and logs here.")
    return parser.parse_args()


def pack_inputs(images: Path, eval_data: Path, labels: Path, work: Path) -> None:
    """WORK/pretrain (unlabelled) and WORK/eval (split train/val/test, stratified by grade)."""
    pack = ["shard", "--size", str(PACK_SIZE), "--workers", "2", "--overwrite"]
    command = cli_command(*pack, str(images), str(work / "pretrain"))
    run_stage("pack the pretraining photographs", command, work / "pack_pretrain.log")
    split = "train=0.6,val=0.15,test=0.25"
    command = cli_command(*pack, str(eval_data), str(work / "eval"), "--labels", str(labels), "--split", split)
    run_stage("pack the graded photographs", command, work / "pack_eval.log")


@dataclass
class Comparison:
    """Per method (and "random"), one row per seed; the steps every pretraining run took."""

    results: dict[str, list[dict]]
    pretraining: dict[str, list[dict]]
    steps: int
    eval_s: float  # the evaluation of one encoder


def compare(work: Path, model: ModelConfig, seeds: int, budget_s: float, started: float) -> Comparison:
    """Every method pretrained and evaluated for each seed, with a random init's evaluation per seed."""
    # Calibration: a short SSiT run gives the seconds per step and the fixed cost of a run; one random
    # init's evaluation gives the cost of evaluating an encoder. The rest of the budget is split evenly.
    calibration = pretrain(work, "calibration", 0, CALIBRATION_STEPS, [])
    fixed_s = calibration["wall_s"] - calibration["steps"] * calibration["step_s"]
    eval_started = time.perf_counter()
    results: dict[str, list[dict]] = {"random": [evaluate(work, "random0", "random", 0, model)]}
    eval_s = time.perf_counter() - eval_started
    runs = len(METHODS) * seeds
    left = budget_s - (time.perf_counter() - started) - eval_s * (runs + seeds - 1)
    steps = max(CALIBRATION_STEPS, int((left / runs - fixed_s) / calibration["step_s"]))

    pretraining: dict[str, list[dict]] = {name: [] for name in METHODS}
    for seed in range(seeds):
        if seed:
            results["random"].append(evaluate(work, f"random{seed}", "random", seed, model))
        for method, extra in METHODS.items():
            name = f"{method}{seed}"
            trained = pretrain(work, name, seed, steps, extra)
            pretraining[method].append(trained)
            results.setdefault(method, []).append(evaluate(work, name, trained["encoder"], seed, model))
    return Comparison(results, pretraining, steps, eval_s)


def report(args: argparse.Namespace, model: ModelConfig, done: Comparison, packed_s: float, started: float) -> dict:
    metrics = ("knn_qwk", "knn_accuracy", "linear_qwk", "linear_accuracy", "view_retrieval")
    return {
        "machine": collect()["cpu"] | {"torch": torch.__version__},
        "setup": {
            "config": str(CONFIG.relative_to(ROOT)),
            "pretrain_images": str(args.images.resolve()),
            "eval_data": str(args.eval_data.resolve()),
            "pack_size": PACK_SIZE,
            "img_size": model.img_size,
            "ranks": 2,
            "seeds": args.seeds,
            "steps_per_run": done.steps,
            "knn_k": KNN_K,
            "test_samples": done.results["random"][0]["test_samples"],
            "retrieval_chance": done.results["random"][0]["retrieval_chance"],
            "accuracy_chance_uniform": 0.2,
        },
        "results": {name: {m: summary([r[m] for r in rows]) for m in metrics} for name, rows in done.results.items()},
        "pretraining": {
            name: {
                "contrastive_first20": summary([r["contrastive_first20"] for r in rows]),
                "contrastive_last20": summary([r["contrastive_last20"] for r in rows]),
                "step_s": summary([r["step_s"] for r in rows]),
                "wall_s_per_run": summary([r["wall_s"] for r in rows]),
            }
            for name, rows in done.pretraining.items()
        },
        "wall_s": {
            "packing": round(packed_s, 1),
            "evaluation_per_encoder": round(done.eval_s, 1),
            "total": round(time.perf_counter() - started, 1),
            "budget": args.budget * 60,
        },
    }


def main() -> None:
    args = parse_args()
    labels = args.labels or args.eval_data / "labels.csv"
    for folder in (args.images, args.eval_data):
        if not folder.is_dir():
            print(json.dumps({"skipped": f"{folder} not found: pass --images / --eval-data (../shared is absent)"}))
            return
    if not labels.is_file():
        raise SystemExit(f"labels {labels} not found: pass --labels CSV (columns image,grade)")

    model = load_config(CONFIG, [], PretrainConfig).model
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        pack_inputs(args.images, args.eval_data, labels, work)
        packed_s = time.perf_counter() - started
        done = compare(work, model, args.seeds, args.budget * 60, started)
    print(json.dumps(report(args, model, done, packed_s, started), indent=1))


if __name__ == "__main__":
    try:
        main()
    except StageFailed as e:  # the stage's log says why; a traceback of this script would not
        raise SystemExit(str(e)) from None
