"""`ssit-dist predict` as a user meets it: every bad input of issue 37 item 5 is a one-line error with a
non-zero exit and no output written, and the command grades a folder end to end (in ranks and loader
workers)."""

from __future__ import annotations

import csv
import os
import re
import signal
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import save_file

from conftest import CLI, invoke_cli, run_cli
from ssit_dist.atomic import write_json
from ssit_dist.config import FinetuneConfig, PretrainConfig, save_config
from ssit_dist.data.loading.labelled import check_labels
from ssit_dist.data.packing.inputs import discover
from ssit_dist.data.packing.options import ShardOptions
from ssit_dist.data.packing.shard import pack
from ssit_dist.models.encoder_meta import EncoderMeta
from ssit_dist.models.grader import Grader, save_grader
from ssit_dist.models.pretrained import load_encoder
from ssit_dist.models.vit import create_encoder
from ssit_dist.train.finetune import grader_meta, splits

ARCH, SIZE = "vit_small_patch16_224", 32
TINY = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}


@pytest.fixture(scope="module")
def photos(graded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six real graded photographs (linked) and their labels.csv."""
    src = tmp_path_factory.mktemp("photos")
    rows = (graded_dir / "labels.csv").read_text().splitlines()[:7]
    for row in rows[1:]:
        (src / row.split(",")[0]).symlink_to(graded_dir / row.split(",")[0])
    (src / "labels.csv").write_text("\n".join(rows) + "\n")
    return src


@pytest.fixture(scope="module")
def model(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny regression grader written as fine-tuning writes one, for shards of the photographs at 64 px."""
    shards = tmp_path_factory.mktemp("shards") / "graded64"
    pack(photos, shards, discover(photos, [photos / "labels.csv"]), ShardOptions(size=64, saliency="none"))
    cfg = FinetuneConfig(train=f"{shards}:train", arch=ARCH, timm_kwargs=TINY, img_size=SIZE)
    _, source = load_encoder("random", SIZE, ARCH, TINY)
    torch.manual_seed(0)
    grader = Grader(create_encoder(ARCH, SIZE, **TINY))
    path = tmp_path_factory.mktemp("grader") / "grader.safetensors"
    save_grader(grader, path, grader_meta(cfg, grader, asdict(source), check_labels(splits(cfg)["train"], 5)))
    return path


def refused(*args: object) -> str:
    """The one error message of a command that must fail with exit 1."""
    result = invoke_cli("predict", *args, check=False)
    assert result.exit_code == 1, result.output
    said = result.stderr.strip()
    assert said.startswith("error: ") and said.count("error:") == 1, said
    return " ".join(said.splitlines())  # one message, wrapped by the console at its width


def test_bad_inputs_are_one_line_errors_and_write_nothing(photos: Path, model: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    (tmp_path / "empty").mkdir()
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "readme.txt").write_text("no photographs here")
    (tmp_path / "broken").mkdir()
    for name in ("a.jpg", "b.png"):
        (tmp_path / "broken" / name).write_text("not an image")
    assert f"no images under {tmp_path / 'empty'}" in refused(tmp_path / "empty", "-m", model, "-o", out)
    assert f"no images under {tmp_path / 'texts'}" in refused(tmp_path / "texts", "-m", model, "-o", out)
    said = refused(tmp_path / "broken", "-m", model, "-o", out, "--workers", 0)
    assert "none of the 2 photographs could be graded" in said and "not an image" in said
    # MODEL without a grading head: a pretraining run, an encoder export.
    run = tmp_path / "pretrain_run"
    (run / "checkpoints").mkdir(parents=True)
    save_config(PretrainConfig(run_dir=str(run)), run)
    assert "holds an encoder without a grading head" in refused(photos, "-m", run, "-o", out)
    encoder = create_encoder(ARCH, SIZE, **TINY)
    export = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.state_dict().items()}, str(export))
    meta = EncoderMeta(arch=ARCH, img_size=SIZE, timm_kwargs=TINY, patch_size=8, mean=[0.5] * 3, std=[0.25] * 3)
    write_json(export.with_suffix(".json"), meta.to_json())
    assert "holds an encoder without a grading head" in refused(photos, "-m", export, "-o", out)
    labels = tmp_path / "trainLabels.csv"
    labels.write_text("image,level\n1_left,0\n1_right,2\n")
    said = refused(photos, "-m", model, "-o", out, "--labels", labels)
    assert f"{labels} matches none of the 6 photographs" in said and "1_left" in said
    assert not out.exists()


def test_an_existing_output_is_refused_and_kept(photos: Path, model: Path, tmp_path: Path) -> None:
    out = tmp_path / "p.csv"
    out.write_text("yesterday's predictions\n")
    assert f"{out} already exists: pass --overwrite" in refused(photos, "-m", model, "-o", out)
    assert out.read_text() == "yesterday's predictions\n"
    invoke_cli("predict", photos, "-m", model, "-o", out, "--workers", 0, "--overwrite")
    assert out.read_text().startswith("image,grade,score,")
    assert sorted(tmp_path.iterdir()) == [out]  # written in place: no temporary file left beside it


@pytest.mark.multiprocess
def test_predict_grades_a_folder_in_two_ranks_with_loader_workers(photos: Path, model: Path, tmp_path: Path) -> None:
    """Two ranks (as on two GPUs), each grading its share in a loader worker: the rows of one process."""
    out = tmp_path / "ranks" / "predictions.csv"
    args = ("--model", model, "--labels", photos / "labels.csv")
    done = run_cli("predict", photos, *args, "-o", out, "--nproc", 2, "--workers", 1)
    assert done.stdout.count("graded 6 of 6 photographs") == 1 and "6 scored" in done.stdout  # rank 0 reports
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["image"]).name for r in rows] == sorted(p.name for p in photos.glob("*.jpeg"))
    assert all(r["grade"] in "01234" and r["true_grade"] in "01234" and not r["problem"] for r in rows)
    assert {p.name for p in out.parent.iterdir()} == {"predictions.csv", "metrics.json", "confusion.png"}
    single = tmp_path / "single" / "predictions.csv"
    invoke_cli("predict", photos, *args, "-o", single, "--workers", 0)
    assert out.read_text() == single.read_text()


@pytest.mark.multiprocess
@pytest.mark.parametrize("how", ["Ctrl-C", "kill"])
def test_a_stopped_predict_says_so_writes_nothing_and_leaves_no_process(
    graded_dir: Path, model: Path, tmp_path: Path, how: str
) -> None:
    """Ctrl-C (SIGINT to the terminal's whole process group: the command, the forkserver, the loader
    workers) and `kill` (SIGTERM to the command alone) while grading 1,200 photographs one by one: the
    command says where it stopped and that it wrote nothing, exits 130, and no process of it remains."""
    many = tmp_path / "many"
    many.mkdir()
    for i in range(4):  # 1,200 photographs: copies of the 300 under other names, linked
        for photo in sorted(graded_dir.glob("*.jpeg")):
            (many / f"{i}_{photo.name}").symlink_to(photo)
    out = tmp_path / "p.csv"
    command = [str(CLI), "predict", str(many), "-m", str(model), "-o", str(out), "--workers", "1", "--batch-size", "1"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    me = psutil.Process(process.pid)
    deadline = time.monotonic() + 60
    while len(me.children(recursive=True)) < 3 and time.monotonic() < deadline:  # tracker, forkserver, a worker
        time.sleep(0.1)
    time.sleep(1.0)  # grading
    family = [me, *me.children(recursive=True)]
    if how == "Ctrl-C":
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    said = " ".join((stdout + stderr).split())
    name = "SIGINT" if how == "Ctrl-C" else "SIGTERM"
    assert process.returncode == 130, said
    assert re.search(rf"{name} received: stopped after \d+ of 1200 photographs; nothing written", said), said
    assert "Traceback" not in said
    assert not out.exists() and list(tmp_path.glob("*.csv*")) == []
    _, alive = psutil.wait_procs(family, timeout=10)
    assert alive == [], [p.cmdline() for p in alive]
