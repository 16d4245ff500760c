"""`ssit-dist segment` on synthetic vessels (the generator paints them and writes their masks): it learns
(a random-init encoder fine-tuned beats predicting every pixel foreground), two processes count every
test pixel once, bad inputs are refused naming the file, and a run resumes as fine-tuning does: exactly
after a kill, refusing a changed run by the changed field unless resume=force."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_cli
from ssit_dist.data.loading.segmentation import SegmentationDataError, discover_segmentation, read_sample
from ssit_dist.data.packing.synthetic import write_synthetic_segmentation
from tiny_runs import assert_same_weights
from tiny_runs import env as clean_env

TINY = "timm_kwargs={patch_size: 8, embed_dim: 48, depth: 2, num_heads: 3}"
SMALL = ["img_size=64", "resize=128", "workers=0", TINY]


@pytest.fixture(scope="module")
def vessels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_segmentation(
        tmp_path_factory.mktemp("seg") / "vessels", {"train": 12, "val": 4, "test": 4}, 128
    )


def _truth(folder: Path) -> tuple[int, int]:
    """(pixels inside the field of view, vessel pixels among them) of a split, read with OpenCV alone."""
    pixels = foreground = 0
    for fov_file in sorted((folder / "fov").iterdir()):
        fov = cv2.imread(str(fov_file), cv2.IMREAD_GRAYSCALE) > 0
        mask = cv2.imread(str(folder / "masks" / "vessels" / fov_file.name), cv2.IMREAD_GRAYSCALE) > 0
        pixels, foreground = pixels + int(fov.sum()), foreground + int((mask & fov).sum())
    return pixels, foreground


@pytest.mark.multiprocess
def test_a_fine_tuned_random_init_beats_the_constant_prediction(vessels: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = run_cli("segment", "--data", vessels, "--out", out, "iterations=150", "warmup=15", "eval_every=50", *SMALL)
    report = json.loads((out / "report.json").read_text())
    test = report["test"]["classes"]["vessels"]
    # The last line says how it went and where the files are.
    last = done.stdout.strip().splitlines()[-1]
    assert f"test split, 4 photographs, weights of step {report['best']['step']}" in last, last
    assert f"vessels Dice {test['dice']:.4f} (all-foreground {test['constant_dice']:.4f})" in last, last
    assert f"Written to {out}/" in last, last
    assert (test["pixels"], test["foreground_pixels"]) == _truth(vessels / "test")
    assert test["dice"] > test["constant_dice"] + 0.15, test  # measured: 0.47 against 0.16
    assert 0 < test["auc_pr"] <= 1 and 0 <= test["iou"] <= test["dice"] and test["specificity"] > 0.8
    assert report["best"]["step"] in (50, 100, 150) and report["steps"] == 150
    assert [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [50, 100, 150]
    overlays = cv2.imread(str(out / "overlays.png"))
    assert overlays is not None and overlays.shape[0] == 34 + 4 * 200  # the title, then 4 test photographs
    assert cv2.imread(str(out / "curves.png")) is not None

    # Launched again, the finished run resumes at its end: nothing retrained, the same report.
    run_cli("segment", "--data", vessels, "--out", out, "iterations=150", "warmup=15", "eval_every=50", *SMALL)
    assert json.loads((out / "report.json").read_text()) == report
    changed = run_cli("segment", "--data", vessels, "--out", out, "iterations=160", "warmup=15", *SMALL, check=False)
    assert changed.returncode == 2 and "iterations: 150 -> 160" in changed.stderr, changed.stderr[-2000:]


@pytest.mark.multiprocess
def test_synthetic_vessels_need_no_data(tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = run_cli("segment", "--synthetic", "--out", out, "iterations=4", "warmup=1", "eval_every=4", *SMALL)
    data = out / "synthetic_vessels"
    counts = {split: len(list((data / split / "images").iterdir())) for split in ("train", "val", "test")}
    assert counts == {"train": 12, "val": 4, "test": 4}
    assert all(cv2.imread(str(p)).shape[0] == 128 for p in (data / "test" / "images").iterdir())  # resize=128
    report = json.loads((out / "report.json").read_text())
    assert report["data"] == str(data) and report["photographs"] == counts and report["steps"] == 4
    assert f"Written to {out}/" in done.stdout.strip().splitlines()[-1]
    # Data of one's own as well: which one was meant cannot be guessed.
    both = run_cli("segment", "--synthetic", "--data", tmp_path, "--out", tmp_path / "both", *SMALL, check=False)
    assert both.returncode == 2 and "--synthetic writes its own data" in both.stderr, both.stderr
    assert not (tmp_path / "both").exists()


@pytest.mark.multiprocess
def test_two_processes_count_every_test_pixel_once(vessels: Path, tmp_path: Path) -> None:
    out = tmp_path / "two"
    run_cli(
        "segment", "--data", vessels, "--out", out, "--nproc", 2, "iterations=4", "warmup=1", "eval_every=4", *SMALL
    )
    report = json.loads((out / "report.json").read_text())
    assert report["processes"] == 2
    for split in ("val", "test"):
        counted = report[split]["classes"]["vessels"]
        assert (counted["pixels"], counted["foreground_pixels"]) == _truth(vessels / split), split


def _copy(vessels: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(vessels, tmp_path / "data"))


def test_a_mask_of_another_size_is_refused_naming_it(vessels: Path, tmp_path: Path) -> None:
    data = _copy(vessels, tmp_path)
    mask = data / "val" / "masks" / "vessels" / "synthetic_00013.png"
    cv2.imwrite(str(mask), np.zeros((100, 128), np.uint8))
    sample = next(s for s in discover_segmentation(data).splits["val"] if s.name == "synthetic_00013")
    with pytest.raises(SegmentationDataError, match=rf"{mask} is 128x100, its image .*synthetic_00013.png 128x128"):
        read_sample(sample)


@pytest.mark.multiprocess
def test_a_mask_that_is_not_binary_is_refused_naming_it(vessels: Path, tmp_path: Path) -> None:
    data = _copy(vessels, tmp_path)
    mask = data / "train" / "masks" / "vessels" / "synthetic_00002.png"
    cv2.imwrite(str(mask), np.full((128, 128), 7, np.uint8))
    result = run_cli(
        "segment", "--data", data, "--out", tmp_path / "run", "iterations=2", "warmup=0", *SMALL, check=False
    )
    assert result.returncode == 2 and f"{mask} is not a binary mask (values [7]...)" in result.stderr


def test_an_image_without_a_mask_is_refused_naming_it(vessels: Path, tmp_path: Path) -> None:
    data = _copy(vessels, tmp_path)
    (data / "test" / "masks" / "vessels" / "synthetic_00018.png").unlink()
    with pytest.raises(
        SegmentationDataError, match=r"test/images/synthetic_00018.png has no mask in .*test/masks/vessels"
    ):
        discover_segmentation(data)
    shutil.copy(vessels / "test" / "masks" / "vessels" / "synthetic_00018.png", data / "test" / "masks" / "vessels")
    (data / "val").rename(data / "holdout")
    with pytest.raises(SegmentationDataError, match=r"needs a train and a val split \(found \['test', 'train'\]\)"):
        discover_segmentation(data)


def test_a_flat_folder_takes_its_splits_from_a_csv(vessels: Path, tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    rows = ["image,split"]
    for split in ("train", "val"):
        for sub in ("images", "masks", "fov"):
            shutil.copytree(vessels / split / sub, flat / sub, dirs_exist_ok=True)
        rows += [f"{p.name},{split}" for p in sorted((vessels / split / "images").iterdir())]
    (flat / "splits.csv").write_text("\n".join(rows) + "\n")
    found = discover_segmentation(flat, flat / "splits.csv")
    assert found.classes == ("vessels",) and {k: len(v) for k, v in found.splits.items()} == {"train": 12, "val": 4}
    assert all(s.fov is not None and s.masks[0].parent.name == "vessels" for s in found.splits["val"])


RESUMED = ["init=random", "iterations=60", "warmup=4", "eval_every=4", *SMALL]  # a checkpoint every 4 steps


def _segment(vessels: Path, out: Path, *extra: str) -> list[str]:
    """The trainer itself, as `ssit-dist segment` starts it for one process."""
    return [sys.executable, "-m", "ssit_dist.train.segment", f"data={vessels}", f"run_dir={out}", *RESUMED, *extra]


def _run(vessels: Path, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_segment(vessels, out, *extra), capture_output=True, text=True, timeout=300, env=clean_env())


def _final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "checkpoints" / (out / "checkpoints" / "latest").read_text() / "model.safetensors"))


@pytest.fixture(scope="module")
def whole(vessels: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run, the reference of the resume tests."""
    out = tmp_path_factory.mktemp("segment") / "whole"
    done = _run(vessels, out)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.multiprocess
def test_a_killed_segmentation_resumes_to_the_same_weights(vessels: Path, whole: Path, tmp_path: Path) -> None:
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        _segment(vessels, killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env(),
        start_new_session=True,
    )  # fmt: skip
    latest, deadline = killed / "checkpoints" / "latest", time.monotonic() + 240
    while not (latest.is_file() and latest.read_text().strip() >= "step00000008"):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before it could be killed"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert not (killed / "report.json").exists()
    stopped_at = int(latest.read_text().strip().removeprefix("step"))

    again = _run(vessels, killed)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed at step {stopped_at} of 60" in again.stderr
    assert (killed / "metrics.jsonl").read_text() == (whole / "metrics.jsonl").read_text()
    assert_same_weights(_final_weights(whole), _final_weights(killed))
    best = [torch.load(out / "best.pt", map_location="cpu", weights_only=True) for out in (whole, killed)]
    assert_same_weights(*best)
    reports = [json.loads((out / "report.json").read_text()) for out in (whole, killed)]
    assert reports[1]["test"] == reports[0]["test"] and reports[1]["best"] == reports[0]["best"]


@pytest.mark.multiprocess
def test_a_changed_segmentation_is_refused_by_name_and_force_resumes(
    vessels: Path, whole: Path, tmp_path: Path
) -> None:
    run = Path(shutil.copytree(whole, tmp_path / "run"))
    changed = subprocess.run(
        _segment(vessels, run, "iterations=64", "lr=0.002"),
        capture_output=True,
        text=True,
        timeout=300,
        env=clean_env(),
    )
    assert changed.returncode == 2, changed.stderr[-3000:]
    message = changed.stderr
    assert "checkpoint step00000060 was written by a run that differs from this one" in message, message[-2000:]
    assert "iterations: 60 -> 64" in message and "lr: 0.001 -> 0.002" in message and "resume=force" in message
    assert (run / "checkpoints" / "latest").read_text() == "step00000060"

    forced = _run(vessels, run, "iterations=64", "lr=0.002", "resume=force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    assert "resume=force: resuming step00000060 although the run changed" in forced.stderr
    assert "resumed at step 60 of 64" in forced.stderr
    assert json.loads((run / "report.json").read_text())["steps"] == 64
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(4, 65, 4))
