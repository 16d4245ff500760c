"""`ssit-dist predict`'s library: a photograph graded from its file is the photograph packed and evaluated,
and the predictions, metrics and pictures it writes, with real shards (`ssit-dist shard`), real photographs
and a tiny grader written as fine-tuning writes one."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import Subset

from conftest import run_cli
from ssit_dist.config import FinetuneConfig
from ssit_dist.data.loading.grading_transforms import eval_transform
from ssit_dist.data.loading.labelled import LabelledShards, SplitSource, check_labels
from ssit_dist.data.loading.photographs import find_photographs
from ssit_dist.data.packing.inputs import sample_key
from ssit_dist.eval.grade_photographs import PredictOptions, grade, grader_outputs, photograph_dataset, predict
from ssit_dist.eval.metrics import quadratic_weighted_kappa
from ssit_dist.eval.over_split import run_over_split
from ssit_dist.models.grader import Grader, save_grader
from ssit_dist.models.grader_files import open_grader
from ssit_dist.models.pretrained import load_encoder
from ssit_dist.models.vit import create_encoder
from ssit_dist.train.finetune import grader_meta, splits

pytestmark = pytest.mark.multiprocess  # the shards are packed by the `ssit-dist shard` command

ARCH, SIZE = "vit_small_patch16_224", 32
TINY = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}
PER_GRADE = 2


@pytest.fixture(scope="module")
def photographs(graded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two real photographs of each grade (linked), with their labels.csv."""
    src = tmp_path_factory.mktemp("photographs")
    rows = (graded_dir / "labels.csv").read_text().splitlines()
    chosen = [r for g in range(5) for r in [r for r in rows[1:] if r.split(",")[1] == str(g)][:PER_GRADE]]
    for row in chosen:
        (src / row.split(",")[0]).symlink_to(graded_dir / row.split(",")[0])
    (src / "labels.csv").write_text("\n".join([rows[0], *chosen]) + "\n")
    return src


@pytest.fixture(scope="module")
def shards(photographs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "graded64"
    run_cli("shard", photographs, out, "--size", 64, "--labels", photographs / "labels.csv", "--saliency", "none")
    return out


def write_grader(folder: Path, shards: Path, objective: str) -> Path:
    """best.safetensors and its JSON as fine-tuning writes them (grader_meta: the shards' packing and
    normalisation), for a tiny random grader whose head is far from zero."""
    cfg = FinetuneConfig(
        run_dir=str(folder), train=f"{shards}:train", arch=ARCH, timm_kwargs=TINY, img_size=SIZE, objective=objective
    )
    index = check_labels(splits(cfg)["train"], cfg.num_classes)
    _, source = load_encoder("random", SIZE, ARCH, TINY)
    torch.manual_seed(0)
    grader = Grader(create_encoder(ARCH, SIZE, **TINY), objective, cfg.num_classes)
    torch.nn.init.normal_(grader.head.weight, std=0.5)
    path = folder / f"{objective}.safetensors"
    save_grader(grader, path, grader_meta(cfg, grader, asdict(source), index))
    return path


@pytest.fixture(scope="module")
def graders(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("graders")
    return {objective: write_grader(folder, shards, objective) for objective in ("classification", "regression")}


def test_a_photograph_graded_from_its_file_is_the_photograph_packed_and_evaluated(
    photographs: Path, shards: Path, graders: dict[str, Path]
) -> None:
    """The pinned property: the input tensors are equal bit for bit, and so are the grader's outputs, when
    both paths run the same batches (fine-tuning's evaluation: LabelledShards, eval_transform,
    run_over_split)."""
    grader, info = open_grader(graders["classification"])
    assert (info.crop_size, info.jpeg_quality) == (64, 95)
    accelerator = Accelerator(cpu=True)
    files = find_photographs([photographs])
    dataset = photograph_dataset(files, info)
    packed = LabelledShards(SplitSource(shards, "train"), eval_transform(info.img_size, info.mean, info.std))
    order = [packed.keys.index(sample_key(Path(f).name)) for f in files]  # the packer's keys, in file order
    for i, j in enumerate(order):
        assert torch.equal(dataset[i].image, packed[j][0])  # type: ignore[arg-type]
    graded = grade(grader, dataset, accelerator, batch_size=4, workers=0)
    indices, outputs = run_over_split(grader, Subset(packed, order), accelerator, batch_size=4)  # type: ignore[arg-type]
    evaluated = dict(zip(indices.tolist(), outputs, strict=True))
    assert graded.indices.tolist() == list(range(len(files)))
    assert np.array_equal(graded.outputs, np.stack([evaluated[j] for j in order]))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_writes_rows_metrics_and_confusion(photographs: Path, graders: dict[str, Path], tmp_path: Path) -> None:
    """Classification: a row per photograph in name order, a problem row for a truncated file, metrics with
    patient-bootstrap intervals that agree with the rows, rows of the labels without a photograph counted."""
    files = sorted(photographs.glob("*.jpeg"))
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "zz_truncated.jpeg").write_bytes(files[0].read_bytes()[:2000])
    labels = tmp_path / "trainLabels.csv"  # EyePACS's own format: names without extension, `level`
    rows = [f"{p.stem},{line.split(',')[1]}" for p, line in zip(files, _label_lines(photographs), strict=True)]
    labels.write_text("\n".join(["image,level", *rows, "99999_left,3", "99999_right,0"]) + "\n")
    out = tmp_path / "out" / "predictions.csv"
    options = PredictOptions([str(photographs), str(tmp_path / "in")], graders["classification"], out, labels=labels)
    summary = predict(PredictOptions(**{**asdict(options), "workers": 0}))
    assert summary["graded"] == len(files) and summary["problems"] == 1
    got = read_csv(out)
    assert [r["image"] for r in got] == sorted(r["image"] for r in got) and len(got) == len(files) + 1
    bad = got[-1]
    assert bad["image"].endswith("zz_truncated.jpeg") and bad["grade"] == "" and "truncated" in bad["problem"]
    graded = got[:-1]
    for row in graded:
        p = [float(row[f"p_grade{g}"]) for g in range(5)]
        assert abs(sum(p) - 1) < 1e-5 and int(row["grade"]) == int(np.argmax(p))
        assert abs(float(row["referable_score"]) - sum(p[2:])) < 1e-5
        assert row["referable"] == str(int(int(row["grade"]) >= 2)) and row["problem"] == "" and row["thresholds"] == ""
    metrics = json.loads((out.parent / "metrics.json").read_text())
    truth, predicted = [int(r["true_grade"]) for r in graded], [int(r["grade"]) for r in graded]
    assert metrics["qwk"]["value"] == pytest.approx(quadratic_weighted_kappa(truth, predicted, 5), abs=1e-4)
    for name in ("qwk", "accuracy", "referable_auc", "sensitivity", "specificity"):
        low, high = metrics[name]["ci95"]
        assert low is not None and low <= metrics[name]["value"] + 1e-4 and metrics[name]["value"] <= high + 1e-4
    assert metrics["samples"] == len(files) == metrics["patients"]  # one eye per EyePACS patient here
    assert (metrics["unmatched_rows"], metrics["unlabelled_photographs"]) == (2, 1)
    assert np.array(metrics["confusion_matrix"]).sum() == len(files)
    assert (out.parent / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _label_lines(photographs: Path) -> list[str]:
    lines = (photographs / "labels.csv").read_text().splitlines()[1:]
    return sorted(lines)  # in file-name order, as the photographs are globbed


def test_regression_rows_tta_and_the_page(photographs: Path, graders: dict[str, Path], tmp_path: Path) -> None:
    """Regression: the score, the thresholds, referable = score >= the cut into grade 2; test-time
    augmentation changes the outputs and is deterministic; the page gets each photograph's view and
    attention map."""
    base = PredictOptions([str(photographs)], graders["regression"], tmp_path / "plain.csv", workers=0)
    predict(base)
    plain = read_csv(tmp_path / "plain.csv")
    for row in plain:
        score = float(row["score"])
        assert row["thresholds"] == "0.5 1.5 2.5 3.5" and float(row["referable_score"]) == score
        assert int(row["grade"]) == min(max(int(np.floor(score + 0.5)), 0), 4)
        assert row["referable"] == str(int(score >= 1.5))
    flipped = [PredictOptions(**{**asdict(base), "output": tmp_path / f"tta{k}.csv", "tta": True}) for k in (1, 2)]
    for options in flipped:
        predict(options)
    assert (tmp_path / "tta1.csv").read_text() == (tmp_path / "tta2.csv").read_text()
    assert [r["score"] for r in read_csv(tmp_path / "tta1.csv")] != [r["score"] for r in plain]
    for objective in ("classification", "regression"):  # the four views of a flipped photograph are its own
        grader = open_grader(graders[objective])[0]
        x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            assert torch.allclose(grader_outputs(grader, x, True), grader_outputs(grader, x.flip(-1), True), atol=1e-5)
            assert not torch.allclose(grader_outputs(grader, x, False), grader_outputs(grader, x.flip(-1), False))
    grader, info = open_grader(graders["regression"])
    graded = grade(
        grader, photograph_dataset(find_photographs([photographs]), info, with_views=True), Accelerator(cpu=True), 4, 0
    )
    assert graded.views is not None and graded.views.shape == (len(plain), SIZE, SIZE, 3)
    assert graded.attention is not None and graded.attention.shape == (len(plain), SIZE // 8, SIZE // 8)
    assert np.allclose(graded.attention.max(axis=(1, 2)), 1)
    page = tmp_path / "page.html"
    predict(PredictOptions(**{**asdict(base), "output": tmp_path / "p.csv", "html": page}))
    text = page.read_text()
    assert all(Path(r["image"]).name in text for r in plain) and text.count("data:image/") >= 2 * len(plain)
