"""`ssit-dist info` and `ssit-dist demo`, through the installed command."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import cv2
import pytest
import torch

from conftest import SHARED, run_cli


def test_info_json_reports_versions_and_accelerator() -> None:
    report = json.loads(run_cli("info", "--json").stdout)
    assert report["packages"]["torch"] == importlib.metadata.version("torch")
    assert report["packages"]["deepspeed"] == importlib.metadata.version("deepspeed")
    assert report["opencv"] == {"version": cv2.__version__, "saliency": True}
    assert len(report["cuda"]) == torch.cuda.device_count()
    expected = ("cuda", "nccl") if torch.cuda.is_available() else ("cpu", "gloo")
    assert (report["deepspeed"]["accelerator"], report["deepspeed"]["communication_backend"]) == expected
    assert {"cpu_adam", "fused_adam"} <= set(report["deepspeed"]["ops"])
    flags = Path("/proc/cpuinfo").read_text()
    assert report["cpu"]["bf16"] == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_info_fits_one_screen() -> None:
    text = run_cli("info").stdout
    assert "deepspeed" in text and "cpu_adam" in text
    assert len(text.splitlines()) <= 40


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
    flat = text.replace("\n", "")
    assert "SSiT pretrained" in flat and "random init" in flat
    for name, path in result["pictures"].items():
        image = cv2.imread(path)
        assert image is not None and min(image.shape[:2]) >= 200, name
        assert path in flat, f"{name} not printed"
    preview = cv2.imread(result["pictures"]["saliency preview"])
    assert preview.shape == (40 + 768, 1536, 3)  # a title naming the synthetic set, six triples, 2 to a row


def test_demo_runs_on_a_folder_and_labels_of_ones_own(tmp_path: Path) -> None:
    """`--data DIR --labels CSV`: the same flow on real photographs, split and packed by the demo; the
    pretraining sees the train split only."""
    graded = SHARED / "data" / "fundus" / "graded"
    if not graded.is_dir():
        pytest.skip(f"real graded photographs not found at {graded} (../shared is absent here)")
    out = tmp_path / "own"
    run_cli("demo", str(out), "--quick", "--data", graded, "--labels", graded / "labels.csv")
    result = json.loads((out / "results.json").read_text())
    info = json.loads((out / "shards" / "graded" / "_info.json").read_text())
    splits = {name: s["num_samples"] for name, s in info["splits"].items()}
    assert sum(splits.values()) == 300 and set(splits) == {"train", "val", "test"}
    assert result["test_samples"] == splits["test"] and result["data"] == str(graded)
    metrics = (out / "runs" / "pretrain" / "metrics.jsonl").read_text().splitlines()
    assert len([m for m in metrics if "contrastive_loss" in m]) == splits["train"] // 16
    assert not (out / "images").exists() and not (out / "shards" / "pretrain").exists()
    test_grades = info["splits"]["test"]["label_histogram"]
    assert result["chance"]["accuracy"] == max(test_grades.values()) / splits["test"]


def test_config_lists_every_field_with_type_default_and_help() -> None:
    import dataclasses

    from ssit_dist.config import FinetuneConfig

    shown = run_cli("config", "pretrain").stdout
    for field, kind in (("optim.lr", "float"), ("micro_batch", "int or null"), ("data.shards", "list of str")):
        line = next(x for x in shown.splitlines() if x.split() and x.split()[0] == field)
        assert kind in line
    assert "peak learning rate" in shown  # the field's help
    # A section's own defaults: the second view keeps the reference's blur probability 0.1, not view 1's.
    blur = {x.split()[0]: x.split()[2] for x in shown.splitlines() if x.split() and "blur_p" in x.split()[0]}
    assert blur == {"augment.view1.blur_p": "1.0", "augment.view2.blur_p": "0.1"}
    finetune = run_cli("config", "finetune").stdout
    assert all(f.name in finetune for f in dataclasses.fields(FinetuneConfig))
    assert run_cli("config", "nonsense", check=False).returncode == 2


def test_slurm_prints_the_exact_sbatch_command() -> None:
    script = Path(__file__).resolve().parents[1] / "launch" / "slurm" / "pretrain.sbatch"
    shown = run_cli(
        "slurm",
        "pretrain",
        "--nodes",
        4,
        "--gpus-per-node",
        8,
        "--partition",
        "gpu",
        "--time",
        "24:00:00",
        "--config",
        "run.yaml",
        "optim.lr=5e-4",
    ).stdout.strip()
    assert shown == (
        f"sbatch --nodes=4 --ntasks-per-node=8 --gpus-per-node=8 --partition=gpu --time=24:00:00 {script} "
        "--config run.yaml optim.lr=5e-4"
    )
    cpu = run_cli("slurm", "finetune", "--ranks-per-node", 2, "train=shards/graded").stdout.strip()
    assert cpu.startswith("sbatch --nodes=1 --ntasks-per-node=2 ") and cpu.endswith(
        "finetune.sbatch train=shards/graded"
    )
    bad = run_cli("slurm", "evaluate", check=False)
    assert bad.returncode == 2 and "job 'evaluate': choose pretrain or finetune" in bad.stderr
