"""`ssit-dist shard` end to end, on real fundus photographs, through the installed command."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
import signal
import subprocess
import time
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import psutil
import pytest
from opencv_reference import paper_saliency
from photos import link_subset, read_grades
from PIL import Image

from conftest import CLI, invoke_cli, run_cli, tar_samples
from ssit_dist.configclass import ConfigError
from ssit_dist.data.index import read_index
from ssit_dist.data.loading.labelled import LabelledShards, SplitSource
from ssit_dist.data.packing.options import ShardOptions
from ssit_dist.data.packing.preview import kept_patches

pytestmark = pytest.mark.multiprocess

SPLIT = "train=0.7,val=0.15,test=0.15"


@pytest.fixture(scope="module")
def grades(graded_dir: Path) -> dict[str, int]:
    return read_grades(graded_dir)


@pytest.fixture(scope="module")
def packed(graded_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The issue's command on all 300 graded photographs, default size, 2 workers, with a preview."""
    out = tmp_path_factory.mktemp("graded") / "OUT"
    result = run_cli(
        "shard",
        graded_dir,
        out,
        "--labels",
        graded_dir / "labels.csv",
        "--split",
        SPLIT,
        "--workers",
        2,
        "--preview",
        6,
    )
    return out, result.stdout


def test_counts_and_stratification(packed: tuple[Path, str], grades: dict[str, int]) -> None:
    out, stdout = packed
    info = json.loads((out / "_info.json").read_text())
    assert info["num_samples"] == 300 and info["skipped"] == [] and info["not_in_labels"] == 0
    counts = {name: s["num_samples"] for name, s in info["splits"].items()}
    assert counts == {"train": 210, "val": 45, "test": 45}
    expected_per_grade = Counter(grades.values())
    for name, split in info["splits"].items():
        assert all(split["label_histogram"][str(g)] > 0 for g in range(5)), name
    for g in range(5):
        total = sum(s["label_histogram"][str(g)] for s in info["splits"].values())
        assert total == expected_per_grade[g]
    assert "train" in stdout and "210" in stdout


def test_index_fields_and_sha256(packed: tuple[Path, str]) -> None:
    out, _ = packed
    info = json.loads((out / "_info.json").read_text())
    assert info["format_version"] == 1 and info["tool_version"]
    assert info["parameters"]["size"] == 512 and info["parameters"]["saliency"] == "fine_grained"
    assert info["parameters"]["labels"] == ["labels.csv"] and info["parameters"]["labels_format"] == "plain"
    assert info["parameters"]["split"] == SPLIT
    for split in info["splits"].values():
        assert set(split) >= {"name", "num_samples", "filenames", "shard_lengths", "sha256", "label_histogram"}
        assert sum(split["shard_lengths"]) == split["num_samples"]
        for name, digest, length in zip(split["filenames"], split["sha256"], split["shard_lengths"], strict=True):
            assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
            assert len(tar_samples(out / name)) == length
    assert not list(out.glob("*.tmp"))
    read_index(out, verify=True)


def test_every_sample_is_complete_and_graded_right(packed: tuple[Path, str], grades: dict[str, int]) -> None:
    out, _ = packed
    keys: set[str] = set()
    for tar_path in sorted(out.glob("*.tar")):
        for key, members in tar_samples(tar_path).items():
            assert set(members) == {"jpg", "sal.png", "cls", "json"}, key
            meta = json.loads(members["json"])
            assert int(members["cls"]) == grades[meta["source"]]
            assert meta["original_size"] == [256, 256] and len(meta["crop_box"]) == 4
            keys.add(key)
    assert len(keys) == 300


def test_photographs_smaller_than_the_size_keep_their_own_size(packed: tuple[Path, str]) -> None:
    """The graded photographs are 256 px and the command ran with the default --size 512: none is enlarged
    (an enlarged copy holds no more detail in several times the bytes), and the command says so."""
    out, stdout = packed
    for tar_path in sorted(out.glob("*.tar")):
        for key, members in tar_samples(tar_path).items():
            assert Image.open(io.BytesIO(members["jpg"])).size == (256, 256), key
            assert Image.open(io.BytesIO(members["sal.png"])).size == (256, 256), key
    sizes = json.loads((out / "_info.json").read_text())["photograph_sizes"]
    assert sizes == {
        "source": {"min": [256, 256], "median": [256, 256], "max": [256, 256]},
        "packed_side": {"min": 256, "median": 256, "max": 256},
        "kept_own_size": 300,
    }
    assert "photographs 256x256, packed at 256 px" in stdout
    assert "kept 300 photographs smaller than --size 512 at their own size: none is enlarged" in stdout


def test_mixed_sizes_feed_cpu_pretraining_and_the_summary_says_what_the_gpu_path_needs(
    graded_dir: Path, grades: dict[str, int], retina: Image.Image, tmp_path: Path
) -> None:
    """Three 256 px photographs and one of 1411 px at --size 320: packed at 256 and 320. The CPU pair
    augmentation takes each sample at its own size; the device path batches one size and refuses two, as
    the summary warns, and the repack it proposes feeds it."""
    from ssit_dist.data.loading.augment import PairAugment
    from ssit_dist.data.loading.device_augment import DevicePairAugment
    from ssit_dist.data.loading.epoch import EpochPlan
    from ssit_dist.data.loading.sources import open_shards
    from ssit_dist.data.loading.stream import PairStream, pair_loader

    src = link_subset(graded_dir, tmp_path / "in", sorted(grades)[:3])
    retina.save(src / "retina.png")
    result = invoke_cli("shard", src, tmp_path / "mixed", "--size", 320, "--workers", 1)
    sizes = read_index(tmp_path / "mixed").photograph_sizes
    assert sizes is not None and sizes["packed_side"] == {"min": 256, "median": 256, "max": 320}
    assert sizes["source"]["max"] == [1411, 1411] and sizes["kept_own_size"] == 3
    assert "mixed sizes" in result.stdout and "--size 256 packs every photograph at 256 px" in result.stdout

    def batch(folder: Path, encoded: bool) -> object:
        shard_set = open_shards([folder])
        plan = EpochPlan(tuple(shard_set.lengths), 1, 0, 4, 1, shuffle_buffer=4)
        augment = PairAugment(32, shard_set.mean, shard_set.std)
        return next(iter(pair_loader(PairStream(shard_set, augment, plan, rank=0, encoded=encoded))))

    x1, x2, s1, s2 = batch(tmp_path / "mixed", encoded=False)  # type: ignore[misc]
    assert x1.shape == x2.shape == (4, 3, 32, 32) and s1.shape == s2.shape == (4, 1, 32, 32)
    with pytest.raises(ValueError, match="pack the shards at one size"):
        batch(tmp_path / "mixed", encoded=True)
    invoke_cli("shard", src, tmp_path / "one", "--size", 256, "--workers", 1)
    index = read_index(tmp_path / "one")
    x1, *_ = DevicePairAugment(32, index.mean, index.std)(batch(tmp_path / "one", encoded=True), "cpu")  # type: ignore[arg-type]
    assert x1.shape == (4, 3, 32, 32)
    # A GPU-path run on the mixed shards stops before it starts, naming the repack, not at its first batch.
    from ssit_dist.config import ConfigError, load_config
    from ssit_dist.train.pretrain_inputs import check_inputs
    from tiny_runs import config, ds_config

    cfg = config(tmp_path, tmp_path / "mixed", "gpu", ds_config(tmp_path, 0), data__augment_on="gpu")
    with pytest.raises(ConfigError, match=r"--size 256`, or set data.augment_on=cpu"):
        check_inputs(load_config(cfg), world=1)
    one = config(tmp_path, tmp_path / "one", "gpu_one", ds_config(tmp_path, 0), data__augment_on="gpu")
    assert check_inputs(load_config(one), world=1).shards.num_samples == 4


# webdataset's tar reader inside timm leaves its file objects to the garbage collector.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_timm_reads_the_labelled_shards(packed: tuple[Path, str], grades: dict[str, int]) -> None:
    from timm.data import create_dataset

    out, _ = packed
    dataset = create_dataset(f"wds/{out.name}", root=str(out), split="train")
    seen = [(img, target) for img, target in dataset]
    assert len(seen) == 210
    assert all(isinstance(img, Image.Image) and img.size == (256, 256) for img, _ in seen)
    info = json.loads((out / "_info.json").read_text())
    assert Counter(t for _, t in seen) == {int(g): n for g, n in info["splits"]["train"]["label_histogram"].items()}


def test_stored_saliency_is_opencv_on_the_stored_image(retina: Image.Image, tmp_path: Path) -> None:
    """At the paper's 512 px (the 1411 px CC0 photograph: the graded ones are 256 px, never enlarged)."""
    (tmp_path / "in").mkdir()
    retina.save(tmp_path / "in" / "retina.png")
    invoke_cli("shard", tmp_path / "in", tmp_path / "out", "--workers", 1)
    ((key, members),) = tar_samples(tmp_path / "out" / "train-000000.tar").items()
    image = cv2.imdecode(np.frombuffer(members["jpg"], np.uint8), cv2.IMREAD_COLOR)
    stored = cv2.imdecode(np.frombuffer(members["sal.png"], np.uint8), cv2.IMREAD_UNCHANGED)
    assert stored.dtype == np.uint8 and stored.shape == (512, 512)
    np.testing.assert_array_equal(stored, paper_saliency(image), err_msg=key)


def test_mean_std_are_those_of_the_train_images(packed: tuple[Path, str]) -> None:
    out, _ = packed
    # Per-channel sums of x and x^2 in float64, image by image (one array of every pixel would be 1.3 GB).
    count, total, squares = 0, np.zeros(3), np.zeros(3)
    for member in tar_samples(out / "train-000000.tar").values():
        pixels = np.asarray(Image.open(io.BytesIO(member["jpg"])).convert("RGB")).reshape(-1, 3) / 255
        count, total, squares = count + len(pixels), total + pixels.sum(0), squares + (pixels**2).sum(0)
    mean = total / count
    info = json.loads((out / "_info.json").read_text())
    np.testing.assert_allclose(info["mean"], mean, atol=2e-3)
    np.testing.assert_allclose(info["std"], np.sqrt(squares / count - mean**2), atol=2e-3)


def test_preview_shows_images_beside_saliency_and_kept_patches(packed: tuple[Path, str]) -> None:
    out, _ = packed
    preview = cv2.imread(str(out / "preview.png"))
    assert preview.shape == (40 + 768, 1536, 3)  # a title, then three rows of two triples at 256 px
    image, saliency, kept = (preview[40:296, x : x + 256].astype(float) for x in (0, 256, 512))
    assert saliency.std() > 10  # a real map, not a blank tile
    dimmed = (kept < image - 1).any(axis=2)  # pixels of dropped patches
    assert dimmed.any() and not dimmed.all()


def test_kept_patches_are_the_most_salient() -> None:
    saliency = np.zeros((300, 300), np.uint8)
    saliency[:, :150] = 200  # the left half salient
    mask = kept_patches(saliency)
    assert mask.shape == (14, 14) and mask.sum() == int(0.75 * 196)
    assert mask[:, :7].all()  # every salient patch kept; the rest filled up in patch order


def test_same_output_whatever_the_worker_count(graded_dir: Path, grades: dict[str, int], tmp_path: Path) -> None:
    names = sorted(grades)[:40]
    src = link_subset(graded_dir, tmp_path / "in", names, grades)
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        run_cli(
            "shard",
            src,
            out,
            "--labels",
            src / "labels.csv",
            "--split",
            SPLIT,
            "--size",
            128,
            "--shard-size",
            8,
            "--workers",
            workers,
        )
        outs.append(out)
    files = sorted(p.name for p in outs[0].iterdir())
    assert files == sorted(p.name for p in outs[1].iterdir()) and len(files) > 4
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name


def test_bad_images_are_skipped_listed_and_strict_fails(
    graded_dir: Path, grades: dict[str, int], tmp_path: Path
) -> None:
    names = sorted(grades)[:6]
    src = link_subset(graded_dir, tmp_path / "in", names)
    whole = (graded_dir / names[0]).read_bytes()
    (src / "truncated.jpeg").write_bytes(whole[: len(whole) // 2])
    (src / "notes.jpg").write_text("this is a text file with an image name\n")
    (src / "empty.jpg").write_bytes(b"")
    (src / "gone.jpg").symlink_to(tmp_path / "no-such-file.jpg")  # unreadable
    (src / "[red]scan.jpg").write_bytes(b"")  # a name that is also console markup is printed as it is
    result = run_cli("shard", src, tmp_path / "out", "--size", 64)
    info = json.loads((tmp_path / "out" / "_info.json").read_text())
    reasons = {s["path"]: s["reason"] for s in info["skipped"]}
    assert set(reasons) == {"truncated.jpeg", "notes.jpg", "empty.jpg", "gone.jpg", "[red]scan.jpg"}
    assert "cannot decode" in reasons["truncated.jpeg"] and "not an image" in reasons["notes.jpg"]
    assert "empty" in reasons["empty.jpg"] and "cannot read" in reasons["gone.jpg"]
    assert info["num_samples"] == 6
    for name in reasons:
        assert f"skipped {name}: " in result.stdout

    one_bad = link_subset(graded_dir, tmp_path / "one_bad", names[:3])
    (one_bad / "truncated.jpeg").write_bytes(whole[: len(whole) // 2])
    strict = run_cli("shard", one_bad, tmp_path / "strict" / "out", "--size", 64, "--strict", check=False)
    assert strict.returncode == 1 and f"--strict: {one_bad / 'truncated.jpeg'}: cannot decode" in strict.stderr
    assert not (tmp_path / "strict").exists()  # the folders this run made are gone with it
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("a user's file\n")
    strict = run_cli("shard", one_bad, tmp_path / "mine", "--size", 64, "--strict", check=False)
    assert strict.returncode == 1 and [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_an_error_naming_a_path_that_looks_like_markup_is_printed_as_it_is(tmp_path: Path) -> None:
    missing = tmp_path / "[bold]photographs"
    result = run_cli("shard", missing, tmp_path / "out", check=False)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and f"input folder {missing} does not exist" in result.stderr


def test_evaluation_shards_without_saliency_maps(graded_dir: Path, grades: dict[str, int], tmp_path: Path) -> None:
    """`--saliency none`: the photographs and grades that fine-tuning and evaluation read, a fraction of the
    bytes; pretraining refuses the folder, naming it and the fix."""
    from ssit_dist.data.index import ShardIndexError
    from ssit_dist.data.loading.grading_transforms import eval_transform
    from ssit_dist.data.loading.labelled import LabelledShards, SplitSource
    from ssit_dist.data.loading.sources import open_shards

    names = sorted(grades)[:12]
    src = link_subset(graded_dir, tmp_path / "src", names, grades)
    for saliency in ("none", "fine_grained"):
        invoke_cli(
            "shard", src, tmp_path / saliency, "--labels", src / "labels.csv", "--size", 256, "--saliency", saliency
        )
    (bare,) = (tmp_path / "none").glob("*.tar")
    members = tar_samples(bare)
    assert len(members) == 12 and all(set(m) == {"jpg", "cls", "json"} for m in members.values())
    (full,) = (tmp_path / "fine_grained").glob("*.tar")
    assert all(m["jpg"] == tar_samples(full)[k]["jpg"] for k, m in members.items())  # the same photographs
    assert bare.stat().st_size < 0.6 * full.stat().st_size
    data = LabelledShards(SplitSource(tmp_path / "none", "train"), eval_transform(64, [0.5] * 3, [0.25] * 3))
    assert sorted(data.grades) == sorted(grades[n] for n in names)
    with pytest.raises(ShardIndexError, match=r"none was packed with --saliency none: .* --saliency fine_grained"):
        open_shards([tmp_path / "none"])
    open_shards([tmp_path / "fine_grained"])  # the same photographs with maps: accepted


def test_group_by_patient_keeps_both_eyes_of_every_patient_in_one_split(graded_dir: Path, tmp_path: Path) -> None:
    """graded_natural: 1,738 photographs of 869 patients, both eyes; split by patient, each grade's share of
    every split near the ratios, the grouping in the index and in every sample."""
    natural = graded_dir.parent / "graded_natural"
    if not (natural / "labels.csv").is_file():
        pytest.skip(f"{natural} not found (../shared is absent here)")
    with open(natural / "labels.csv") as f:
        rows = {r["image"]: r for r in csv.DictReader(f)}
    out = tmp_path / "natural"
    result = invoke_cli("shard", natural, out, "--labels", natural / "labels.csv", "--split", SPLIT, "--group-by",
                        "patient", "--size", 64, "--saliency", "none", "--workers", 2)  # fmt: skip
    index = read_index(out)
    assert index.parameters["group_by"] == "patient"
    split_of: dict[str, str] = {}
    patients: dict[str, set[str]] = defaultdict(set)
    for name, info in index.splits.items():
        for tar in index.shard_paths(out, name):
            for sample in tar_samples(tar).values():
                meta = json.loads(sample["json"])
                row = rows[meta["source"]]
                assert meta["group"] == row["patient"] and int(sample["cls"]) == int(row["grade"])
                split_of[meta["source"]] = name
                patients[row["patient"]].add(name)
        assert info.groups == len({rows[s]["patient"] for s, n in split_of.items() if n == name})
    assert len(split_of) == 1738 and len(patients) == 869
    assert all(len(splits) == 1 for splits in patients.values())  # no patient in two splits
    referable = {name: [int(rows[s]["grade"]) >= 2 for s, n in split_of.items() if n == name] for name in index.splits}
    overall = sum(map(sum, referable.values())) / 1738  # 252 / 1738
    assert all(abs(sum(r) / len(r) - overall) < 0.03 for r in referable.values()), referable
    assert {n: len(r) / 1738 for n, r in referable.items()} == pytest.approx(
        {"train": 0.7, "val": 0.15, "test": 0.15}, abs=0.01
    )
    assert "patients" in result.stdout  # the table counts them per split
    # The labelled loader reads each sample's patient (fine-tuning's bootstrap intervals resample them).
    test = LabelledShards(SplitSource(out, "test"), lambda image: image)
    assert [rows[f"{key}.jpeg"]["patient"] for key in test.keys] == test.groups
    assert len(set(test.groups)) == index.splits["test"].groups


def test_options_are_checked_when_built() -> None:
    with pytest.raises(ConfigError, match=r"^size = 72: use a multiple of 16 of at least 32"):
        ShardOptions(size=72)
    with pytest.raises(ConfigError, match=r"^saliency = 'sobel': expected one of fine_grained, spectral_residual"):
        ShardOptions(saliency="sobel")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^preview = 4: a preview shows saliency maps"):
        ShardOptions(saliency="none", preview=4)
    assert ShardOptions(workers=0).workers == 0  # 0: one worker per available core


@pytest.mark.parametrize(
    "option, message",
    [
        (("--size", 30), "--size 30: use a multiple of 16 of at least 32"),
        (("--quality", 101), "--quality 101: must be in [1, 100]"),
        (("--workers", -1), "--workers -1: must be 0 or more"),
        (("--shard-size", 0), "--shard-size 0: must be at least 1"),
        (("--saliency", "sobel"), "--saliency 'sobel': expected one of fine_grained, spectral_residual"),
    ],
)
def test_a_refused_option_fails_naming_its_flag(option: tuple[str, object], message: str, tmp_path: Path) -> None:
    result = invoke_cli("shard", tmp_path, tmp_path / "out", *option, check=False)
    assert result.exit_code == 1 and message in result.stderr, result.output
    assert not (tmp_path / "out").exists()


def test_other_image_modes_are_packed(retina: Image.Image, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    small = retina.resize((200, 200))
    small.convert("L").save(src / "grey.png")
    small.convert("RGBA").save(src / "rgba.png")
    small.convert("P").save(src / "palette.png")
    small.convert("CMYK").save(src / "cmyk.jpg")
    Image.fromarray(np.asarray(small.convert("L"), np.uint16) * 257).save(src / "sixteen.png")
    run_cli("shard", src, tmp_path / "out", "--size", 64)
    info = json.loads((tmp_path / "out" / "_info.json").read_text())
    assert info["num_samples"] == 5 and info["skipped"] == []
    modes = {
        json.loads(m["json"])["original_mode"] for m in tar_samples(tmp_path / "out" / "train-000000.tar").values()
    }
    assert modes == {"L", "RGBA", "P", "CMYK", "I;16"}


def test_label_csv_problems_are_reported_with_line_numbers(
    graded_dir: Path, grades: dict[str, int], tmp_path: Path
) -> None:
    names = sorted(grades)[:5]
    src = link_subset(graded_dir, tmp_path / "in", names)
    (src / "labels.csv").write_text(
        f"image,grade\n{names[0]},0\n{names[1]},9\nmissing.jpeg,1\n{names[0]},0\n{names[2]},1,extra\n{names[3]},2\n"
    )
    result = run_cli("shard", src, tmp_path / "out", "--labels", src / "labels.csv", "--size", 64)
    info = json.loads((tmp_path / "out" / "_info.json").read_text())
    assert {s["line"] for s in info["skipped"]} == {3, 5, 6} and info["missing_photographs"] == 1  # line 4
    # names[1] (grade 9) and names[2] (malformed row) are named, by rows that are skipped; names[4] is not named.
    assert info["num_samples"] == 2 and info["not_in_labels"] == 1
    assert "labels.csv:3: grade 9" in result.stdout
    assert f"left out 2 photographs under {src} whose rows in labels.csv are skipped" in result.stdout
    assert f"left out 1 photographs under {src} that no row of labels.csv names" in result.stdout
    strict = run_cli("shard", src, tmp_path / "strict", "--labels", src / "labels.csv", "--strict", check=False)
    assert strict.returncode != 0 and "labels.csv:3" in strict.stderr and "missing.jpeg (labels.csv:4)" in strict.stderr


def test_a_partial_download_is_summed_up_and_its_absent_photographs_listed_in_one_file(
    graded_dir: Path, grades: dict[str, int], tmp_path: Path
) -> None:
    """EyePACS's trainLabels.csv beside a tenth of its photographs: the command says how many rows name an
    absent photograph, shows a few, and lists every one in one file beside the shards; the index keeps the
    count, not the list."""
    names = sorted(grades)[:60]
    src = link_subset(graded_dir, tmp_path / "in", names[::10])  # 6 photographs of 60 rows
    stem = {n: n.rsplit(".", 1)[0] for n in names}
    (src / "trainLabels.csv").write_text("image,level\n" + "".join(f"{stem[n]},{grades[n]}\n" for n in names))
    out = tmp_path / "out"
    result = run_cli("shard", src, out, "--labels", src / "trainLabels.csv", "--size", 64)
    lines = (result.stdout + result.stderr).splitlines()
    assert len(lines) <= 20, "\n".join(lines)
    absent = [(k + 2, stem[n]) for k, n in enumerate(names) if n not in names[::10]]  # (line, image)
    assert f"absent {len(absent)} photographs that trainLabels.csv names" in result.stdout
    assert sum(stem[n] in result.stdout for n in names) <= 5
    # The closing rate counts photographs packed, not label rows (printed to 0.1: the bounds allow that rounding).
    closing = re.search(r"packed (\d+) photographs in ([\d.]+) s \(([\d.]+) photographs/s\)", result.stdout)
    assert closing, result.stdout
    packed, t, r = int(closing[1]), float(closing[2]), float(closing[3])
    assert packed == 6 and 6 / (t + 0.05) - 0.05 <= r <= 6 / max(t - 0.05, 1e-9) + 0.05, (t, r)
    with open(out / "missing_photographs.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["labels"], int(r["line"]), r["image"]) for r in rows] == [("trainLabels.csv", *a) for a in absent]
    info = json.loads((out / "_info.json").read_text())
    assert info["missing_photographs"] == 54 and info["missing_photographs_file"] == "missing_photographs.csv"
    assert info["num_samples"] == 6 and info["skipped"] == [] and not any(image in str(info) for _, image in absent)
    strict = run_cli("shard", src, tmp_path / "strict", "--labels", src / "trainLabels.csv", "--strict", check=False)
    assert strict.returncode == 1 and "--strict: 54 labels rows name a photograph that is not under" in strict.stderr
    assert sum(image in strict.stderr for _, image in absent) == 10  # the first ten, then the count
    # A run that finds every photograph leaves no stale list behind.
    (src / "trainLabels.csv").write_text("image,level\n" + "".join(f"{stem[n]},{grades[n]}\n" for n in names[::10]))
    again = run_cli("shard", src, out, "--labels", src / "trainLabels.csv", "--size", 64, "--overwrite")
    assert not (out / "missing_photographs.csv").exists() and "absent" not in again.stdout
    assert read_index(out).missing_photographs == 0
    (tmp_path / "empty").mkdir()  # the labels beside a folder that holds none of their photographs: say so
    wrong = invoke_cli("shard", tmp_path / "empty", tmp_path / "none", "--labels", src / "trainLabels.csv", check=False)
    assert wrong.exit_code == 1 and "trainLabels.csv names 6 photographs and none is under" in wrong.stderr
    assert not (tmp_path / "none").exists()


def test_existing_output_is_refused_without_overwrite(retina: Image.Image, tmp_path: Path) -> None:
    src = tmp_path / "in"
    src.mkdir()
    retina.resize((128, 128)).save(src / "eye.jpg")
    run_cli("shard", src, tmp_path / "out", "--size", 64)
    again = run_cli("shard", src, tmp_path / "out", "--size", 64, check=False)
    assert again.returncode != 0 and "--overwrite" in again.stderr
    run_cli("shard", src, tmp_path / "out", "--size", 96, "--overwrite")
    assert json.loads((tmp_path / "out" / "_info.json").read_text())["parameters"]["size"] == 96


def _start(*args: object) -> subprocess.Popen[str]:
    return subprocess.Popen([str(CLI), *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(condition, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_killed_run_never_leaves_an_index_of_incomplete_shards(
    graded_dir: Path, retina: Image.Image, tmp_path: Path
) -> None:
    small = tmp_path / "small"
    small.mkdir()
    retina.resize((128, 128)).save(small / "eye.jpg")
    out = tmp_path / "out"
    run_cli("shard", small, out, "--size", 64)
    assert (out / "_info.json").exists()

    proc = _start("shard", graded_dir, out, "--overwrite", "--shard-size", 4)
    _wait_for(lambda: list(out.glob("*.tar.tmp")) and len(list(out.glob("*.tmp"))) >= 1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert not (out / "_info.json").exists(), "an index survived that names shards which are gone"
    assert not list(out.glob("*.tar")), "finished shard names appeared before the index"
    refused = run_cli("shard", graded_dir, out, check=False)
    assert refused.returncode != 0 and "--overwrite" in refused.stderr


def test_a_crashed_worker_fails_the_run_loudly(graded_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _start("shard", graded_dir, out, "--workers", 2)
    parent = psutil.Process(proc.pid)

    def workers() -> list[psutil.Process]:
        # The pool's processes by what they run: multiprocessing's resource tracker is a child too, and
        # process ids wrap around on a busy machine, so the last pid need not be a worker.
        found = []
        for child in parent.children(recursive=True):
            try:
                if "spawn_main" in " ".join(child.cmdline()):
                    found.append(child)
            except psutil.Error:  # ended in between
                pass
        return found

    try:
        _wait_for(lambda: len(workers()) == 2 and list(out.glob("*.tmp")))
        os.kill(workers()[0].pid, signal.SIGKILL)  # as the OOM killer would
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode != 0
    assert "worker process died" in stderr
    assert not (out / "_info.json").exists() and not list(out.glob("*.tar*"))
