"""`make gpu-run` in its CPU smoke mode, end to end on real photographs: the travel folder that
bench/checks/travel.py prepares, every part of the GPU run at tiny sizes, and the CPU-side evaluation
(bench/experiments/quality.py --features) of the features it brings back. The GPU is lent only at
times; this keeps the one command it runs from rotting in between."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
FUNDUS = ROOT.parent / "shared" / "data" / "fundus"
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _subset(source: Path, out: Path, rows: list[dict[str, str]]) -> Path:
    """A graded folder of `rows` of `source`'s labels.csv, the photographs linked, never copied."""
    out.mkdir()
    for row in rows:
        (out / row["image"]).symlink_to(source / row["image"])
    with open(out / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def _run(*command: object, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MAKEFLAGS")}
    result = subprocess.run(
        [str(c) for c in command], capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout
    )
    assert result.returncode == 0, (
        f"{command} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not (FUNDUS / "graded_natural" / "labels.csv").is_file():
        pytest.skip(f"real fundus photographs not found at {FUNDUS} (../shared is absent here)")
    tmp = tmp_path_factory.mktemp("gpu_run")
    unlabelled = tmp / "unlabelled"
    unlabelled.mkdir()
    for photo in sorted((FUNDUS / "unlabelled").glob("*.jpeg"))[:24]:
        (unlabelled / photo.name).symlink_to(photo)
    with open(FUNDUS / "graded" / "labels.csv", newline="") as f:
        graded = [r for r in csv.DictReader(f)]
    graded = [r for g in "01234" for r in [r for r in graded if r["grade"] == g][:6]]  # 30, balanced
    with open(FUNDUS / "graded_natural" / "labels.csv", newline="") as f:
        natural = [r for r in csv.DictReader(f)][:30]  # both eyes of the first patients
    folders = [
        _subset(FUNDUS / "graded", tmp / "graded", graded),
        _subset(FUNDUS / "graded_natural", tmp / "graded_natural", natural),
    ]
    travel, out = tmp / "travel", tmp / "out"
    python = sys.executable
    manifest = _run(python, "bench/checks/travel.py", "--images", unlabelled, "--eval-data", *folders,
                    "--out", travel, "--size", 64, "--no-wheels", timeout=300)  # fmt: skip
    _run(
        "make",
        "--no-print-directory",
        f"PY={python}",
        "gpu-run",
        "SMOKE=1",
        f"TRAVEL={travel}",
        f"GPU_OUT={out}",
        timeout=900,
    )
    evaluation = _run(python, "bench/experiments/quality.py", "--features", out / "features.npz",
                      "--images", unlabelled, "--eval-data", *folders, "--resamples", 100, timeout=300)  # fmt: skip
    return {
        "manifest": json.loads(manifest.stdout),
        "report": json.loads((out / "gpu_run.json").read_text()),
        "features": np.load(out / "features.npz"),
        "evaluation": json.loads(evaluation.stdout),
        "labelled": {
            f"{folder.name}/{Path(r['image']).stem}"
            for folder, rows in zip(folders, [graded, natural], strict=True)
            for r in rows
        },
    }


def test_the_travel_folder_holds_every_photograph_within_the_limit(smoke: dict) -> None:
    manifest = smoke["manifest"]
    assert manifest["pretrain"]["samples"] == {"train": 24}
    assert sum(manifest["eval"]["graded"]["samples"].values()) == 30
    assert set(manifest["eval"]["graded"]["samples"]) == {"train", "val", "test"}  # the GPU check fine-tunes on it
    assert manifest["eval"]["graded_natural"]["samples"] == {"train": 30}
    assert manifest["bytes"]["travel"] + manifest["bytes"]["checkout"] <= manifest["bytes"]["limit"]
    assert manifest["wheels"] == []


def test_every_part_of_the_run_reports(smoke: dict) -> None:
    report = smoke["report"]
    run = report["throughput"]["vit_tiny_patch16_224"]
    assert run["pairs_per_s"] > 0 and 0 <= run["data_wait_share"] <= 1
    assert "meets_targets" not in run  # the targets are the GPU's, for ViT-S/B
    for method in ("ssit", "moco_v3"):
        assert report["quality"][method]["steps"] == report["quality"]["steps"] == 3
    assert report["step"]["vit_tiny_patch16_224"]["img_size"] == 64  # the smoke's size, not the GPU's 224
    step = report["step"]["vit_tiny_patch16_224"]["fp32"]
    assert step["ssit_dist"]["pairs_per_s"] > 0 and step["reference_style"]["pairs_per_s"] > 0
    assert "no CUDA" in report["check"]["skipped"]
    waits = report["host_waits"]
    assert waits["throughput_timer_off"]["pairs_per_s"] > 0 and waits["throughput_timer_on"]["pairs_per_s"] > 0
    assert waits["timer_on_over_off"] > 0
    counted = waits["host_waits_per_step"]
    assert counted["steps"] == 2 and counted["syncs"] == {}, counted  # tiny_cpu: zero0_fp32, timer off
    assert counted["per_step"]["ssit_dist:tolist"] > 0  # the loop's sync points are seen (log_every 1)
    assert report["features"]["photographs"] == 60 and report["features"]["missing"] == []
    predicted = report["predict"]["rates"]  # `ssit-dist predict`'s loop over the packed graded photographs
    assert set(predicted) == {"eyepacs_packed", "retina_1411px"}
    for rates in predicted.values():
        assert rates["64px_workers1"]["predict"]["photos_per_s"] > 0
        assert rates["64px_workers1"]["loader_only"]["photos_per_s"] > 0


def test_the_features_cover_every_graded_photograph(smoke: dict) -> None:
    features = smoke["features"]
    keys = [str(k) for k in features["keys"]]
    assert sorted(keys) == sorted(smoke["labelled"])
    arrays = {name: features[name] for name in features.files if name != "keys"}
    assert set(arrays) == {"features/ssit", "features/moco_v3", "features/random"}
    for x in arrays.values():
        assert x.shape[0] == 60 and np.isfinite(x).all()
    ssit, moco, random = arrays.values()
    assert not np.allclose(ssit, random) and not np.allclose(ssit, moco)  # three encoders, not one thrice


def test_the_cpu_side_judges_the_features_it_brought_back(smoke: dict) -> None:
    evaluation = smoke["evaluation"]["evaluation"]
    methods = set(evaluation["methods"])
    assert {"ssit", "moco_v3", "random", "colour_histogram", "thumbnail"} <= methods
    for pair in ("ssit - moco_v3", "ssit - random", "moco_v3 - random"):
        referable = evaluation["differences"][pair]["knn"]["referable_auc"]
        assert referable["verdict"] in (
            f"{pair.split(' - ')[0]} beats {pair.split(' - ')[1]}",
            f"{pair.split(' - ')[1]} beats {pair.split(' - ')[0]}",
            "not resolved at this scale",
        )
        assert referable["half_width"] >= 0
