"""Quality benchmark: does SSiT pretraining give better features than plain MoCo v3 and than random init?
Prints one JSON object; asserts nothing about the outcome.

On this CPU, within a time budget (default 38 minutes in all):
1. pack the unlabelled photographs (pretraining only: no evaluated photograph is ever seen in pretraining)
   and every graded photograph of the evaluation folders (default graded/ and graded_natural/) at 128 px;
2. pretrain, for each of 3 seeds, SSiT and the same setup with saliency off (`model.saliency=false`: plain
   MoCo v3, keys from every patch, no saliency head), launch/configs/tiny_cpu.yaml on 2 local ranks, the
   same number of steps each (fitted to the budget from a short calibration run);
3. take frozen CLS features of every graded photograph from each export and from a random init of the
   same architecture (per seed), plus two floors that need no model (colour histogram, 16x16 thumbnail),
   and evaluate them all by ssit_dist/eval/crossval.py: patient-grouped, grade-stratified 5-fold CV, kNN
   and logistic-probe read-outs with hyper-parameters chosen inside the training folds, referable-DR
   AUC, QWK and accuracy with patient-bootstrap 95% intervals, paired differences and their verdicts.
`--features FILE` evaluates features computed elsewhere (an .npz of ssit_dist/eval/features_file.py,
e.g. from the GPU run) with the same code, and skips steps 1-2.

    python bench/experiments/quality.py [--images DIR] [--eval-data DIR ... [--labels FILE ...]]
        [--budget MIN] [--seeds 3] [--features FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ssit_dist.config import PretrainConfig, load_config
from ssit_dist.data.packing.inputs import Labels, read_labels, sample_key
from ssit_dist.data.packing.label_formats import read_label_file
from ssit_dist.eval.floors import floor_features_of_files
from ssit_dist.info import collect
from ssit_dist.models.model_config import ModelConfig
from ssit_dist.stage import StageFailed, cli_command, run_stage

ROOT = Path(__file__).resolve().parents[2]  # the repository
FUNDUS = ROOT.parent / "shared" / "data" / "fundus"
CONFIG = ROOT / "launch" / "configs" / "tiny_cpu.yaml"
PACK_SIZE = 128
CALIBRATION_STEPS = 30
# tiny_cpu.yaml at 128 px with 16 px patches: the same 64 tokens as its 64 px / 8 px, so the same step time,
# with lesions twice the size in pixels. Width and depth stay tiny_cpu's (96, 4): on 2 cores a wider model
# would get a third of the steps in the same budget, and a few hundred steps is already little.
RECIPE = ["model.img_size=128", "model.timm_kwargs={patch_size: 16, embed_dim: 96, depth: 4, num_heads: 3}"]
EVALUATION_S = 120  # crossval.py on one seed's five feature sets, 2,038 photographs, 2 cores
METHODS = {"ssit": [], "moco_v3": ["model.saliency=false"]}
# The differences the benchmark judges: the methods against each other and against random init, random
# init against the floors (how much of its signal a model-free feature already has).
PAIRS = [
    ("ssit", "moco_v3"),
    ("ssit", "random"),
    ("moco_v3", "random"),
    ("random", "colour_histogram"),
    ("random", "thumbnail"),
]


def pretrain(work: Path, name: str, seed: int, steps: int, extra: list[str]) -> dict:
    """A tiny_cpu.yaml run of `steps` steps on 2 ranks, exported; its metrics and wall time."""
    run_dir = work / "runs" / name
    # Up to ten epochs of at least CALIBRATION_STEPS steps, warmup the config's share of the run (2 of 30
    # epochs). The loader restarts at each epoch: the calibration run (one epoch) must restart no more
    # often per step than the real runs, or its step time overstates theirs (10 epochs of 3 steps gave
    # 1.03 s a step where the runs took 0.46 s, and the runs got half the steps the budget allowed).
    epochs = max(1, min(10, steps // CALIBRATION_STEPS))
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
    command = cli_command("pretrain", "--config", str(CONFIG), "--nproc", "2", *RECIPE, *overrides, *extra)
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


@dataclass(frozen=True)
class Graded:
    """Every graded photograph of the evaluation folders, in one order: its key (FOLDER/sample key, as
    the shards and a features file name it), file, grade and patient (None: one eye per patient)."""

    keys: list[str]
    files: list[Path]
    grades: list[int]
    patients: list[str | None]
    folders: list[Path]  # the evaluation folders, in order


def read_graded(folders: list[Path], labels: list[Path]) -> Graded:
    """The labels of the evaluation folders, read as `ssit-dist shard` reads them (any format it knows,
    ungradable rows excluded), so that the keys are the packed samples'; the patient from a `patient`
    column (EyePACS: from the name) where there is one. Rows the packer skips are skipped here, and said
    in one summary per labels file on stderr (stdout holds the JSON alone)."""
    keys, files, grades, patients = [], [], [], []
    for folder, path in zip(folders, labels, strict=True):
        rows = read_label_file(path).rows
        read = read_labels([path], folder, "patient" if rows and "patient" in rows[0].columns else None)
        say_skipped(path, folder, read)
        for rel, grade in read.grades.items():
            keys.append(f"{folder.name}/{sample_key(rel)}")
            files.append(folder / rel)
            grades.append(grade)
            patient = read.groups.get(rel)
            patients.append(f"{folder.name}/{patient}" if patient else None)
    return Graded(keys, files, grades, patients, folders)


def say_skipped(path: Path, folder: Path, read: Labels, shown: int = 3) -> None:
    """One summary on stderr of the rows of `path` left out: bad rows and rows naming an absent photograph
    (a partial download has tens of thousands), each counted with its first few."""
    if read.problems:
        first = "; ".join(map(str, read.problems[:shown]))
        print(f"skipped {len(read.problems)} rows of {path} ({first}{'; ...' if len(read.problems) > shown else ''})",
              file=sys.stderr)  # fmt: skip
    if read.missing:
        first = ", ".join(f"{m.image} (line {m.line})" for m in read.missing[:shown])
        print(f"skipped {len(read.missing)} rows of {path} naming a photograph not under {folder} "
              f"({first}{', ...' if len(read.missing) > shown else ''})", file=sys.stderr)  # fmt: skip


def encoder_features(work: Path, init: str, seed: int, model: ModelConfig, graded: Graded) -> np.ndarray:
    """Frozen CLS features of every graded photograph (rows in `graded.keys` order), from the packed
    evaluation shards, normalised with the pretraining shards' mean/std. A random init takes `model`'s
    architecture, seeded; an export carries its own."""
    from accelerate import Accelerator

    from ssit_dist.data.index import read_index
    from ssit_dist.eval.evaluate import frozen_features
    from ssit_dist.eval.features_file import rows_of
    from ssit_dist.models.pretrained import load_encoder

    random = init == "random"
    torch.manual_seed(seed)
    arch, kwargs = (model.arch, model.timm_kwargs) if random else (None, None)
    encoder, _ = load_encoder(init, model.img_size, arch, kwargs, False)
    stats = read_index(work / "pretrain")
    folders = [work / "eval" / folder.name for folder in graded.folders]
    got = frozen_features(encoder, folders, model.img_size, stats.mean, stats.std, Accelerator(cpu=True))
    return got.features[
        rows_of(got.keys, graded.keys, f"features of {init}")
    ]  # a photograph that did not decode: named


def summary(values: list[float]) -> dict:
    return {
        "mean": round(statistics.fmean(values), 4),
        "std": round(statistics.pstdev(values), 4),
        "values": [round(v, 4) for v in values],
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, default=FUNDUS / "unlabelled", help="Unlabelled pretraining photos.")
    parser.add_argument(
        "--eval-data",
        type=Path,
        nargs="+",
        default=[FUNDUS / "graded", FUNDUS / "graded_natural"],
        help="Folders of graded photographs, each with its labels.csv (image,grade[,patient]).",
    )
    parser.add_argument(
        "--labels",
        type=Path,
        nargs="+",
        default=None,
        help="A labels file per --eval-data folder, in any format `ssit-dist shard` reads (default: its labels.csv).",
    )
    parser.add_argument("--budget", type=float, default=38.0, help="Minutes for the whole benchmark.")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="Keep shards, runs and logs here.")
    parser.add_argument("--features", type=Path, default=None, help="Evaluate this features .npz instead.")
    parser.add_argument("--resamples", type=int, default=1000, help="Patient-bootstrap resamples per interval.")
    return parser.parse_args()


def pack_inputs(images: Path, graded: Graded, labels: list[Path], work: Path) -> None:
    """WORK/pretrain (unlabelled) and WORK/eval/NAME for each evaluation folder (one split, all labelled)."""
    pack = ["shard", "--size", str(PACK_SIZE), "--workers", "2", "--overwrite"]
    command = cli_command(*pack, str(images), str(work / "pretrain"))
    run_stage("pack the pretraining photographs", command, work / "pack_pretrain.log")
    for folder, csv_path in zip(graded.folders, labels, strict=True):
        command = cli_command(*pack, str(folder), str(work / "eval" / folder.name), "--labels", str(csv_path))
        run_stage(f"pack the graded photographs of {folder}", command, work / f"pack_{folder.name}.log")


@dataclass
class Comparison:
    """Per seed, each method's features of every graded photograph; per method, its pretraining runs."""

    features: list[dict[str, np.ndarray]]
    pretraining: dict[str, list[dict]]
    steps: int
    features_s: float  # the features of one encoder


def compare(work: Path, model: ModelConfig, graded: Graded, seeds: int, budget_s: float, started: float) -> Comparison:
    """Every method pretrained for each seed, and the features of each export and of a random init."""
    # Calibration: a short SSiT run gives the seconds per step and the fixed cost of a run; one random
    # init's features give the cost of an encoder's features. Evaluating features costs about a minute
    # per seed (kept aside); the rest of the budget is split evenly over the pretraining runs.
    calibration = pretrain(work, "calibration", 0, CALIBRATION_STEPS, [])
    fixed_s = calibration["wall_s"] - calibration["steps"] * calibration["step_s"]
    features_started = time.perf_counter()
    per_seed: list[dict[str, np.ndarray]] = [{"random": encoder_features(work, "random", 0, model, graded)}]
    features_s = time.perf_counter() - features_started
    runs = len(METHODS) * seeds
    left = budget_s - (time.perf_counter() - started) - features_s * (runs + seeds - 1) - EVALUATION_S * seeds
    steps = max(CALIBRATION_STEPS, int((left / runs - fixed_s) / calibration["step_s"]))

    pretraining: dict[str, list[dict]] = {name: [] for name in METHODS}
    for seed in range(seeds):
        if seed:
            per_seed.append({"random": encoder_features(work, "random", seed, model, graded)})
        for method, extra in METHODS.items():
            trained = pretrain(work, f"{method}{seed}", seed, steps, extra)
            pretraining[method].append(trained)
            per_seed[seed][method] = encoder_features(work, trained["encoder"], seed, model, graded)
    return Comparison(per_seed, pretraining, steps, features_s)


def evaluate(
    features: dict[str, np.ndarray], floors: dict[str, np.ndarray], graded: Graded, seed: int, resamples: int
) -> dict:
    """ssit_dist/eval/crossval.py on one seed's features and the floors, every pair of interest judged."""
    from ssit_dist.eval.crossval import Protocol, evaluate_features

    methods = {**features, **floors}
    pairs = [(a, b) for a, b in PAIRS if a in methods and b in methods]
    return evaluate_features(methods, graded.grades, graded.patients, pairs, Protocol(seed=seed, resamples=resamples))


def report(args: argparse.Namespace, model: ModelConfig, done: Comparison, evaluations: list[dict], wall: dict) -> dict:
    return {
        "machine": collect()["cpu"] | {"torch": torch.__version__},
        "setup": {
            "config": str(CONFIG.relative_to(ROOT)),
            "pretrain_images": str(args.images.resolve()),
            "eval_data": [str(p.resolve()) for p in args.eval_data],
            "pack_size": PACK_SIZE,
            "img_size": model.img_size,
            "ranks": 2,
            "seeds": args.seeds,
            "steps_per_run": done.steps,
        },
        "evaluation_by_seed": evaluations,
        "pretraining": {
            name: {
                "contrastive_first20": summary([r["contrastive_first20"] for r in rows]),
                "contrastive_last20": summary([r["contrastive_last20"] for r in rows]),
                "step_s": summary([r["step_s"] for r in rows]),
                "wall_s_per_run": summary([r["wall_s"] for r in rows]),
            }
            for name, rows in done.pretraining.items()
        },
        "wall_s": wall | {"features_per_encoder": round(done.features_s, 1), "budget": args.budget * 60},
    }


def from_features_file(args: argparse.Namespace, graded: Graded, floors: dict[str, np.ndarray]) -> dict:
    """The same evaluation on features computed elsewhere: every method in the file, the floors beside."""
    from ssit_dist.eval.features_file import load_features, rows_of

    keys, features = load_features(args.features)
    rows = rows_of(keys, graded.keys, str(args.features))
    return {
        "features": str(args.features),
        "evaluation": evaluate({m: x[rows] for m, x in features.items()}, floors, graded, 0, args.resamples),
    }


def main() -> None:
    args = parse_args()
    labels = args.labels or [folder / "labels.csv" for folder in args.eval_data]
    for folder in (args.images, *args.eval_data):
        if not folder.is_dir():
            print(json.dumps({"skipped": f"{folder} not found: pass --images / --eval-data (../shared is absent)"}))
            return
    if len(labels) != len(args.eval_data) or not all(p.is_file() for p in labels):
        raise SystemExit(f"labels {labels}: give one labels file (image,grade[,patient], or a public set's) per folder")
    started = time.perf_counter()
    graded = read_graded(args.eval_data, labels)
    floors = floor_features_of_files(graded.files)
    if args.features is not None:
        print(json.dumps(from_features_file(args, graded, floors), indent=1))
        return
    model = load_config(CONFIG, RECIPE, PretrainConfig).model
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        pack_inputs(args.images, graded, labels, work)
        packed_s = time.perf_counter() - started
        done = compare(work, model, graded, args.seeds, args.budget * 60, started)
    evaluated = time.perf_counter()
    evaluations = [evaluate(f, floors, graded, seed, args.resamples) for seed, f in enumerate(done.features)]
    wall = {"packing": round(packed_s, 1), "evaluation": round(time.perf_counter() - evaluated, 1)}
    wall["total"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report(args, model, done, evaluations, wall), indent=1))


if __name__ == "__main__":
    try:
        main()
    except StageFailed as e:  # the stage's log says why; a traceback of this script would not
        raise SystemExit(str(e)) from None
