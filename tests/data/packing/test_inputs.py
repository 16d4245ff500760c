"""Finding inputs, reading label CSVs and assigning stratified splits."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from ssit_dist.data.packing.inputs import InputError, discover, parse_split, read_labels, sample_key


def touch_images(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")  # content is not read here


def test_sample_keys_are_stable_and_webdataset_safe() -> None:
    assert sample_key("train/3/10017_left.jpeg") == "train__3__10017_left"
    assert sample_key("a.b.jpg") == "a_b"
    assert "." not in sample_key("x.y.z.png")


def test_parse_split_rejects_bad_specs() -> None:
    assert parse_split("train=0.7,val=0.15,test=0.15") == {"train": 0.7, "val": 0.15, "test": 0.15}
    with pytest.raises(InputError, match="sum to 0.9"):
        parse_split("train=0.7,val=0.2")
    with pytest.raises(InputError, match="not NAME=RATIO"):
        parse_split("train:0.7")
    with pytest.raises(InputError, match="'x' for 'val' is not a number"):
        parse_split("train=0.5,val=x")


def test_label_csv_problems_carry_line_numbers(tmp_path: Path) -> None:
    touch_images(tmp_path, ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"])
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "image,grade,source\n"
        "a.jpg,0,x\n"
        "b.jpg,7,x\n"  # line 3: grade out of range
        "missing.jpg,1,x\n"  # line 4: no such file
        "a.jpg,2,x\n"  # line 5: duplicate of line 2
        "c.jpg,1\n"  # line 6: malformed
        "d.jpg,two,x\n"  # line 7: not an integer
        "e.jpg,2.5,x\n"  # line 8: not an integer either (2.0 would be grade 2)
    )
    labels = read_labels([csv], tmp_path)
    grades, problems = labels.grades, labels.problems
    assert grades == {"a.jpg": 0}
    by_line = {p.line: p.reason for p in problems}
    assert set(by_line) == {3, 5, 6, 7, 8}
    assert "outside 0-4" in by_line[3]
    assert [(m.file, m.line, m.image) for m in labels.missing] == [("labels.csv", 4, "missing.jpg")]
    assert "first on line 2" in by_line[5]
    assert "malformed" in by_line[6]
    assert "'two'" in by_line[7] and "'2.5'" in by_line[8]
    assert str(problems[0]).startswith("labels.csv:3: ")


def test_label_csv_without_the_columns_fails_fast(tmp_path: Path) -> None:
    (tmp_path / "labels.csv").write_text("file,level\na.jpg,0\n")
    with pytest.raises(InputError) as refused:
        read_labels([tmp_path / "labels.csv"], tmp_path)
    said = str(refused.value)  # the file, the header it saw, the formats it knows
    assert "labels.csv" in said and "['file', 'level']" in said
    assert all(f"{name} (" in said for name in ("plain", "eyepacs", "aptos", "ddr", "messidor2", "idrid"))


def test_images_the_csv_does_not_name_are_counted(tmp_path: Path) -> None:
    touch_images(tmp_path, ["a.jpg", "b.jpg", "c.png", "notes.txt"])
    (tmp_path / "labels.csv").write_text("image,grade\na.jpg,1\n")
    inputs = discover(tmp_path, [tmp_path / "labels.csv"])
    assert [i.rel for i in inputs.items] == ["a.jpg"] and inputs.items[0].grade == 1
    assert inputs.not_in_labels == 2 and inputs.labelled


def test_grade_folders_and_split_folders(tmp_path: Path) -> None:
    touch_images(tmp_path / "graded", ["0/a.jpg", "4/b.jpg"])
    inputs = discover(tmp_path / "graded")
    assert {(i.rel, i.grade, i.split) for i in inputs.items} == {("0/a.jpg", 0, "train"), ("4/b.jpg", 4, "train")}

    touch_images(tmp_path / "split", ["train/1/a.jpg", "val/2/b.jpg", "test/3/c.jpg"])
    inputs = discover(tmp_path / "split")
    assert {(i.grade, i.split) for i in inputs.items} == {(1, "train"), (2, "val"), (3, "test")}
    with pytest.raises(InputError, match="already has split folders"):
        discover(tmp_path / "split", split="train=0.5,val=0.5")


def test_mixed_grade_folders_are_an_error(tmp_path: Path) -> None:
    touch_images(tmp_path, ["0/a.jpg", "stray.jpg"])
    with pytest.raises(InputError, match="stray.jpg"):
        discover(tmp_path)


def test_stratified_split_follows_the_ratios_per_grade(tmp_path: Path) -> None:
    names = [f"{g}/img{k:03d}.jpg" for g in range(5) for k in range(20 + 7 * g)]
    touch_images(tmp_path, names)
    inputs = discover(tmp_path, split="train=0.7,val=0.15,test=0.15", seed=3)
    per = Counter((i.grade, i.split) for i in inputs.items)
    for g in range(5):
        n = 20 + 7 * g
        assert abs(per[(g, "train")] - 0.7 * n) < 1 and abs(per[(g, "val")] - 0.15 * n) < 1
        assert per[(g, "train")] + per[(g, "val")] + per[(g, "test")] == n
    again = discover(tmp_path, split="train=0.7,val=0.15,test=0.15", seed=3)
    other = discover(tmp_path, split="train=0.7,val=0.15,test=0.15", seed=4)
    assert again.items == inputs.items and other.items != inputs.items


def test_colliding_keys_are_refused(tmp_path: Path) -> None:
    touch_images(tmp_path, ["a.b.jpg", "a_b.jpg"])
    with pytest.raises(InputError, match="same sample key 'a_b'"):
        discover(tmp_path)


def _patients(root: Path, count: int, seed: int = 0) -> dict[str, tuple[str, int]]:
    """`count` patients, most with both eyes, grades at a DR-like prevalence (the worse eye sicker);
    the photographs touched and a labels CSV with a patient column written."""
    import random

    rng = random.Random(seed)
    rows: dict[str, tuple[str, int]] = {}
    for p in range(count):
        level = rng.choices(range(5), weights=[73, 7, 15, 3, 2])[0]
        for eye in ("left", "right")[: 1 if rng.random() < 0.1 else 2]:
            rows[f"{p}_{eye}.jpeg"] = (f"P{p}", max(0, level - rng.choice([0, 0, 1])))
    touch_images(root, list(rows))
    lines = ["image,grade,patient", *(f"{name},{grade},{patient}" for name, (patient, grade) in rows.items())]
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return rows


def test_grouped_split_keeps_every_patient_whole_and_follows_the_ratios(tmp_path: Path) -> None:
    rows = _patients(tmp_path, 3000)
    ratios = {"train": 0.7, "val": 0.15, "test": 0.15}
    inputs = discover(tmp_path, [tmp_path / "labels.csv"], "train=0.7,val=0.15,test=0.15", seed=3, group_by="patient")
    assert len(inputs.items) == len(rows)
    splits_of: dict[str, set[str]] = {}
    for item in inputs.items:
        assert item.group == rows[item.rel][0]
        splits_of.setdefault(item.group, set()).add(item.split)
    assert all(len(s) == 1 for s in splits_of.values())  # no patient in two splits
    # Every grade follows the ratios as closely as whole patients allow: within 2 points, and the
    # referable share (grade >= 2) of each split within 2 points of the whole set's.
    counts = Counter((item.split, item.grade) for item in inputs.items)
    per_grade = Counter(item.grade for item in inputs.items)
    for grade, n in per_grade.items():
        for split, ratio in ratios.items():
            assert abs(counts[split, grade] / n - ratio) < 0.02 + 2 / n, (grade, split, counts[split, grade], n)
    referable = sum(n for g, n in per_grade.items() if g >= 2) / len(rows)
    for split in ratios:
        in_split = [i for i in inputs.items if i.split == split]
        assert abs(sum(i.grade >= 2 for i in in_split) / len(in_split) - referable) < 0.02  # type: ignore[operator]
    again = discover(tmp_path, [tmp_path / "labels.csv"], "train=0.7,val=0.15,test=0.15", seed=3, group_by="patient")
    assert again.items == inputs.items  # seeded: the same split every time
    other = discover(tmp_path, [tmp_path / "labels.csv"], "train=0.7,val=0.15,test=0.15", seed=4, group_by="patient")
    assert [i.split for i in other.items] != [i.split for i in inputs.items]


def test_grouping_problems_are_named(tmp_path: Path) -> None:
    _patients(tmp_path, 20)
    with pytest.raises(
        InputError, match=r"labels.csv: no column 'eye' to group by \(found \['image', 'grade', 'patient'\]\)"
    ):
        discover(tmp_path, [tmp_path / "labels.csv"], "train=0.5,val=0.5", group_by="eye")
    with pytest.raises(InputError, match="--group-by patient names a column of the labels file: give --labels"):
        discover(tmp_path, [], "train=0.5,val=0.5", group_by="patient")
    text = (tmp_path / "labels.csv").read_text().splitlines()
    text[3] = text[3].rsplit(",", 1)[0] + ","  # line 4: no patient
    (tmp_path / "labels.csv").write_text("\n".join(text) + "\n")
    inputs = discover(tmp_path, [tmp_path / "labels.csv"], "train=0.5,val=0.5", group_by="patient")
    assert [(p.line, p.reason) for p in inputs.problems] == [
        (4, f"empty patient for {text[3].split(',')[0]}: every photograph needs its group")
    ]


def test_split_folders_that_part_a_patient_are_refused(tmp_path: Path) -> None:
    touch_images(tmp_path, ["train/1_left.jpeg", "test/1_right.jpeg", "train/2_left.jpeg"])
    rows = ["image,grade,patient", "train/1_left.jpeg,0,P1", "test/1_right.jpeg,1,P1", "train/2_left.jpeg,0,P2"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    with pytest.raises(
        InputError,
        match=r"group 'P1' is in two splits: test/1_right.jpeg \(test\) and train/1_left.jpeg \(train\); move",
    ):
        discover(tmp_path, [tmp_path / "labels.csv"], group_by="patient")
    assert len(discover(tmp_path, [tmp_path / "labels.csv"]).items) == 3  # without grouping: as given
