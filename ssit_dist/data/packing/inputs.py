"""What to pack: find the images under an input folder, attach grades, assign splits.

Layouts understood (checked in this order):
- split folders `train/`, `val/`, `test/` at the top (each flat or with grade folders inside);
- grade folders `0/` ... `4/` at the top;
- any other tree: every image below the folder, unlabelled unless a labels CSV is given.
A labels CSV (`image,grade`, paths relative to the input folder, other columns ignored) overrides grade
folders. Problems in the CSV are collected with their line numbers, never silently dropped.

With `group_by` (a column of the CSV, e.g. `patient`), each group's photographs go to one split: most DR
sets hold both eyes of a patient, and a split by image puts a test patient's other eye in training. Groups
are stratified by their highest grade (a patient is as sick as the worse eye) and dealt, in a seeded
order, to the split furthest below its share of the stratum's photographs: the grade proportions follow
the ratios as closely as whole groups allow.
"""

from __future__ import annotations

import csv
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"}
SPLIT_FOLDERS = ("train", "val", "test")
NUM_GRADES = 5  # DR grades 0 (none) to 4 (proliferative)


class InputError(ValueError):
    """The input as a whole cannot be packed; the message says what to fix."""


@dataclass(frozen=True)
class Item:
    key: str  # stable sample id derived from the relative path
    rel: str  # path relative to the input folder, POSIX separators
    grade: int | None
    split: str
    group: str | None = None  # the labels CSV's `group_by` column (a patient): kept in one split


@dataclass(frozen=True)
class Problem:
    path: str
    reason: str
    line: int | None = None  # line in the labels CSV, where the problem is a CSV row

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else self.path
        return f"{where}: {self.reason}"


@dataclass
class Inputs:
    items: list[Item]
    problems: list[Problem] = field(default_factory=list)
    not_in_labels: int = 0  # images under the folder that the labels CSV does not name
    labelled: bool = False


def sample_key(rel: str) -> str:
    """A WebDataset-safe id: no dots (they start the extension) and no folders."""
    stem = rel.rsplit(".", 1)[0] if "." in Path(rel).name else rel
    return re.sub(r"[^A-Za-z0-9_-]", "_", stem.replace("/", "__"))


def parse_split(spec: str) -> dict[str, float]:
    """`train=0.7,val=0.15,test=0.15` -> {"train": 0.7, ...}; ratios must be positive and sum to 1."""
    ratios: dict[str, float] = {}
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise InputError(f"--split: {part!r} is not NAME=RATIO (for example train=0.8,val=0.2)")
        try:
            ratio = float(value)
        except ValueError:
            raise InputError(f"--split: ratio {value!r} for {name!r} is not a number") from None
        if not 0 < ratio <= 1 or name in ratios:
            raise InputError(f"--split: {name}={value} must be a new name with a ratio in (0, 1]")
        ratios[name] = ratio
    if abs(sum(ratios.values()) - 1) > 1e-6:
        raise InputError(f"--split: ratios sum to {sum(ratios.values()):g}, they must sum to 1")
    return ratios


def _images_under(folder: Path) -> list[Path]:
    # Dangling links are kept on purpose: they fail to read later and are reported, not lost.
    return sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and (p.is_file() or p.is_symlink())
    )


def _grade_folder(rel_parts: tuple[str, ...]) -> int | None:
    if len(rel_parts) >= 2 and rel_parts[0].isdigit() and int(rel_parts[0]) < NUM_GRADES:
        return int(rel_parts[0])
    return None


@dataclass
class Labels:
    """A labels CSV read: grades (and groups) by relative path, and the rows it could not use."""

    grades: dict[str, int] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)  # only with `group_by`
    problems: list[Problem] = field(default_factory=list)


def read_labels(csv_path: Path, root: Path, group_by: str | None = None) -> Labels:
    """Grades by relative path from a CSV with columns image,grade (and `group_by`); bad rows become Problems."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read labels CSV {csv_path}: {e}") from None
    rows = csv.reader(text.splitlines())
    header = [h.strip().lower() for h in next(rows, [])]
    if "image" not in header or "grade" not in header:
        raise InputError(f"{csv_path}: line 1 must name the columns 'image' and 'grade' (found {header})")
    if group_by is not None and group_by.lower() not in header:
        raise InputError(f"{csv_path}: no column {group_by!r} to group by (found {header}); name one of them")
    col_image, col_grade = header.index("image"), header.index("grade")
    col_group = header.index(group_by.lower()) if group_by is not None else None
    labels = Labels()
    first_line: dict[str, int] = {}
    name = csv_path.name
    for line, row in enumerate(rows, start=2):
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            labels.problems.append(Problem(name, f"malformed row: {len(row)} fields, header has {len(header)}", line))
            continue
        rel, grade_text = row[col_image].strip().replace("\\", "/"), row[col_grade].strip()
        problem = _row_problem(rel, grade_text, labels.grades, first_line, root)
        group = row[col_group].strip() if col_group is not None else None
        if problem is None and group == "":
            problem = f"empty {group_by} for {rel}: every photograph needs its group"
        if problem is not None:
            labels.problems.append(Problem(name, problem, line))
            continue
        labels.grades[rel] = int(grade_text)
        if group is not None:
            labels.groups[rel] = group
        first_line[rel] = line
    return labels


def _row_problem(
    rel: str, grade_text: str, grades: dict[str, int], first_line: dict[str, int], root: Path
) -> str | None:
    """Why a row's image and grade cannot be used, or None."""
    if not rel:
        return "malformed row: empty image path"
    try:
        grade = int(grade_text)
    except ValueError:
        return f"grade {grade_text!r} of {rel} is not an integer 0-4"
    if not 0 <= grade < NUM_GRADES:
        return f"grade {grade} of {rel} is outside 0-4"
    if rel in grades:
        return f"duplicate row for {rel} (first on line {first_line[rel]})"
    if not ((root / rel).is_file() or (root / rel).is_symlink()):
        return f"names {rel}, which is not a file under {root}"
    return None


def _stratified(items: list[Item], ratios: dict[str, float], seed: int) -> list[Item]:
    """Assign splits per grade with largest-remainder rounding, so every grade follows the ratios."""
    by_grade: dict[int | None, list[Item]] = defaultdict(list)
    for item in items:
        by_grade[item.grade].append(item)
    out: list[Item] = []
    names = list(ratios)
    for grade in sorted(by_grade, key=lambda g: -1 if g is None else g):
        group = sorted(by_grade[grade], key=lambda i: i.key)
        random.Random(f"{seed}-{grade}").shuffle(group)
        exact = [ratios[n] * len(group) for n in names]
        counts = [int(x) for x in exact]
        by_remainder = sorted(range(len(names)), key=lambda k: (counts[k] - exact[k], k))
        for k in by_remainder[: len(group) - sum(counts)]:
            counts[k] += 1
        start = 0
        for name, count in zip(names, counts, strict=True):
            out += [replace(i, split=name) for i in group[start : start + count]]
            start += count
    return out


def _stratified_groups(items: list[Item], ratios: dict[str, float], seed: int) -> list[Item]:
    """Whole groups to splits: strata by the group's highest grade; each stratum's groups, in a seeded
    order, each to the split furthest below its share of the stratum's photographs."""
    groups: dict[str, list[Item]] = defaultdict(list)
    for item in items:
        groups[str(item.group)].append(item)
    strata: dict[int, list[str]] = defaultdict(list)
    for name, members in groups.items():
        strata[max(-1 if i.grade is None else i.grade for i in members)].append(name)
    names = list(ratios)
    out: list[Item] = []
    for stratum in sorted(strata):
        order = sorted(strata[stratum])
        random.Random(f"{seed}-group-{stratum}").shuffle(order)
        total = sum(len(groups[g]) for g in order)
        placed = dict.fromkeys(names, 0)
        for group in order:
            split = max(names, key=lambda n: (ratios[n] * total - placed[n], -names.index(n)))
            placed[split] += len(groups[group])
            out += [replace(i, split=split) for i in groups[group]]
    return out


def _one_split_per_group(items: list[Item]) -> None:
    """Split folders given by the user must keep each group together too; say which group they break."""
    where: dict[str, Item] = {}
    for item in items:
        first = where.setdefault(str(item.group), item)
        if first.split != item.split:
            raise InputError(
                f"group {item.group!r} is in two splits: {first.rel} ({first.split}) and {item.rel} "
                f"({item.split}); move its photographs into one split folder"
            )


def discover(
    root: Path, labels: Path | None = None, split: str | None = None, seed: int = 0, group_by: str | None = None
) -> Inputs:
    """Everything to pack under `root`, with grades, groups and splits (see the module docstring)."""
    if not root.is_dir():
        raise InputError(f"input folder {root} does not exist or is not a folder")
    if group_by is not None and labels is None:
        raise InputError(f"--group-by {group_by} names a column of the labels CSV: give --labels too")
    split_dirs = [d for d in SPLIT_FOLDERS if (root / d).is_dir()]
    if split_dirs and split:
        raise InputError(f"{root} already has split folders ({', '.join(split_dirs)}); drop --split")
    read = read_labels(labels, root, group_by) if labels else Labels()
    items, not_in_labels = _items(root, labels is not None, read, split_dirs)
    seen: dict[str, str] = {}
    for item in items:
        if item.key in seen:
            raise InputError(f"{item.rel} and {seen[item.key]} map to the same sample key {item.key!r}; rename one")
        seen[item.key] = item.rel
    in_grade_folders = [i for i in items if i.grade is not None]
    if not labels and in_grade_folders and len(in_grade_folders) != len(items):
        stray = next(i.rel for i in items if i.grade is None)
        raise InputError(
            f"{root} mixes grade folders 0-4 with images outside them (for example {stray}); "
            "move those images into a grade folder or give --labels"
        )
    labelled = bool(labels) or bool(in_grade_folders)
    if split:
        ratios = parse_split(split)
        items = _stratified_groups(items, ratios, seed) if group_by else _stratified(items, ratios, seed)
    if group_by:
        _one_split_per_group(items)
    return Inputs(items, read.problems, not_in_labels, labelled)


def _items(root: Path, labelled: bool, read: Labels, split_dirs: list[str]) -> tuple[list[Item], int]:
    """Every image under `root` with its grade, group and split folder; and how many the labels left out."""
    items: list[Item] = []
    not_in_labels = 0
    for path in _images_under(root):
        rel = path.relative_to(root).as_posix()
        parts = Path(rel).parts
        item_split = parts[0] if split_dirs and parts[0] in split_dirs else "train"
        in_split = parts[1:] if split_dirs and parts[0] in split_dirs else parts
        if labelled and rel not in read.grades:
            not_in_labels += 1
            continue
        grade = read.grades[rel] if labelled else _grade_folder(in_split)
        items.append(Item(sample_key(rel), rel, grade, item_split, read.groups.get(rel)))
    return items, not_in_labels
