"""`ssit-dist shard` on the public DR sets' label files as they are downloaded.

The label files are written here in each dataset's published format (the formats are public facts; no
image or label of those sets is used); the photographs are synthetic fundus images made here, laid out
in the dataset's folders. Each packed sample's grade and split are checked against the file's rows.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import cv2
import pytest

from conftest import invoke_cli, tar_samples
from ssit_dist.data.index import ShardIndex, read_index
from ssit_dist.data.packing.inputs import InputError, discover
from ssit_dist.data.packing.synthetic import synthetic_fundus

SMALL = ("--size", 32, "--saliency", "none", "--workers", 1)


def photographs(folder: Path, names: list[str]) -> None:
    """A small synthetic fundus photograph at each name (the grade painted does not matter here)."""
    for k, name in enumerate(names):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        rgb = synthetic_fundus(k % 5, seed=k, size=48)
        assert cv2.imwrite(str(folder / name), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def packed(out: Path) -> tuple[ShardIndex, dict[str, tuple[str, int, dict[str, object]]]]:
    """The index, and every sample as {source path: (split, grade, its json)}, read from the tars."""
    index = read_index(out, verify=True)
    found: dict[str, tuple[str, int, dict[str, object]]] = {}
    for split in index.splits:
        for tar in index.shard_paths(out, split):
            for sample in tar_samples(tar).values():
                meta = json.loads(sample["json"])
                found[meta["source"]] = (split, int(sample["cls"]), meta)
    return index, found


def test_eyepacs_trainlabels_with_patients_from_the_names(tmp_path: Path) -> None:
    """trainLabels.csv `image,level`, names without `.jpeg`; both eyes of a patient in one split."""
    patients = (10, 13, 15, 16, 17, 19, 20, 21)
    levels = {f"{p}_{eye}": (p + (eye == "right")) % 5 for p in patients for eye in ("left", "right")}
    photographs(tmp_path / "train", [f"{name}.jpeg" for name in levels])
    (tmp_path / "trainLabels.csv").write_text("image,level\n" + "".join(f"{n},{g}\n" for n, g in levels.items()))
    out = tmp_path / "out"
    invoke_cli("shard", tmp_path / "train", out, "--labels", tmp_path / "trainLabels.csv",
               "--split", "train=0.5,val=0.5", "--group-by", "patient", *SMALL)  # fmt: skip
    index, found = packed(out)
    assert index.parameters["labels_format"] == "eyepacs" and index.parameters["labels"] == ["trainLabels.csv"]
    assert {src: grade for src, (_, grade, _) in found.items()} == {f"{n}.jpeg": g for n, g in levels.items()}
    splits_of = defaultdict(set)
    for src, (split, _, meta) in found.items():
        assert meta["group"] == src.split("_")[0]  # the patient is the number before _left/_right
        splits_of[meta["group"]].add(split)
    assert len(splits_of) == 8 and all(len(s) == 1 for s in splits_of.values())
    assert {split for s in splits_of.values() for split in s} == {"train", "val"}


def test_aptos_train_csv_with_png_images(tmp_path: Path) -> None:
    """train.csv `id_code,diagnosis`, images train_images/<id_code>.png; --labels-format named."""
    codes = {f"{k:03x}c1434d8d7": k % 5 for k in range(20)}
    photographs(tmp_path / "train_images", [f"{c}.png" for c in codes])
    (tmp_path / "train.csv").write_text("id_code,diagnosis\n" + "".join(f"{c},{g}\n" for c, g in codes.items()))
    out = tmp_path / "out"
    invoke_cli("shard", tmp_path, out, "--labels", tmp_path / "train.csv", "--labels-format", "aptos",
               "--split", "train=0.5,val=0.5", *SMALL)  # fmt: skip
    index, found = packed(out)
    assert {src: g for src, (_, g, _) in found.items()} == {f"train_images/{c}.png": g for c, g in codes.items()}
    for grade in range(5):  # stratified: each grade's 4 photographs two and two
        assert sorted(s for s, g, _ in found.values() if g == grade) == ["train", "train", "val", "val"]
    assert index.parameters["labels_format"] == "aptos" and index.not_in_labels == 0


def test_ddr_split_files_keep_the_official_splits_and_exclude_ungradable(tmp_path: Path) -> None:
    """DR_grading/train.txt, valid.txt, test.txt (`name grade`, no header); grade 5 excluded and counted."""
    root = tmp_path / "DR_grading"
    files = {"train": "train", "valid": "val", "test": "test"}
    expected: dict[str, tuple[str, int]] = {}
    for k, (stem, split) in enumerate(files.items()):
        names = [f"2017041{k}1{n:05d}.jpg" for n in range(6)]
        grades = [n % 5 for n in range(5)] + [5]  # one ungradable photograph per file, in its folder too
        photographs(root / stem, names)
        (root / f"{stem}.txt").write_text("".join(f"{n} {g}\n" for n, g in zip(names, grades, strict=True)))
        expected |= {f"{stem}/{n}": (split, g) for n, g in zip(names, grades, strict=True) if g != 5}
    out = tmp_path / "out"
    result = invoke_cli("shard", root, out, *(a for s in files for a in ("--labels", root / f"{s}.txt")), *SMALL)
    index, found = packed(out)
    assert {src: (split, grade) for src, (split, grade, _) in found.items()} == expected
    assert index.ungradable == 3 and index.not_in_labels == 0 and index.skipped == []
    assert (
        index.parameters["labels_format"] == "ddr"
        and "excluded 3 rows marked ungradable in train.txt valid.txt test.txt" in result.output
    )
    assert index.parameters["labels"] == ["train.txt", "valid.txt", "test.txt"]


def test_messidor2_grades_file_excludes_ungradable_rows(tmp_path: Path) -> None:
    """messidor_data.csv `image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable`; ungradable rows
    (gradable 0, no grade) excluded and counted; image_id with its extension, .png and .JPG on disk; a
    grade written 3.0 (as a pandas round trip of the file writes it) is grade 3."""
    names = [f"20051020_4{k:04d}_0100_PP.png" for k in range(8)] + [f"IM00{k:04d}.JPG" for k in range(4)]
    photographs(tmp_path / "IMAGES", names)
    rows = ["image_id,adjudicated_dr_grade,adjudicated_dme,adjudicated_gradable"]
    rows += [f"{n},,,0" if k in (2, 9) else f"{n},{k % 5}{'.0' * (k == 3)},{k % 2},1" for k, n in enumerate(names)]
    (tmp_path / "messidor_data.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "out"
    invoke_cli("shard", tmp_path, out, "--labels", tmp_path / "messidor_data.csv", *SMALL)
    index, found = packed(out)
    assert {src: g for src, (_, g, _) in found.items()} == {
        f"IMAGES/{n}": k % 5 for k, n in enumerate(names) if k not in (2, 9)
    }
    assert index.ungradable == 2 and index.not_in_labels == 0 and index.parameters["labels_format"] == "messidor2"


def test_idrid_training_and_testing_files_keep_their_split(tmp_path: Path) -> None:
    """IDRiD numbers its training and testing photographs alike (IDRiD_001 in both sets); names without
    .jpg; its CSVs end lines with a run of commas. --split divides the official train split only."""
    root = tmp_path / "B. Disease Grading"
    sets = {
        "train": ("a. Training Set", 16, "a. IDRiD_Disease Grading_Training Labels.csv"),
        "test": ("b. Testing Set", 6, "b. IDRiD_Disease Grading_Testing Labels.csv"),
    }
    truth = root / "2. Groundtruths"
    truth.mkdir(parents=True)
    expected: dict[str, tuple[str, int]] = {}
    for split, (folder, count, labels) in sets.items():
        grades = {f"IDRiD_{n:03d}": (n + (split == "test")) % 5 for n in range(1, count + 1)}
        photographs(root / "1. Original Images" / folder, [f"{name}.jpg" for name in grades])
        rows = [f"{name},{grade},{grade % 3},,,,," for name, grade in grades.items()]
        (truth / labels).write_text(
            "Image name,Retinopathy grade,Risk of macular edema ,,,,\n" + "\n".join(rows) + "\n"
        )
        expected |= {f"1. Original Images/{folder}/{name}.jpg": (split, g) for name, g in grades.items()}
    out = tmp_path / "out"
    files = [truth / f for _, _, f in sets.values()]
    invoke_cli(
        "shard", root, out, *(a for f in files for a in ("--labels", f)), "--split", "train=0.75,val=0.25", *SMALL
    )
    index, found = packed(out)
    assert {src: grade for src, (_, grade, _) in found.items()} == {src: g for src, (_, g) in expected.items()}
    for src, (split, _, _) in found.items():  # the testing set stays test; the training set is train or val
        assert split == "test" if "Testing" in src else split in ("train", "val")
    training = [(split, grade) for src, (split, grade, _) in found.items() if "Training" in src]
    for grade in range(5):  # the training set divided 0.75 / 0.25 within each grade
        per = [split for split, g in training if g == grade]
        assert abs(per.count("val") - 0.25 * len(per)) < 1, (grade, per)
    assert index.splits["test"].num_samples == 6 and index.parameters["labels_format"] == "idrid"
    with pytest.raises(InputError, match="--split names test, an official split of these idrid labels"):
        discover(root, files, "train=0.7,val=0.15,test=0.15")


def test_unknown_or_wrong_formats_are_refused_naming_what_was_seen(tmp_path: Path) -> None:
    photographs(tmp_path / "images", ["a.jpg", "b.jpg"])
    (tmp_path / "grades.csv").write_text("filename,dr_level\na.jpg,0\nb.jpg,1\n")
    result = invoke_cli(
        "shard", tmp_path / "images", tmp_path / "out", "--labels", tmp_path / "grades.csv", check=False
    )
    said = " ".join(result.output.split())  # rich may wrap the message
    assert result.exit_code == 1 and "grades.csv" in said and "['filename', 'dr_level']" in said
    for known in ("plain (image,grade)", "eyepacs (image,level)", "aptos (id_code,diagnosis)",
                  "ddr (no header: name grade)", "messidor2 (image_id,", "idrid (image name,"):  # fmt: skip
        assert known in said
    (tmp_path / "train.csv").write_text("id_code,diagnosis\na,0\n")
    with pytest.raises(InputError, match=r"train.csv is not a ddr labels file .* found 'id_code,diagnosis'"):
        discover(tmp_path / "images", [tmp_path / "train.csv"], labels_format="ddr")
    (tmp_path / "grades.txt").write_text("a.jpg 0\nb.jpg 1\n")
    with pytest.raises(InputError, match="grades.txt: a ddr labels file names its official split"):
        discover(tmp_path / "images", [tmp_path / "grades.txt"])
    (tmp_path / "plain.csv").write_text("image,grade\na.jpg,0\n")
    with pytest.raises(InputError, match=r"labels files of different formats \(\{'aptos': 'train.csv', 'plain'"):
        discover(tmp_path / "images", [tmp_path / "train.csv", tmp_path / "plain.csv"])


def test_a_name_two_images_share_is_refused_not_guessed(tmp_path: Path) -> None:
    photographs(tmp_path, ["left/10_left.jpeg", "right/10_left.jpeg", "12_left.jpeg"])
    (tmp_path / "trainLabels.csv").write_text("image,level\n10_left,1\n12_left,2\n13_left,3\n")
    inputs = discover(tmp_path, [tmp_path / "trainLabels.csv"])
    assert [(i.rel, i.grade) for i in inputs.items] == [("12_left.jpeg", 2)]
    assert [(p.line, p.reason.split(" (")[0]) for p in inputs.problems] == [
        (2, "names 10_left, which matches 2 images")
    ]
    assert [(m.line, m.image) for m in inputs.missing] == [(4, "13_left")]  # absent: not a problem of the row
