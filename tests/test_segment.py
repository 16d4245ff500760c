"""`ssit-dist segment` on synthetic vessels (the generator paints them and writes their masks): it learns
(a random-init encoder fine-tuned beats predicting every pixel foreground), two processes count every
test pixel once, and bad inputs are refused naming the file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import run_cli
from ssit_dist.data.loading.segmentation import SegmentationDataError, discover_segmentation, read_sample
from ssit_dist.data.packing.synthetic import write_synthetic_segmentation

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
    assert changed.returncode == 2 and "belongs to another run" in changed.stderr


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
