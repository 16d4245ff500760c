"""The grader's pooling against timm's, and `open_grader` on each form a grader is kept in: real shards
packed from real photographs, a tiny grader written by fine-tuning's own meta and save_grader."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from tiny_grader import ARCH, SIZE, TINY, fixed_input, pack_graded, tiny_grader, write_run

from ssit_dist.config import FinetuneConfig, PretrainConfig, save_config
from ssit_dist.data.index import read_index
from ssit_dist.models.encoder_meta import EncoderMeta
from ssit_dist.models.grader import Grader, save_grader
from ssit_dist.models.grader_files import GraderFileError, open_grader
from ssit_dist.models.timm_folder import save_timm_folder, timm_config
from ssit_dist.models.vit import create_encoder
from ssit_dist.train.finetune import run_fingerprint, splits


@pytest.fixture(scope="module")
def packed(graded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return pack_graded(graded_dir, tmp_path_factory.mktemp("packed"))


@pytest.fixture(scope="module")
def run(packed: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Grader]:
    folder = tmp_path_factory.mktemp("finetune") / "run"
    return folder, write_run(folder, packed, "token")


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_pool_gives_timm_pre_logits(pool: str) -> None:
    """token and avg are timm's own poolings: the same features as timm's forward_head(pre_logits=True)
    of a timm ViT with that global_pool and the grader's encoder weights."""
    grader = tiny_grader(pool)
    args = {"global_pool": pool, **({"fc_norm": False} if pool == "avg" else {})}
    vit = timm.create_model(ARCH, pretrained=False, num_classes=0, img_size=SIZE, **TINY, **args).eval()
    vit.load_state_dict(grader.encoder.state_dict())
    x = fixed_input()
    with torch.no_grad():
        ours, theirs = grader.features(x), vit.forward_head(vit.forward_features(x), pre_logits=True)
    assert ours.shape == (3, 48)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)  # the same ops in the same order


def test_cls_avg_concatenates_token_and_avg() -> None:
    grader, token, avg = tiny_grader("cls+avg"), tiny_grader("token"), tiny_grader("avg")  # one seed: one encoder
    x = fixed_input()
    with torch.no_grad():
        both = grader.features(x)
        assert both.shape == (3, 96) and grader.head.in_features == 96
        torch.testing.assert_close(both, torch.cat([token.features(x), avg.features(x)], 1), rtol=0, atol=0)
        assert not torch.allclose(token.features(x), avg.features(x))  # the two halves are different features


def test_meta_records_pool_thresholds_and_packing(run: tuple[Path, Grader], packed: Path) -> None:
    meta = json.loads((run[0] / "best.json").read_text())
    assert meta["pool"] == "token"
    assert meta["thresholds"] == [0.5, 1.5, 2.5, 3.5]
    assert meta["preprocessing"] == {"crop": "fundus_disc", "size": 64, "quality": 90}
    assert meta["mean"] == read_index(packed).mean


def test_default_pool_keeps_the_fingerprint(packed: Path) -> None:
    """Runs from before the choice resume: the default adds nothing to the fingerprint, another pool does."""
    prints = {}
    for pool in ("cls+avg", "avg"):
        cfg = FinetuneConfig(train=f"{packed}:train", pool=pool)
        sources = splits(cfg)
        prints[pool] = run_fingerprint(cfg, 1, sources, {n: read_index(s.folder) for n, s in sources.items()})
    assert "pool" not in prints["cls+avg"] and prints["avg"]["pool"] == "avg"
    assert {k: v for k, v in prints["avg"].items() if k != "pool"} == prints["cls+avg"]


def test_run_folder_and_files_give_the_same_logits(run: tuple[Path, Grader], tmp_path: Path) -> None:
    folder, original = run
    moved = tmp_path / "grader"
    for suffix in (".safetensors", ".json"):
        shutil.copy(folder / f"best{suffix}", moved.with_suffix(suffix))
    x = fixed_input()
    with torch.no_grad():
        expected = original(x)
        for path in (folder, moved.with_suffix(".safetensors"), moved.with_suffix(".json")):
            grader, info = open_grader(path)
            assert not grader.training
            torch.testing.assert_close(grader(x), expected, rtol=0, atol=0)
            assert (info.pool, info.objective, info.num_classes, info.img_size) == ("token", "regression", 5, SIZE)
            assert (info.crop_size, info.jpeg_quality, info.thresholds) == (64, 90, (0.5, 1.5, 2.5, 3.5))
            assert info.extra["epoch"] == 1 and info.extra["init"]["kind"] == "random"
    assert open_grader(folder)[1].source == str(folder / "best.safetensors")


def test_older_meta_reads_the_training_shards(run: tuple[Path, Grader], packed: Path, tmp_path: Path) -> None:
    """A run from before the meta recorded its preprocessing: the training shards' index tells it, while
    the shards are where the run's fingerprint.json says; once they are gone, a one-line error."""
    folder = tmp_path / "old"
    shutil.copytree(run[0], folder)
    meta = json.loads((folder / "best.json").read_text())
    del meta["preprocessing"], meta["thresholds"]
    (folder / "best.json").write_text(json.dumps(meta))
    _, info = open_grader(folder)
    assert (info.crop_size, info.jpeg_quality, info.thresholds) == (64, 90, (0.5, 1.5, 2.5, 3.5))
    fingerprint = json.loads((folder / "fingerprint.json").read_text())
    fingerprint["data"]["train"]["source"] = f"{tmp_path / 'gone'}:train"
    (folder / "fingerprint.json").write_text(json.dumps(fingerprint))
    with pytest.raises(GraderFileError, match=r"records no preprocessing, and its training shards cannot tell it"):
        open_grader(folder)


def test_pooling_recorded_by_older_runs_is_cls_avg(packed: Path, tmp_path: Path) -> None:
    folder = tmp_path / "run"
    original = write_run(folder, packed, "cls+avg", "classification")
    meta = json.loads((folder / "best.json").read_text())
    del meta["pool"]
    (folder / "best.json").write_text(json.dumps(meta))
    grader, info = open_grader(folder)
    assert (info.pool, info.thresholds) == ("cls+avg", None)
    with torch.no_grad():
        torch.testing.assert_close(grader(fixed_input()), original(fixed_input()), rtol=0, atol=0)


def encoder_meta() -> EncoderMeta:
    return EncoderMeta(arch=ARCH, img_size=SIZE, timm_kwargs=TINY, patch_size=8, mean=[0.5] * 3, std=[0.25] * 3)


def test_bad_forms_are_refused_in_one_line(run: tuple[Path, Grader], tmp_path: Path) -> None:
    encoder = create_encoder(ARCH, SIZE, **TINY)
    save_timm_folder(tmp_path / "encoder_folder", encoder.state_dict(), timm_config(encoder_meta()), "card\n")
    save_grader(tiny_grader("token"), tmp_path / "encoder.safetensors", encoder_meta().to_json())  # no objective
    pretraining = tmp_path / "pretrain_run"
    (pretraining / "checkpoints").mkdir(parents=True)
    save_config(PretrainConfig(run_dir=str(pretraining)), pretraining)  # what `ssit-dist pretrain` records first
    started = tmp_path / "started"
    started.mkdir()
    save_config(FinetuneConfig(run_dir=str(started)), started)  # a fine-tuning run before its first epoch
    (tmp_path / "empty").mkdir()
    (tmp_path / "photo.jpeg").write_bytes(b"\xff\xd8")
    cases = {
        tmp_path / "absent": r"model .*absent not found: give a fine-tuning run folder",
        tmp_path / "encoder_folder": r"holds an encoder without a grading head: fine-tune it first",
        tmp_path / "encoder.safetensors": r"holds an encoder without a grading head: fine-tune it first",
        pretraining: r"pretrain_run holds an encoder without a grading head: export it \(`ssit-dist export ",
        started: r"started has no best.safetensors yet: the fine-tuning run has not finished an epoch",
        tmp_path / "empty": r"empty is neither a fine-tuning run \(no best.safetensors\) nor a timm folder",
        tmp_path / "photo.jpeg": r"photo.jpeg is not a grader",
    }
    for path, message in cases.items():
        with pytest.raises(GraderFileError, match=message) as caught:
            open_grader(path)
        assert "\n" not in str(caught.value)
    with pytest.raises(GraderFileError, match=r"has no final.safetensors \(it has best.safetensors\): choose best"):
        open_grader(run[0], "final")
    with pytest.raises(GraderFileError, match=r"checkpoint 'latest': a fine-tuning run keeps best and final"):
        open_grader(run[0], "latest")
