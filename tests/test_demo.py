"""`ssit-dist demo`, through the installed command: every stage on synthetic photographs, and on a folder
of one's own."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import cv2
import pytest
from photos import link_subset, read_grades

from conftest import SHARED, run_cli
from ssit_dist.stage import StageFailed, cli_command, run_stage

pytestmark = pytest.mark.multiprocess


def test_demo_runs_every_stage_and_names_pictures_that_exist(tmp_path: Path) -> None:
    """`ssit-dist demo --quick`: synthetic photographs, shards, a real 2-rank DeepSpeed pretraining,
    export, fine-tuning and kNN from the export and from random init; the table and every picture named.
    (The full demo's numbers, pretrained against random init, are measured by `make demo`, not here.)"""
    out = tmp_path / "demo"
    text = run_cli("demo", str(out), "--quick").stdout
    result = json.loads((out / "results.json").read_text())
    assert set(result["rows"]) == {"SSiT pretrained", "random init"}
    for row in result["rows"].values():
        assert -1 <= row["finetune_qwk"] <= 1 and 0 <= row["knn_accuracy"] <= 1
        assert 0 <= row["view_retrieval"] <= 1
    labels = (out / "images" / "synthetic_graded" / "labels.csv").read_text().splitlines()
    assert labels[0] == "image,grade" and len(labels) == 1 + 12 * 5
    info = json.loads((out / "shards" / "graded" / "_info.json").read_text())
    assert info["num_samples"] == 60 and info["skipped"] == []
    metrics = (out / "runs" / "synthetic_pretrain" / "metrics.jsonl").read_text().splitlines()
    assert len([m for m in metrics if "contrastive_loss" in m]) == (64 + info["splits"]["train"]["num_samples"]) // 16
    assert (out / "encoder.safetensors").is_file()
    assert set(result["segmentation"]) == {"SSiT pretrained", "random init"}  # vessels of synthetic photographs
    for seg in result["segmentation"].values():
        assert 0 <= seg["dice"] <= 1 and 0 < seg["constant_dice"] < 1
    masks = sorted((out / "synthetic_vessels" / "test" / "masks" / "vessels").iterdir())
    assert len(masks) == 2 and all(cv2.imread(str(m), cv2.IMREAD_GRAYSCALE).max() == 255 for m in masks)
    flat = text.replace("\n", "")
    assert "SSiT pretrained" in flat and "random init" in flat
    for name, path in result["pictures"].items():
        image = cv2.imread(path)
        assert image is not None and min(image.shape[:2]) >= 200, name
        assert path in flat, f"{name} not printed"
    # The last stage: `predict` on the test split's own files gives the fine-tuning run's test numbers (the
    # same photographs, preprocessed by the same code), one CSV row and one page row per photograph.
    graded, tuned = result["predict"], result["rows"]["SSiT pretrained"]
    assert graded["photographs"] == result["test_samples"] == info["splits"]["test"]["num_samples"]
    tuned_values = (tuned["finetune_qwk"], tuned["finetune_accuracy"])
    assert (graded["qwk"], graded["accuracy"]) == pytest.approx(tuned_values, abs=5e-5)  # metrics.json: 4 places
    assert len(Path(graded["csv"]).read_text().splitlines()) == 1 + graded["photographs"]
    assert Path(graded["page"]).read_text().count("<tr class=") == graded["photographs"]
    assert graded["page"] in flat
    preview = cv2.imread(result["pictures"]["saliency preview"])
    assert preview.shape == (40 + 768, 1536, 3)  # a title naming the synthetic set, six triples, 2 to a row


def test_demo_runs_on_a_folder_and_labels_of_ones_own(tmp_path: Path) -> None:
    """`--data DIR --labels CSV`: the same flow on real photographs, split and packed by the demo; the
    pretraining sees the train split only."""
    graded = SHARED / "data" / "fundus" / "graded"
    if not graded.is_dir():
        pytest.skip(f"real graded photographs not found at {graded} (../shared is absent here)")
    grades = read_grades(graded)
    names = [name for g in range(5) for name in sorted(n for n in grades if grades[n] == g)[:16]]
    own = link_subset(graded, tmp_path / "photos", names, grades)  # 80 of the 300: 16 of each grade
    out = tmp_path / "own"
    run_cli("demo", str(out), "--quick", "--data", own, "--labels", own / "labels.csv")
    result = json.loads((out / "results.json").read_text())
    info = json.loads((out / "shards" / "graded" / "_info.json").read_text())
    splits = {name: s["num_samples"] for name, s in info["splits"].items()}
    assert sum(splits.values()) == 80 and set(splits) == {"train", "val", "test"}
    assert result["test_samples"] == splits["test"] and result["data"] == str(own)
    metrics = (out / "runs" / "pretrain" / "metrics.jsonl").read_text().splitlines()
    assert len([m for m in metrics if "contrastive_loss" in m]) == splits["train"] // 16
    assert not (out / "images").exists() and not (out / "shards" / "pretrain").exists()
    assert result["segmentation"] == {}  # no masks: no segmentation stage
    test_grades = info["splits"]["test"]["label_histogram"]
    assert result["chance"]["accuracy"] == max(test_grades.values()) / splits["test"]


def test_a_stage_runs_with_its_log_and_a_failing_one_names_itself_and_its_log(tmp_path: Path) -> None:
    """The one way the demo and bench/experiments/quality.py run a stage: `ssit-dist ARGS` through this
    interpreter, its output in the log, progress polled while it runs; a failure says which stage, its
    exit code, the log, and the log's last 15 lines."""
    run_stage("help", cli_command("--help"), tmp_path / "logs" / "help.log")
    assert "Usage" in (tmp_path / "logs" / "help.log").read_text()

    polled: list[int] = []
    log = tmp_path / "count.log"
    script = "import sys, time; print(*range(40), sep=chr(10)); time.sleep(1.2); sys.exit(3)"
    with pytest.raises(StageFailed) as failed:
        run_stage("count to 39", [sys.executable, "-c", script], log, lambda: polled.append(1))
    lines = "\n".join(map(str, range(25, 40)))
    assert str(failed.value) == f"count to 39 failed (exit 3); log {log}:\n{lines}"
    assert len(polled) >= 2
